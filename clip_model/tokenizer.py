"""CLIP's byte-level BPE tokenizer, as OpenAI released it.

Text is cleaned the way the released tokenizer cleans it (``ftfy.fix_text``, HTML unescaped
twice, whitespace runs collapsed to one space, lower-cased), split with CLIP's regular
expression, mapped byte by byte into a 256-symbol printable alphabet and merged with the
shipped BPE merge list (``clip_model/vocab/bpe_simple_vocab_16e6.txt.gz``). The ids are the
ones every OpenAI / OpenCLIP text tower with a 49,408-token vocabulary was trained on.

Speed: ids are cached per space-separated word of the cleaned text. CLIP's split pattern
never matches across a space and has no look-behind, so splitting on spaces first and then
applying the pattern to each word gives the same tokens as applying it to the whole text;
caching whole words turns the common case into one dict lookup per word. ASCII captions
without control characters or ``&`` skip ftfy and ``html.unescape`` because both provably
leave such text unchanged (ftfy's fixers only touch non-ASCII text, control characters,
``\\r`` and ``&`` entities).
"""

from __future__ import annotations

import gzip
import html
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex

if TYPE_CHECKING:  # only the tensor-returning calls need torch; token_ids runs without it
    import torch

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"

# CLIP keeps the first 48,894 merges of the file: 512 byte symbols + 48,894 merges + the two
# special tokens make the 49,408-id vocabulary its embedding table was trained with.
_NUM_MERGES = VOCAB_SIZE - 512 - 2
_END_OF_WORD = "</w>"

# The released split pattern: special tokens, English contractions, letter runs, single
# digits, runs of anything that is neither whitespace, letter nor digit. IGNORECASE is kept
# because it changes which strings count as a contraction or special token (e.g. "'ſ").
_SPLIT_PATTERN = regex.compile(
    "|".join(
        [
            regex.escape(SOT_TOKEN),
            regex.escape(EOT_TOKEN),
            "'s",
            "'t",
            "'re",
            "'ve",
            "'m",
            "'ll",
            "'d",
            r"[\p{L}]+",
            r"[\p{N}]",
            r"[^\s\p{L}\p{N}]+",
        ]
    ),
    regex.IGNORECASE,
)


def _byte_alphabet() -> list[str]:
    """Symbol for each byte value 0..255.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 (control
    characters, space, NBSP, soft hyphen) get code points 256, 257, ... in byte order, so
    every symbol is printable and none is whitespace.
    """
    printable = (
        set(range(ord("!"), ord("~") + 1))
        | set(range(ord("¡"), ord("¬") + 1))
        | set(range(ord("®"), ord("ÿ") + 1))
    )
    alphabet = []
    next_extra = 256
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(next_extra))
            next_extra += 1
    return alphabet


_BYTE_SYMBOLS = _byte_alphabet()
# str.translate table from a Latin-1-decoded byte string to the byte alphabet; only the 68
# remapped bytes need entries, the rest map to themselves.
_BYTES_TO_SYMBOLS = {b: s for b, s in enumerate(_BYTE_SYMBOLS) if ord(s) != b}
_SYMBOL_TO_BYTE = {s: b for b, s in enumerate(_BYTE_SYMBOLS)}
# Id order of the 256 single-byte symbols in CLIP's vocabulary: the self-representing bytes
# first, then the remapped ones (i.e. by symbol code point, not by byte value).
_BASE_SYMBOLS = sorted(_BYTE_SYMBOLS)


def _is_fix_text_invariant(text: str) -> bool:
    """True when ftfy.fix_text and html.unescape provably return ``text`` unchanged.

    Printable ASCII has no mojibake, no C1/terminal/control characters, no line breaks to
    normalise, nothing to uncurl, widen or NFC-normalise; without ``&`` there is no entity.
    """
    return text.isascii() and text.isprintable() and "&" not in text


def clean_text(text: str) -> str:
    """Normalise a caption exactly as CLIP's released tokenizer does before splitting.

    ftfy.fix_text, HTML-unescape twice, collapse every whitespace run to one space, strip,
    lower-case.
    """
    if not _is_fix_text_invariant(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP BPE tokenizer.

    Args:
        vocab_path: gzip BPE merge file; defaults to the shipped OpenAI vocabulary.
        context_length: default row length of :meth:`__call__` (CLIP models use 77).
        cache_size: most cleaned words whose ids are kept in memory; the cache is emptied
            when it grows past this, which bounds memory on endless streams of new words.

    Ids: 0..255 single-byte symbols, 256..511 the same symbols ending a word, 512..49405
    merges in merge-file order, 49406 ``<start_of_text>``, 49407 ``<end_of_text>``.
    """

    def __init__(
        self,
        vocab_path: str | Path | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        cache_size: int = 1_000_000,
    ) -> None:
        _check_context_length(context_length)
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        self._vocab_path = path
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is the "#version" header.
        merge_lines = lines[1 : 1 + _NUM_MERGES]
        if len(merge_lines) < _NUM_MERGES:
            raise ValueError(
                f"{path}: expected at least {_NUM_MERGES} BPE merges, found {len(merge_lines)}"
            )
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(merge_lines, start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: a merge line needs two symbols, got {line!r}")
            merges.append((parts[0], parts[1]))

        symbols = list(_BASE_SYMBOLS) + [s + _END_OF_WORD for s in _BASE_SYMBOLS]
        symbols += [left + right for left, right in merges]
        symbols += [SOT_TOKEN, EOT_TOKEN]
        self._symbol_to_id: dict[str, int] = {s: i for i, s in enumerate(symbols)}
        self._id_to_symbol: list[str] = symbols
        self._merge_rank: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.vocab_size = len(symbols)
        self.sot_token_id = self._symbol_to_id[SOT_TOKEN]
        self.eot_token_id = self._symbol_to_id[EOT_TOKEN]
        self.context_length = context_length
        self._cache_size = cache_size
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._cache_lock = threading.Lock()

    # -- BPE ---------------------------------------------------------------------------------

    def _bpe(self, symbols_text: str) -> list[str]:
        """Apply the merges to one pre-token already written in the byte alphabet.

        Repeatedly merges the adjacent pair with the lowest merge rank (every non-overlapping
        occurrence, left to right) until no adjacent pair is a known merge.
        """
        parts = list(symbols_text[:-1])
        parts.append(symbols_text[-1] + _END_OF_WORD)
        rank = self._merge_rank
        while len(parts) > 1:
            best = None
            best_rank = len(rank)
            for pair in zip(parts, parts[1:], strict=False):
                r = rank.get(pair)
                if r is not None and r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            left, right = best
            merged: list[str] = []
            i = 0
            last = len(parts) - 1
            while i <= last:
                if i < last and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _pretoken_ids(self, pretoken: str) -> list[int]:
        if pretoken == SOT_TOKEN:
            return [self.sot_token_id]
        if pretoken == EOT_TOKEN:
            return [self.eot_token_id]
        symbols_text = pretoken.encode("utf-8").decode("latin-1").translate(_BYTES_TO_SYMBOLS)
        to_id = self._symbol_to_id
        return [to_id[s] for s in self._bpe(symbols_text)]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one space-free word of cleaned text (cached)."""
        ids = self._word_cache.get(word)
        if ids is not None:
            return ids
        out: list[int] = []
        for pretoken in _SPLIT_PATTERN.findall(word):
            out.extend(self._pretoken_ids(pretoken))
        ids = tuple(out)
        with self._cache_lock:
            if len(self._word_cache) >= self._cache_size:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids

    # -- public API --------------------------------------------------------------------------

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text`` without start/end tokens.

        Args:
            text: any Unicode string.
            max_tokens: stop once at least this many ids are produced (the result may be
                longer by the ids of the last word; callers truncate). ``None``: no limit.
        Returns:
            list of ints in [0, vocab_size).
        Raises:
            TypeError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if _is_fix_text_invariant(text):
            words = text.lower().split()
        else:
            words = clean_text(text).split(" ")
        ids: list[int] = []
        cache = self._word_cache
        for word in words:
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._word_ids(word)
            ids.extend(word_ids)
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        return ids

    def decode(
        self, ids: Iterable[int] | torch.Tensor | np.ndarray, skip_special_tokens: bool = True
    ) -> str:
        """Text for a sequence of token ids.

        Args:
            ids: 1-D ids, e.g. ``encode(text)`` or one row of ``tokenize(...)``.
            skip_special_tokens: drop ``<start_of_text>`` / ``<end_of_text>`` and ignore
                everything after the last ``<end_of_text>`` (the zero padding of a
                tokenize row). False: decode every id, padding included.
        Returns:
            The cleaned (lower-cased, whitespace-collapsed) text, with a space at every
            word boundary BPE saw (so "a, b" comes back as "a , b"); stripped. Byte
            sequences that are not valid UTF-8 (a multi-byte character cut by truncation)
            become U+FFFD.
        Raises:
            ValueError: an id outside [0, vocab_size), or ``ids`` not 1-D.
        """
        if hasattr(ids, "detach"):  # a torch tensor
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise ValueError(f"decode expects 1-D ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        id_list = [int(i) for i in ids]
        for i in id_list:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside [0, {self.vocab_size})")
        if skip_special_tokens:
            if self.eot_token_id in id_list:
                cut = len(id_list) - 1 - id_list[::-1].index(self.eot_token_id)
                id_list = id_list[:cut]
            special = (self.sot_token_id, self.eot_token_id)
            id_list = [i for i in id_list if i not in special]
        chunks: list[bytes] = []
        for i in id_list:
            symbol = self._id_to_symbol[i]
            if i in (self.sot_token_id, self.eot_token_id):
                chunks.append(f" {symbol} ".encode())
            elif symbol.endswith(_END_OF_WORD):
                chunks.append(bytes(_SYMBOL_TO_BYTE[c] for c in symbol[: -len(_END_OF_WORD)]))
                chunks.append(b" ")
            else:
                chunks.append(bytes(_SYMBOL_TO_BYTE[c] for c in symbol))
        text = b"".join(chunks).decode("utf-8", errors="replace")
        # Cleaned text holds no whitespace but single spaces, so collapsing only undoes the
        # double spaces around special tokens and the trailing word-end space.
        return " ".join(text.split())

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Tokenize captions into fixed-length rows.

        Args:
            texts: one string or a sequence of strings (N of them).
            context_length: row length; default ``self.context_length`` (77).
        Returns:
            torch.int64 tensor [N, context_length]: ``<start_of_text>`` (49406), the text's
            ids, ``<end_of_text>`` (49407), then zeros. Text that does not fit is truncated
            and the last position is set to ``<end_of_text>``.
        Raises:
            TypeError: an element is not a str (its index is named).
            ValueError: context_length < 2.
        """
        if context_length is None:
            context_length = self.context_length
        _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        room = context_length - 2
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be str, got {type(text).__name__}")
            ids = self.encode(text, max_tokens=room)
            n = min(len(ids), room)
            out[row, 1 : 1 + n] = ids[:n]
            out[row, 1 + n] = self.eot_token_id
        import torch

        return torch.from_numpy(out)

    # -- the pipeline's interface (shared by every text tower's tokenizer) ---------------------

    @property
    def pad_id(self) -> int:
        """Id that right-pads rows of :meth:`token_ids` to a common width (CLIP pads with 0)."""
        return 0

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Variable-length ids per text, ready for ``encode_text`` once right-padded with
        :attr:`pad_id`: ``<start_of_text>``, the text's ids, ``<end_of_text>``, at most
        ``context_length`` ids (truncated as :meth:`__call__` truncates). No torch needed.

        Raises:
            TypeError: an element is not a str (its index is named).
        """
        room = self.context_length - 2
        out: list[list[int]] = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] must be str, got {type(text).__name__}")
            ids = self.encode(text, max_tokens=room)[:room]
            out.append([self.sot_token_id, *ids, self.eot_token_id])
        return out

    def with_context_length(self, context_length: int) -> Tokenizer:
        """This vocabulary with another default row length; shares the merge tables and the
        word cache (cheap)."""
        _check_context_length(context_length)
        if context_length == self.context_length:
            return self
        twin = object.__new__(Tokenizer)
        twin.__dict__.update(self.__dict__)
        twin.context_length = context_length
        return twin

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # Sent to worker processes by value would copy ~50k merges and a lock (not picklable);
        # each process builds the shipped vocabulary once instead.
        if self._vocab_path != DEFAULT_VOCAB_PATH:
            return _tokenizer_for, (str(self._vocab_path), self.context_length)
        return _tokenizer_for, (None, self.context_length)


def _check_context_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(
            f"context_length must be >= 2 (room for <start_of_text> and <end_of_text>), "
            f"got {context_length}"
        )


@lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The process-wide tokenizer on the shipped vocabulary (built on first use, ~0.3 s)."""
    return Tokenizer()


@lru_cache(maxsize=8)
def _vocab_tokenizer(vocab_path: str) -> Tokenizer:
    return Tokenizer(vocab_path)


def _tokenizer_for(vocab_path: str | None, context_length: int) -> Tokenizer:
    """The process-wide tokenizer of a vocabulary (None: the shipped one) at a row length."""
    base = default_tokenizer() if vocab_path is None else _vocab_tokenizer(vocab_path)
    return base.with_context_length(context_length)


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
) -> torch.Tensor:
    """Tokenize captions with CLIP's BPE; see :meth:`Tokenizer.__call__`.

    Returns:
        torch.int64 tensor [N, context_length] (N = 1 for a single string).
    """
    return default_tokenizer()(texts, context_length=context_length)
