"""Tokenizers of Hugging Face text towers (BERT WordPiece, XLM-R SentencePiece/Unigram, ...),
run by the Rust ``tokenizers`` library from the model folder's own ``tokenizer.json``.

Why not ``transformers.AutoTokenizer`` at run time: importing transformers imports torch (~8 s,
~300 MB), and the pipeline's CPU workers tokenize captions without torch. A transformers "fast"
tokenizer *is* a ``tokenizers.Tokenizer`` plus Python-side settings, so the folder's
``tokenizer.json`` (normaliser, pre-tokeniser, model, special-token template) gives the same ids
as the folder's processor once the settings that live outside that file are applied here:

- truncation to the model's max length (``longest_first``, from the right, special tokens kept:
  what ``processor(text, truncation=True, max_length=L)`` does);
- the text cleaning some wrappers apply before the tokenizer (open_clip's HF tokenizer: ftfy,
  HTML-unescape twice, whitespace collapsed; sentence-transformers' ``do_lower_case``: a
  Lowercase normaliser put in front, as sentence-transformers does).

Which JSON: the one the folder's processor really runs. transformers rebuilds a tokenizer's
normaliser from tokenizer_config.json (``do_lower_case``, ``strip_accents``,
``tokenize_chinese_chars``), so a folder's tokenizer.json alone can disagree with its own
processor (a BERT tokenizer with ``do_lower_case`` strips accents: "ヴ" becomes "ウ"). The loader
therefore asks ``transformers.AutoTokenizer`` for the folder's tokenizer, once, on the process
that loads the model (HF text towers need transformers there anyway), and keeps its backend's
JSON; a folder with only slow-tokenizer files (``vocab.txt``, a SentencePiece model) is converted
the same way. The JSON travels with the tokenizer, so workers never need transformers.
"""

from __future__ import annotations

import hashlib
import html
import json
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLEANERS = ("none", "whitespace")
HF_EXTRA_HINT = "pip install 'clipcurate[hf]'"


class MissingExtraError(ImportError):
    """An optional dependency the requested model needs is not installed."""


def require_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise MissingExtraError(
            f"this model's tokenizer runs on the Hugging Face tokenizers library, which is not "
            f"installed: {HF_EXTRA_HINT}"
        ) from e
    return tokenizers


def clean_whitespace(text: str) -> str:
    """open_clip's ``whitespace`` cleaning of captions for HF tokenizers: ftfy.fix_text,
    HTML-unescape twice, strip, collapse whitespace runs to one space (no lower-casing)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split())


# Rust tokenizers shared by every HFTokenizer of one process with the same JSON and max length
# (unpickling in a worker then costs a dict lookup, not a parse of a multi-MB vocabulary).
_BACKENDS: dict[tuple[str, int], Any] = {}
_BACKENDS_LOCK = threading.Lock()


def _has_lowercase(normalizer: Any) -> bool:
    from tokenizers import normalizers

    if normalizer is None:
        return False
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    if isinstance(normalizer, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in normalizer)
    return False


def _backend(digest: str, tokenizer_json: str | None, context_length: int, lowercase: bool) -> Any:
    key = (digest, context_length, lowercase)
    tok = _BACKENDS.get(key)
    if tok is not None:
        return tok
    if tokenizer_json is None:
        raise RuntimeError(f"tokenizer {digest[:12]} is not loaded in this process")
    tok = require_tokenizers().Tokenizer.from_str(tokenizer_json)
    if lowercase and not _has_lowercase(tok.normalizer):
        from tokenizers import normalizers

        current = tok.normalizer
        tok.normalizer = normalizers.Sequence(
            [normalizers.Lowercase()] + ([current] if current is not None else [])
        )
    tok.no_padding()
    # transformers' truncation=True: longest_first, from the right, room kept for the template's
    # special tokens.
    tok.enable_truncation(context_length, stride=0, strategy="longest_first", direction="right")
    with _BACKENDS_LOCK:
        return _BACKENDS.setdefault(key, tok)


class HFTokenizer:
    """A Hugging Face text tower's tokenizer, torch-free and cheap to pickle.

    Args:
        tokenizer_json: the serialised ``tokenizers.Tokenizer`` (a folder's ``tokenizer.json``).
        context_length: most ids per text, special tokens included (the model's max length).
        pad_id: the id that right-pads rows to a common width (the attention mask is derived
            from it, so it must be the tokenizer's own ``[PAD]`` / ``<pad>``).
        clean: "none" or "whitespace" (open_clip's cleaning, see :func:`clean_whitespace`).
        lowercase: put a Lowercase normaliser first unless the tokenizer already lower-cases
            (sentence-transformers' ``do_lower_case``).
        name: where it came from, for messages.
    """

    def __init__(
        self,
        tokenizer_json: str,
        context_length: int,
        pad_id: int,
        *,
        clean: str = "none",
        lowercase: bool = False,
        name: str = "",
    ) -> None:
        if clean not in CLEANERS:
            raise ValueError(f"clean must be one of {CLEANERS}, got {clean!r}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self._json = tokenizer_json
        self._digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.clean = clean
        self.lowercase = lowercase
        self.name = name
        self._tok = _backend(self._digest, tokenizer_json, self.context_length, lowercase)
        vocab = self._tok.get_vocab_size(with_added_tokens=True)
        if not 0 <= self.pad_id < vocab:
            raise ValueError(f"pad_id {pad_id} outside the vocabulary of {vocab} ids")

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def tokenizer_json(self) -> str:
        return self._json

    def _prepare(self, texts: Sequence[str]) -> list[str]:
        out = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be str, got {type(text).__name__}")
            if self.clean == "whitespace":
                text = clean_whitespace(text)
            out.append(text)
        return out

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids per text, special tokens included, at most ``context_length`` of them (truncated
        as the folder's processor truncates). Right-pad rows with :attr:`pad_id` for
        ``encode_text``. No torch needed.

        Raises:
            TypeError: an element is not a str (its index is named).
        """
        prepared = self._prepare(texts)
        if not prepared:
            return []
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [list(e.ids) for e in encode(prepared, add_special_tokens=True)]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None):
        """int64 torch tensor [N, context_length] of :meth:`token_ids` rows right-padded with
        :attr:`pad_id` (for callers that want CLIP's ``tokenize`` shape; imports torch)."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        width = context_length or self.context_length
        rows = self.token_ids(texts)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            ids = ids[:width]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def with_context_length(self, context_length: int) -> HFTokenizer:
        """The same vocabulary and settings truncating at another length."""
        if context_length == self.context_length:
            return self
        return HFTokenizer(
            self._json, context_length, self.pad_id, clean=self.clean,
            lowercase=self.lowercase, name=self.name,
        )  # fmt: skip

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # The JSON travels compressed (an XLM-R vocabulary is 17 MB raw); a process that already
        # holds the same tokenizer reuses it without parsing.
        blob = zlib.compress(self._json.encode(), 6)
        return _unpickle, (
            self._digest, blob, self.context_length, self.pad_id, self.clean, self.lowercase,
            self.name,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.name or self._digest[:12]}, context_length={self.context_length}, "
            f"pad_id={self.pad_id}, vocab={self.vocab_size})"
        )


_UNPICKLED: dict[tuple, HFTokenizer] = {}


def _unpickle(
    digest: str, blob: bytes, context_length: int, pad_id: int, clean: str, lowercase: bool,
    name: str,
) -> HFTokenizer:  # fmt: skip
    key = (digest, context_length, pad_id, clean, lowercase)
    tok = _UNPICKLED.get(key)
    if tok is None:
        tok = HFTokenizer(
            zlib.decompress(blob).decode(), context_length, pad_id, clean=clean,
            lowercase=lowercase, name=name,
        )  # fmt: skip
        _UNPICKLED[key] = tok
    return tok


# ---------------------------------------------------------------- reading a model folder


class TokenizerNotFound(FileNotFoundError):
    """A folder holds no tokenizer files."""


_SLOW_FILES = ("vocab.txt", "sentencepiece.bpe.model", "spiece.model", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or any(
        (folder / f).is_file() for f in _SLOW_FILES
    )


def folder_tokenizer_json(folder: str | Path) -> tuple[str, dict]:
    """(tokenizer JSON, tokenizer_config.json dict) of a model folder: the backend of the
    tokenizer ``transformers.AutoTokenizer`` loads from it, i.e. what the folder's processor
    runs (see the module docstring). Raises the ``clipcurate[hf]`` error without transformers.
    """
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise TokenizerNotFound(
            f"{folder}: no tokenizer (tokenizer.json, vocab.txt or a SentencePiece model)"
        )
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    from .hf_model import require_transformers

    transformers = require_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{folder}: transformers loads no fast (tokenizers) tokenizer from it")
    return backend.to_str(), cfg


def _special_id(tokenizer_json: str, token: str | None) -> int | None:
    if not token:
        return None
    from tokenizers import Tokenizer as RustTokenizer

    return RustTokenizer.from_str(tokenizer_json).token_to_id(token)


def pad_id_of(tokenizer_json: str, tokenizer_cfg: dict, model_cfg: dict | None = None) -> int:
    """The padding id: the tokenizer's pad token, else the model config's ``pad_token_id``."""
    pad = tokenizer_cfg.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    found = _special_id(tokenizer_json, pad)
    if found is None:
        data = json.loads(tokenizer_json)
        padding = data.get("padding") or {}
        if "pad_id" in padding:
            found = int(padding["pad_id"])
    if found is None:
        for candidate in ("[PAD]", "<pad>"):
            found = _special_id(tokenizer_json, candidate)
            if found is not None:
                break
    if found is None and model_cfg is not None and model_cfg.get("pad_token_id") is not None:
        found = int(model_cfg["pad_token_id"])
    if found is None:
        raise ValueError("the tokenizer names no pad token and the model config no pad_token_id")
    return found


def model_max_length(tokenizer_cfg: dict) -> int | None:
    """tokenizer_config.json's ``model_max_length``; None when absent or 'unlimited'
    (transformers writes 1e30 for no limit)."""
    n = tokenizer_cfg.get("model_max_length")
    if n is None or n > 1_000_000:
        return None
    return int(n)


def from_folder(
    folder: str | Path,
    context_length: int,
    *,
    model_cfg: dict | None = None,
    clean: str = "none",
    lowercase: bool = False,
) -> HFTokenizer:
    """The tokenizer of a model folder, truncating at ``context_length`` ids."""
    text, cfg = folder_tokenizer_json(folder)
    return HFTokenizer(
        text, context_length, pad_id_of(text, cfg, model_cfg), clean=clean,
        lowercase=lowercase, name=str(folder),
    )  # fmt: skip
