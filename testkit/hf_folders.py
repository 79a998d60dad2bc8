"""Model folders in the real published layouts, with random weights, for parity tests of
clip_model's HF-text towers (nothing can be downloaded here, so the tests make their own):

- :func:`chinese_clip_folder`: ``ChineseCLIPModel`` (ViT-B/16 + BERT-base shapes, as
  OFA-Sys/chinese-clip-vit-base-patch16) saved with ``save_pretrained`` beside a
  ``ChineseCLIPProcessor`` (BertTokenizerFast + image processor);
- :func:`open_clip_xlmr_folder`: open_clip's ``xlm-roberta-base-ViT-B-32`` built offline (its
  ``hf_model_name`` pointed at a local folder holding the XLM-R config.json and tokenizer), its
  state dict in ``open_clip_model.safetensors``;
- :func:`mclip_folder`: a sentence-transformers model (multilingual DistilBERT Transformer +
  mean Pooling + Dense 768 -> 512), the layout of clip-ViT-B-32-multilingual-v1.

Vocabularies: the tokenizers are trained here (testkit.multilingual) on captions and
multi-script text, so each embedding table has the tokenizer's few thousand rows instead of the
published 21,128 / 250,002 / 119,547. Every other layer has the published shape; a full-size
random table would only add memory and time (250,002 x 768 floats is 768 MB) without
exercising anything the smaller one does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from .multilingual import train_unigram, train_wordpiece, training_corpus

# Published shapes (config.json values of the released models; vocabularies aside).
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)  # fmt: skip
VIT_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, image_size=224, patch_size=16, hidden_act="quick_gelu")  # fmt: skip
DISTILBERT_MULTI = dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                        max_position_embeddings=512)  # fmt: skip


def _bert_tokenizer(folder: Path, *, lowercase: bool, model_max_length: int, vocab_size: int = 6000):
    from transformers import BertTokenizerFast

    tok = train_wordpiece(training_corpus(), vocab_size, lowercase=lowercase)
    fast = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", do_lower_case=lowercase,
        model_max_length=model_max_length,
    )  # fmt: skip
    return fast


def chinese_clip_folder(folder: str | Path, *, seed: int = 0) -> Path:
    """A Chinese-CLIP folder (safetensors weights, tokenizer, processor); returns its path."""
    import torch
    from transformers import (
        ChineseCLIPConfig,
        ChineseCLIPImageProcessor,
        ChineseCLIPModel,
        ChineseCLIPProcessor,
    )

    folder = Path(folder)
    # Chinese-CLIP truncates captions at 52 tokens (its text context), stated here as the
    # tokenizer's model_max_length so the processor's truncation=True applies it.
    tok = _bert_tokenizer(folder, lowercase=True, model_max_length=52)
    cfg = ChineseCLIPConfig(
        text_config=dict(BERT_BASE, vocab_size=len(tok)), vision_config=dict(VIT_B16),
        projection_dim=512,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ChineseCLIPModel(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = ChineseCLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


def xlmr_text_folder(folder: str | Path, *, vocab_size: int = 24000) -> Path:
    """An XLM-R text-model folder: config.json (xlm-roberta-base shapes, our vocabulary) and an
    XLMRobertaTokenizerFast (SentencePiece-style Unigram)."""
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = XLMRobertaTokenizerFast(
        tokenizer_object=train_unigram(training_corpus(), vocab_size), bos_token="<s>",
        eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )  # fmt: skip
    tok.save_pretrained(folder)
    XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def open_clip_xlmr_model(text_folder: str | Path, *, seed: int = 0):
    """open_clip's xlm-roberta-base-ViT-B-32, built offline from ``text_folder``'s config,
    random weights (seeded), in eval mode; and open_clip's tokenizer for it."""
    import open_clip
    import torch

    cfg = open_clip.get_model_config("xlm-roberta-base-ViT-B-32")
    text_cfg = dict(cfg["text_cfg"], hf_model_name=str(text_folder),
                    hf_tokenizer_name=str(text_folder), hf_model_pretrained=False)  # fmt: skip
    torch.manual_seed(seed)
    model = open_clip.create_model("xlm-roberta-base-ViT-B-32", text_cfg=text_cfg).eval()
    tokenizer = open_clip.tokenizer.HFTokenizer(str(text_folder), context_length=77)
    return model, tokenizer


def open_clip_xlmr_folder(folder: str | Path, *, seed: int = 0):
    """A folder with open_clip_model.safetensors of a random xlm-roberta-base-ViT-B-32 and the
    XLM-R config.json + tokenizer beside it. Returns (folder, open_clip model, tokenizer)."""
    from safetensors.torch import save_file

    folder = xlmr_text_folder(folder)
    model, tokenizer = open_clip_xlmr_model(folder, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder, model, tokenizer


def mclip_folder(folder: str | Path, *, seed: int = 0):
    """A sentence-transformers folder in M-CLIP's layout (multilingual DistilBERT, mean
    pooling, Dense 768 -> 512 without activation). Returns (folder, SentenceTransformer)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import DistilBertConfig, DistilBertModel

    try:  # sentence-transformers >= 6 moved the modules
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    folder = Path(folder)
    base = folder.parent / (folder.name + "-distilbert")
    # distilbert-base-multilingual-cased keeps case and accents.
    tok = _bert_tokenizer(base, lowercase=False, model_max_length=512)
    torch.manual_seed(seed)
    DistilBertModel(DistilBertConfig(vocab_size=len(tok), **DISTILBERT_MULTI)).save_pretrained(base)
    tok.save_pretrained(base)
    transformer = models.Transformer(str(base), max_seq_length=128)
    pooling = models.Pooling(768, pooling_mode="mean")
    dense = models.Dense(768, 512, bias=True, activation_function=torch.nn.Identity())
    model = SentenceTransformer(modules=[transformer, pooling, dense], device="cpu").eval()
    model.save(str(folder))
    return folder, model


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))
