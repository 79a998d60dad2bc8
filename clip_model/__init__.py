"""clipcurate's CLIP: OpenAI / open_clip architectures, weight loading, tokenizer, preprocessing.

    model, preprocess = clip_model.create_model_and_transforms("ViT-B-32", pretrained="openai")
    tokens = clip_model.tokenize(["a photo of a cat"])
    with torch.inference_mode():
        image_features = model.encode_image(preprocess(img)[None], normalize=True)
        text_features = model.encode_text(tokens, normalize=True)

Besides CLIP's own towers: Chinese-CLIP folders, open_clip's HF-text architectures
(``xlm-roberta-base-ViT-B-32`` ...), M-CLIP pairings (``text_model=`` a sentence-transformers
folder) and ResNet + BERT towers trained by ``clip_model.train`` (``multilingual-synthetic``);
those need ``pip install 'clipcurate[hf]'``. Every model has ``tokenizer.token_ids(texts)``,
``tokenizer.pad_id``, ``embed_dim`` and ``preprocess_cfg``; ``encode_text`` takes ids
right-padded with the pad id.

Importing the package, ``clip_model.config``, ``clip_model.tokenizer`` (for token ids) or
``clip_model.transform.resize_crop_uint8`` does not import torch: the pipeline's CPU workers
make model inputs and token ids with them, and a worker without a model never pays torch's
start-up (~1 s, ~300 MB). Everything that builds or runs a model is resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import (
    CLIPConfig,
    HFTextConfig,
    PreprocessConfig,
    ResNetConfig,
    TextConfig,
    TowersConfig,
    VisionConfig,
)

# name -> module that defines it, imported on first attribute access.
_LAZY = {
    "CLIP": ".model",
    "create_model": ".factory",
    "create_model_and_transforms": ".factory",
    "get_model_config": ".factory",
    "list_models": ".factory",
    "image_transform": ".transform",
    "list_pretrained": ".pretrained",
    "tokenize": ".tokenizer",
}

__all__ = [
    "CLIPConfig",
    "HFTextConfig",
    "PreprocessConfig",
    "ResNetConfig",
    "TextConfig",
    "TowersConfig",
    "VisionConfig",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clip_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
