"""clip_model.tokenizer against open_clip's tokenizer (the released OpenAI CLIP BPE).

The parity strings are generated from a seeded random generator (and hypothesis), never
hand-picked: they mix many scripts, emoji, HTML entities, whitespace and control characters,
mojibake, contractions, special-token look-alikes, and lengths from empty to far beyond 77
tokens.
"""

from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip import tokenizer as oc_tokenizer

from clip_model.tokenizer import (
    EOT_ID,
    SOT_ID,
    VOCAB_SIZE,
    Tokenizer,
    default_tokenizer,
    tokenize,
)

# Code point ranges the generator draws single characters from (inclusive).
_SCRIPT_RANGES = [
    (0x0021, 0x007E),  # ASCII printable
    (0x00A0, 0x00FF),  # Latin-1 supplement (NBSP, soft hyphen, accented letters)
    (0x0100, 0x017F),  # Latin extended-A (includes the long s, which case-folds to "s")
    (0x0300, 0x036F),  # combining diacritics
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x04FF),  # Cyrillic
    (0x0590, 0x05FF),  # Hebrew
    (0x0600, 0x06FF),  # Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x0E00, 0x0E7F),  # Thai
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2000, 0x206F),  # general punctuation (odd spaces, ZWJ, LINE SEPARATOR, curly quotes)
    (0x20A0, 0x20CF),  # currency
    (0x2460, 0x24FF),  # enclosed alphanumerics (\p{N} that are not digits)
    (0x3000, 0x30FF),  # CJK punctuation, ideographic space, Hiragana, Katakana
    (0x4E00, 0x4FFF),  # CJK ideographs
    (0xAC00, 0xAD00),  # Hangul syllables
    (0xFB00, 0xFB06),  # Latin ligatures (ftfy expands them)
    (0xFF01, 0xFF5E),  # fullwidth forms (ftfy narrows them)
    (0xD800, 0xDFFF),  # lone surrogates (ftfy replaces them)
    (0x1D400, 0x1D7FF),  # mathematical alphanumerics
    (0x1F300, 0x1FAFF),  # emoji
]
_PIECES = [
    "&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x2019;", "&nbsp;", "&amp;amp;", "&amp;lt;",
    "&EACUTE;", "&hellip;", "&copy", "&", "&#128512;", "&notanentity;",
    "'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "n't", "'ſ",
    "<start_of_text>", "<END_OF_TEXT>", "<end_of_text>", "</w>", "<b>", "<br/>",
    " ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000",
    "\x00", "\x07", "\x1b[31m", "\x1b[0m", "\x7f", "\x9d", "\ufeff", "\u200b", "\u200d",
    "Ã©", "â€™", "Ã¼ber", "ÃƒÂ©",  # mojibake for ftfy to repair
    "\u201chi\u201d", "\u2018q\u2019", "ﬁ", "ＡＢＣ", "①", "½", "٣", "Ⅻ",
    "👍🏽", "👨‍👩‍👧", "🇩🇪", "e\u0301", "İ", "ß", "ẞ", "Σ", "ǅ", "K",
    "1234567890", "3.14", "1,000", "$5", "50%", "#hashtag", "@user", "http://a.b/c?d=e&f=g",
    "...", "!!!", "?!", "--", "(", ")", "[x]", "{}", ":-)", "...and", "____",
]  # fmt: skip


def _random_word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        return "".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
    if kind < 0.55:
        return rng.choice(_PIECES)
    if kind < 0.65:
        return str(rng.randint(0, 10 ** rng.randint(1, 9)))
    lo, hi = rng.choice(_SCRIPT_RANGES)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))


def _random_text(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.03:
        return ""
    if shape < 0.06:
        return "".join(rng.choice(" \t\n\r\u3000\xa0") for _ in range(rng.randint(1, 5)))
    if shape < 0.15:
        n_words = rng.randint(60, 200)  # far more than 77 tokens
    else:
        n_words = rng.randint(1, 25)
    parts = []
    for _ in range(n_words):
        parts.append(_random_word(rng))
        parts.append(rng.choice([" ", " ", " ", "", "  ", "\t", "\n", ", ", "-"]))
    return "".join(parts)


@pytest.fixture(scope="module")
def generated_texts() -> list[str]:
    rng = random.Random(20240611)
    texts = [_random_text(rng) for _ in range(2500)]
    # The generator must actually produce the hard cases it claims to.
    assert sum(t == "" for t in texts) > 10
    assert sum(not t.isascii() for t in texts) > 1000
    assert sum("&" in t for t in texts) > 100
    assert sum(any(ord(c) < 32 for c in t) for t in texts) > 500
    return texts


@pytest.fixture(scope="module")
def reference() -> oc_tokenizer.SimpleTokenizer:
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert isinstance(tok, oc_tokenizer.SimpleTokenizer)
    return tok


def _first_mismatches(ours: torch.Tensor, ref: torch.Tensor, texts: list[str]) -> list[str]:
    bad = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    return [f"{texts[i]!r}: ours {ours[i].tolist()} ref {ref[i].tolist()}" for i in bad[:3]]


def test_tokenize_matches_open_clip_on_generated_strings(generated_texts, reference):
    ref = reference(generated_texts)
    ours = tokenize(generated_texts)
    assert ours.dtype == torch.int64
    assert ours.shape == (len(generated_texts), 77)
    assert torch.equal(ours, ref), _first_mismatches(ours, ref, generated_texts)
    # Both truncation and padding were exercised.
    assert (ref[:, -1] == EOT_ID).sum() > 100
    assert (ref[:, -1] == 0).sum() > 1000
    # The module-level function of open_clip is the same reference.
    assert torch.equal(ours[:200], oc_tokenizer.tokenize(generated_texts[:200]))


@pytest.mark.parametrize("context_length", [2, 5, 16, 100])
def test_other_context_lengths_match_open_clip(generated_texts, reference, context_length):
    texts = generated_texts[:400]
    ref = reference(texts, context_length=context_length)
    ours = Tokenizer(context_length=context_length)(texts)
    assert torch.equal(ours, ref), _first_mismatches(ours, ref, texts)


def test_encode_matches_open_clip_untruncated(generated_texts, reference):
    ours = default_tokenizer()
    for text in generated_texts[:800]:
        assert ours.encode(text) == reference.encode(text), repr(text)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=4))
def test_tokenize_matches_open_clip_hypothesis(texts):
    ref = oc_tokenizer.tokenize(texts)
    assert torch.equal(tokenize(texts), ref)


def test_known_ids_for_a_simple_caption():
    # Ids of the widely quoted CLIP example: "a</w>"=320, "photo</w>"=1125, "of</w>"=539,
    # "cat</w>"=2368.
    row = tokenize("A  photo of\ta CAT")[0]
    assert row[:7].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368, EOT_ID]
    assert not row[7:].any()


def test_empty_text_is_sot_eot_then_padding():
    row = tokenize("")[0].tolist()
    assert row == [SOT_ID, EOT_ID] + [0] * 75


def test_single_string_and_list_give_same_rows():
    assert torch.equal(tokenize("hello world"), tokenize(["hello world"]))
    assert tokenize([]).shape == (0, 77)


def test_truncation_keeps_eot_last():
    row = tokenize("word " * 200)[0]
    assert row[0] == SOT_ID and row[-1] == EOT_ID
    assert (row[1:-1] != 0).all()


def test_small_word_cache_gives_same_ids(generated_texts):
    small = Tokenizer(cache_size=3)
    texts = generated_texts[:300]
    assert torch.equal(small(texts), tokenize(texts))
    assert len(small._word_cache) <= 3


def test_bad_input_raises_clear_errors():
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        tokenize(["ok", None])
    with pytest.raises(TypeError, match="must be str"):
        default_tokenizer().encode(b"bytes")
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        tokenize("x", context_length=1)
    with pytest.raises(ValueError, match="outside"):
        default_tokenizer().decode([VOCAB_SIZE])


def test_decode_round_trip_plain_ascii():
    rng = random.Random(7)
    tok = default_tokenizer()
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(300):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 14))) for _ in range(20)]
        text = " ".join(words)
        assert tok.decode(tok.encode(text)) == text


def test_decode_of_tokenize_row_drops_specials_and_padding():
    tok = default_tokenizer()
    row = tokenize("The Quick brown fox")[0]
    assert tok.decode(row) == "the quick brown fox"
    assert tok.decode(row.numpy()) == "the quick brown fox"
    assert tok.decode(row[:6], skip_special_tokens=False) == (
        "<start_of_text> the quick brown fox <end_of_text>"
    )


def test_decode_matches_open_clip_decode(generated_texts, reference):
    # open_clip's decode leaves a space after every word; ours collapses and strips it.
    tok = default_tokenizer()
    for text in generated_texts[:500]:
        ids = reference.encode(text)
        ids = [i for i in ids if i not in (SOT_ID, EOT_ID)]
        assert tok.decode(ids) == " ".join(reference.decode(ids).split()), repr(text)


def test_decode_accepts_int_tensor_and_numpy():
    ids = default_tokenizer().encode("two words")
    expected = "two words"
    assert default_tokenizer().decode(torch.tensor(ids)) == expected
    assert default_tokenizer().decode(np.asarray(ids, dtype=np.int32)) == expected
