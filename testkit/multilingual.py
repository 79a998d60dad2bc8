"""Multilingual text for the tests and the bundled multilingual model: caption corpora of the
synthetic world in every language, hostile multi-script strings, and WordPiece / Unigram
tokenizers trained on them with the ``tokenizers`` library.

    python -m testkit.multilingual --out clip_model/vocab/multilingual-synthetic-tokenizer.json

writes the bundled multilingual model's tokenizer (see its card,
clip_model/weights/multilingual-synthetic.md).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from .languages import LANGUAGES
from .synthetic import caption, sample_scenes

# Unicode ranges sampled for hostile strings: (name, first, last code point).
SCRIPTS: tuple[tuple[str, int, int], ...] = (
    ("cjk", 0x4E00, 0x9FFF),
    ("hiragana", 0x3041, 0x3096),
    ("katakana", 0x30A1, 0x30FA),
    ("hangul", 0xAC00, 0xD7A3),
    ("arabic", 0x0621, 0x064A),
    ("devanagari", 0x0905, 0x0939),
    ("cyrillic", 0x0410, 0x044F),
    ("latin", 0x0061, 0x007A),
    ("emoji", 0x1F600, 0x1F64F),
)
# Real phrases in scripts the world's captions do not use (so tokenizers meet real words).
EXTRA_PHRASES: tuple[str, ...] = (
    "赤い丸が二つ", "青い背景の上の星", "写真：黄色い三角形", "危険標識", "猫の写真",
    "빨간 원 두 개", "파란 배경 위의 별", "노란 삼각형 사진", "위험 표지판",
    "دائرتان حمراوان", "نجمة على خلفية زرقاء", "صورة مثلث أصفر", "علامة خطر",
    "ein roter Kreis", "un carré bleu sur fond vert", "una estrella amarilla", "café ñandú über",
    "😀 a cat 🐱", "🔴🔵🟡 shapes", "✨ sparkle ✨", "👍🏽 ok", "👨‍👩‍👧 family",
)  # fmt: skip


def caption_corpus(n_scenes: int, seed: int, languages: tuple[str, ...] = LANGUAGES) -> Iterator[str]:
    """Captions of ``n_scenes`` random scenes, each in every language (the same choices)."""
    for scene in sample_scenes(n_scenes, seed, unsafe_rate=0.3):
        for lang in languages:
            yield caption(scene, random.Random(f"corpus-{seed}-{scene.scene_id}"), language=lang)


def random_script_text(rng: random.Random, max_words: int = 12) -> str:
    """A string of random "words" drawn from the scripts of :data:`SCRIPTS`, mixed."""
    words = []
    for _ in range(rng.randint(1, max_words)):
        _, lo, hi = rng.choice(SCRIPTS)
        words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
    return " ".join(words)


def hostile_strings(n: int, seed: int) -> list[str]:
    """``n`` strings that stress a tokenizer: world captions in every language, phrases in other
    scripts, random multi-script text, emoji (with skin tones and ZWJ sequences), mixed scripts,
    whitespace oddities, strings far past any max length, and the empty string."""
    rng = random.Random(f"hostile-{seed}")
    captions = list(caption_corpus(max(1, n // 8), seed))
    out = ["", " ", "\t\n", "a"]
    kinds = ("caption", "phrase", "random", "mixed", "long", "spaces", "emoji")
    while len(out) < n:
        kind = rng.choice(kinds)
        if kind == "caption":
            out.append(rng.choice(captions))
        elif kind == "phrase":
            out.append(rng.choice(EXTRA_PHRASES))
        elif kind == "random":
            out.append(random_script_text(rng))
        elif kind == "mixed":
            out.append(rng.choice(captions) + " " + random_script_text(rng, 4) + " " + rng.choice(EXTRA_PHRASES))
        elif kind == "long":
            out.append(" ".join(rng.choice(captions) for _ in range(rng.randint(8, 30))))
        elif kind == "spaces":
            out.append("  " + rng.choice(captions).replace(" ", rng.choice(("  ", "\t", " \u3000 "))) + " ")
        else:
            out.append("".join(chr(rng.randint(0x1F300, 0x1F64F)) for _ in range(rng.randint(1, 20))))
    return out[:n]


def training_corpus(seed: int = 0) -> list[str]:
    """Text the test tokenizers are trained on: captions in every language, the extra phrases
    and random multi-script text (so every script has pieces)."""
    rng = random.Random(f"tokenizer-corpus-{seed}")
    texts = list(caption_corpus(1500, seed))
    texts += list(EXTRA_PHRASES) * 5
    texts += [random_script_text(rng) for _ in range(3000)]
    return texts


def train_wordpiece(
    texts: list[str], vocab_size: int, *, lowercase: bool, chinese_chars: bool = True
):
    """A BERT WordPiece ``tokenizers.Tokenizer`` ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) with
    BERT's normaliser (accents kept: stripping them would delete Devanagari vowel signs),
    BERT's pre-tokeniser and the ``[CLS] $A [SEP]`` template."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese_chars, strip_accents=False, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    return tok


def train_unigram(texts: list[str], vocab_size: int):
    """An XLM-R-style SentencePiece Unigram ``tokenizers.Tokenizer``: <s>=0, <pad>=1, </s>=2,
    <unk>=3 (XLM-R's ids), NFKC normaliser, Metaspace pre-tokeniser, ``<s> $A </s>``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\u3000", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", max_piece_length=8
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )  # fmt: skip
    return tok


def bundled_tokenizer_corpus() -> list[str]:
    """The bundled multilingual model's tokenizer corpus: the world's captions (4 languages,
    both full and short forms come from the same vocabulary) from scenes no training or
    evaluation seed uses."""
    return list(caption_corpus(4000, seed=777001))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testkit.multilingual", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=3000)
    a = p.parse_args(argv)
    tok = train_wordpiece(bundled_tokenizer_corpus(), a.vocab_size, lowercase=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(a.out)
    print(f"wrote {a.out}: {tok.get_vocab_size()} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
