"""Embed stage: one model per long-lived worker (a Ray actor, a local embedding process), fed
uint8 model inputs and token ids made by the CPU tasks.

    decode (model input, uint8) + tokenize (ids) -> EmbedStage -> write

Per batch (one shard) the stage

- views the ``_pixels`` column as uint8 [M, S, S, 3] without copying (the rows' bytes lie
  back to back in the Arrow buffer), and sends it to the device in chunks of
  ``inference_batch``: on CUDA each chunk is staged in one of two pinned host buffers and
  copied on a side stream while the previous chunk computes, then normalised on the device
  (a quarter of float32's bytes cross the bus);
- pads token ids per chunk of similar length (captions sorted by length, vectorised), so a
  short caption costs what its length costs;
- encodes both sides under autocast (fp16 on GPU by default), keeps results on the device
  and copies them back once per batch;
- scores moderation (pipeline/stages/moderate.py) on the unit embeddings it just made, and the
  image-caption cosine ``clip_score``.

Rows that come with a stored JPEG in ``_jpeg`` instead (the reread path with
``embed.stored_decode: device``) are decoded, resized and cropped on the stage's device
(:mod:`clip_model.device_decode`), and get their ``image_thumb`` there when thumbnails are on; a
file that does not decode gets status ``preprocess_error``, as on the CPU.

Adds ``image_embedding``, ``text_embedding`` (fixed_size_list<float16>[D], unit norm),
``clip_score`` (float32), ``model``, ``unsafe_score``/``unsafe_concept``/``unsafe_source``;
drops ``_pixels``, ``_jpeg`` and ``_tokens``. A row without pixels (failed upstream) still gets its text
embedding; a row without a caption gets no text embedding; missing values are null.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from clip_model.config import PreprocessConfig
from pipeline import schema as S
from pipeline.config import EmbedConfig
from pipeline.stages.base import Stage
from pipeline.stages.moderate import Moderation

log = logging.getLogger("clipcurate.embed")

RANDOM_INIT_SEED = 0


def load_model(
    name: str, pretrained: str | None, device: Any = "cpu", text_model: str | None = None
) -> tuple[Any, PreprocessConfig]:
    """``clip_model.create_model`` in fp32; without weights the random init is seeded with
    :data:`RANDOM_INIT_SEED` (on CPU, then moved), so every worker and the driver build the
    same model and a job's embeddings stay comparable with each other. ``text_model``: a
    folder with a text tower to pair with the image tower (M-CLIP), as in create_model."""
    import torch

    import clip_model

    if pretrained is not None:
        return clip_model.create_model(name, pretrained, device=device, precision="fp32", text_model=text_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, pp = clip_model.create_model(name, None, device="cpu", precision="fp32", text_model=text_model)
    return model.to(device), pp


def model_id(model: Any) -> str:
    """``"<architecture>@sha256:<hex>"`` for a clip_model model, ``"<architecture>@random-init"``
    for the seeded random weights of :func:`load_model`."""
    sha = getattr(model, "weights_sha256", None)
    return f"{model.name}@sha256:{sha}" if sha else f"{model.name}@random-init"


def embed_dim(model: Any) -> int:
    """The model's embedding size D."""
    dim = getattr(model, "embed_dim", None)
    return int(dim) if dim is not None else int(model.text_projection.shape[1])


# ------------------------------------------------------------------------ Arrow -> arrays


def _valid_chunks(col: pa.Array | pa.ChunkedArray) -> Iterator[tuple[int, np.ndarray, np.ndarray, Any]]:
    """Per chunk of a binary column with a non-null value: (its first row's index in the
    column, its non-null rows int64 (chunk-relative), its value offsets int32 [n + 1], its data
    buffer)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    base = 0
    for ch in chunks:
        n = len(ch)
        if n and ch.null_count < n:
            idx = np.flatnonzero(ch.is_valid().to_numpy(zero_copy_only=False))
            _, offsets_buf, data_buf = ch.buffers()
            offs = np.frombuffer(offsets_buf, np.int32, count=n + 1, offset=ch.offset * 4)
            yield base, idx, offs, data_buf
        base += n


def stacked_pixels(col: pa.Array | pa.ChunkedArray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices int64 [M], uint8 [M, size, size, 3]) of the non-null values of a binary
    column of model inputs. The values of a chunk lie back to back in its data buffer (a null
    takes no bytes), so each chunk is a zero-copy, read-only view of it."""
    nbytes = size * size * 3
    rows: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    for base, idx, offs, data_buf in _valid_chunks(col):
        lengths = offs[idx + 1] - offs[idx]
        if (lengths != nbytes).any():
            bad = int(idx[np.flatnonzero(lengths != nbytes)[0]])
            raise ValueError(f"model input of row {base + bad} has {int(offs[bad + 1] - offs[bad])} "
                             f"bytes, expected {nbytes} ({size}x{size}x3)")
        start, end = int(offs[idx[0]]), int(offs[idx[-1] + 1])
        if end - start == len(idx) * nbytes:
            arr = np.frombuffer(data_buf, np.uint8, count=end - start, offset=start)
        else:  # null slots with bytes (legal in Arrow, never written by us): gather
            arr = np.concatenate([np.frombuffer(data_buf, np.uint8, count=nbytes, offset=int(o))
                                  for o in offs[idx]])
        rows.append(idx + base)
        parts.append(arr.reshape(len(idx), size, size, 3))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, size, size, 3), np.uint8)
    if len(parts) == 1:
        return rows[0].astype(np.int64), parts[0]
    return np.concatenate(rows).astype(np.int64), np.concatenate(parts)


def binary_views(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(row indices int64 [M], each non-null value as a read-only uint8 view of its Arrow
    buffer, no copy) of a binary column."""
    rows: list[np.ndarray] = []
    views: list[np.ndarray] = []
    for base, idx, offs, data_buf in _valid_chunks(col):
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        data.setflags(write=False)  # Arrow's memory: nothing downstream may write into it
        rows.append(idx + base)
        views += [data[offs[i] : offs[i + 1]] for i in idx]
    return (np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)), views


def token_chunks(col: pa.Array | pa.ChunkedArray, pad_id: int, step: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The non-empty token lists of a ``list<int32>`` column, sorted by length and cut into
    chunks of ``step``: per chunk (row indices int64 [k], ids int64 [k, longest in chunk]
    right-padded with ``pad_id``). Vectorised: no per-row Python."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if n == 0:
        return []
    offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    lengths = offsets[1:] - offsets[:-1]
    valid = arr.is_valid().to_numpy(zero_copy_only=False) & (lengths > 0)
    rows = np.flatnonzero(valid)
    order = rows[np.argsort(lengths[rows], kind="stable")]
    out = []
    for s in range(0, len(order), step):
        idx = order[s : s + step]
        lens = lengths[idx]
        ids = np.full((len(idx), int(lens.max())), pad_id, np.int64)
        r = np.repeat(np.arange(len(idx)), lens)
        c = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        ids[r, c] = values[np.repeat(offsets[idx], lens) + c]
        out.append((idx, ids))
    return out


# ------------------------------------------------------------------------------- the stage


def cpu_has_native_bf16() -> bool:
    """True where this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), so torch's
    bf16 matmuls run at about twice the fp32 rate; elsewhere bf16 is emulated and slower."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision an embedding worker runs: ``precision`` unless it is "auto", which is
    fp16 on CUDA, bf16 on a CPU with native bf16 and fp32 on other CPUs.

    bf16 autocast keeps the embeddings within cosine 0.9999 of fp32 (tiny-synthetic:
    0.99997 image / 0.99993 text; ViT-B-32 at random weights 0.99994 / 0.99995), below the
    float16 rounding the Parquet stores them with, and halves the encoder's CPU time
    (bench/RESULTS.md); ``embed.precision=fp32`` turns it off."""
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _check_device_decode(device: Any) -> None:
    """Fail at start-up, not row by row, where this worker cannot decode JPEGs on ``device``
    (no TorchCodec, or no nvJPEG for the device)."""
    import io

    from PIL import Image

    from clip_model.device_decode import decode_jpegs

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buf, "JPEG")
    try:
        (got,) = decode_jpegs([np.frombuffer(buf.getvalue(), np.uint8)], device)
    except ImportError as e:
        raise RuntimeError(f"embed.stored_decode is 'device', but {e}") from e
    if isinstance(got, str):
        raise RuntimeError(f"embed.stored_decode is 'device', but this worker cannot decode a JPEG on {device}: {got}")


@dataclass
class EmbedStage(Stage):
    """Model stage: ``_pixels``/``_tokens`` -> embeddings, ``clip_score``, moderation scores.

    ``preprocess`` is what the decode task made the inputs with; ``setup`` checks that the
    loaded weights expect the same, so a mismatch fails at start-up instead of producing
    quietly wrong embeddings. ``pad_id``: the tokenizer's. ``moderation``: prepared in the
    driver (None: no moderation columns are scored, they stay null).
    """

    stateful: ClassVar[bool] = True

    cfg: EmbedConfig = field(default_factory=EmbedConfig)
    preprocess: PreprocessConfig | None = None
    pad_id: int = 0
    moderation: Moderation | None = None
    # Make ``image_thumb`` for the rows decoded here (dedup's pixel check is on).
    thumbnails: bool = False

    def __post_init__(self) -> None:
        self._model: Any = None
        self._device: Any = None
        self._autocast: Any = None
        self._model_id = ""
        self._worker = ""
        self._pinned: list[Any] = []
        self._copy_stream: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Travels to its worker without a loaded model or device state.
        state = self.__dict__.copy()
        state.update(_model=None, _device=None, _autocast=None, _pinned=[], _copy_stream=None)
        return state

    @property
    def embed_dim(self) -> int:
        return embed_dim(self._model)

    def setup(self) -> None:
        import torch

        if self._model is not None:
            return
        if self.resources.num_gpus > 0:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"embed stage asked for {self.resources.num_gpus} GPU(s) per worker but this "
                    "worker sees no CUDA device"
                )
            self._device = torch.device("cuda")
        else:
            self._device = torch.device("cpu")
            # A CPU worker gets num_cpus cores; more torch threads would only contend.
            torch.set_num_threads(max(1, int(round(self.resources.num_cpus or 1))))
        if self.cfg.stored_decode == "device":
            _check_device_decode(self._device)
            if self._device.type == "cpu":
                log.warning("embed.stored_decode is 'device' but this embedding worker runs on the CPU: "
                            "it decodes and resizes there in float32, several times slower than the CPU "
                            "workers' path (stored_decode 'cpu'); the option is meant for GPUs")
        precision = resolve_precision(self.cfg.precision, self._device.type)
        self._autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        model, pp = load_model(self.cfg.model, self.cfg.pretrained, self._device, self.cfg.text_model)
        model.eval()
        if self.preprocess is not None and pp != self.preprocess:
            raise ValueError(
                f"{self.cfg.model} ({self.cfg.pretrained}) expects preprocessing {pp}, but the "
                f"decode task was built with {self.preprocess}"
            )
        self.preprocess = pp
        self._model = model
        self._model_id = model_id(model)
        self._worker = f"{socket.gethostname()}:{os.getpid()}"
        if self._device.type == "cuda":
            s = pp.image_size
            step = self.cfg.inference_batch
            self._pinned = [torch.empty((step, s, s, 3), dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._copy_stream = torch.cuda.Stream()
        log.info(
            "embed worker %s loaded %s on %s (%s)", self._worker, self._model_id, self._device, precision
        )

    def _forward(self, fn: Any, x: Any) -> Any:
        import torch

        if self._autocast is not None:
            with torch.autocast(self._device.type, dtype=self._autocast):
                return fn(x).float()
        return fn(x).float()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [M, S, S, 3] (may be a read-only view) -> float32 [M, D] unit-norm image
        embeddings."""
        import torch
        import torch.nn.functional as F

        from clip_model.transform import normalize_uint8

        m = pixels.shape[0]
        if m == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        step = self.cfg.inference_batch
        outs = []
        with torch.inference_mode():
            if self._device.type != "cuda":
                for s in range(0, m, step):
                    x = normalize_uint8(pixels[s : s + step], self.preprocess)
                    outs.append(self._forward(self._model.encode_image, x))
            else:
                compute = torch.cuda.current_stream()
                copied: list[Any] = [None, None]
                for k, s in enumerate(range(0, m, step)):
                    buf = self._pinned[k % 2]
                    if copied[k % 2] is not None:
                        copied[k % 2].synchronize()  # this buffer's last copy has left it
                    chunk = pixels[s : s + step]
                    host = buf[: len(chunk)]
                    host.numpy()[...] = chunk
                    with torch.cuda.stream(self._copy_stream):
                        dev = host.to(self._device, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(self._copy_stream)
                    copied[k % 2] = done
                    compute.wait_event(done)
                    dev.record_stream(compute)
                    x = normalize_uint8(dev, self.preprocess)
                    outs.append(self._forward(self._model.encode_image, x))
            y = F.normalize(torch.cat(outs), dim=-1)
            return y.cpu().numpy()

    def encode_jpegs(self, datas: list[np.ndarray]) -> tuple[np.ndarray, list[str | None], np.ndarray | None]:
        """Stored JPEG files (1-D uint8 arrays) -> (float32 [M, D] unit-norm image embeddings,
        zero where a file did not decode; per file None or why it did not decode; uint8
        [M, T, T, 3] thumbnails (T = pipeline.thumbnails.THUMB_SIDE) when ``thumbnails``,
        else None). Decoded, resized and cropped on the stage's device, ``inference_batch``
        files at a time."""
        import torch
        import torch.nn.functional as F

        from clip_model.device_decode import decode_jpegs, resize_crop_images, thumbnails
        from clip_model.transform import normalize_uint8
        from pipeline.thumbnails import THUMB_SIDE

        m = len(datas)
        out = np.zeros((m, self.embed_dim), np.float32)
        thumbs = np.zeros((m, THUMB_SIDE, THUMB_SIDE, 3), np.uint8) if self.thumbnails else None
        reasons: list[str | None] = [None] * m
        done: list[np.ndarray] = []
        ys: list[Any] = []
        small: list[Any] = []
        step = self.cfg.inference_batch
        with torch.inference_mode():
            for s in range(0, m, step):
                decoded = decode_jpegs(datas[s : s + step], self._device)
                good = [j for j, d in enumerate(decoded) if not isinstance(d, str)]
                for j, d in enumerate(decoded):
                    if isinstance(d, str):
                        reasons[s + j] = d
                if not good:
                    continue
                px = resize_crop_images([decoded[j] for j in good], self.preprocess)  # type: ignore[misc,arg-type]
                ys.append(self._forward(self._model.encode_image, normalize_uint8(px, self.preprocess)))
                if thumbs is not None:
                    small.append(thumbnails(px, THUMB_SIDE))
                done.append(np.asarray(good, np.int64) + s)
            if ys:  # back to the host once per batch
                rows = np.concatenate(done)
                out[rows] = F.normalize(torch.cat(ys), dim=-1).cpu().numpy()
                if thumbs is not None:
                    thumbs[rows] = torch.cat(small).cpu().numpy()
        return out, reasons, thumbs

    def encode_token_chunks(self, chunks: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [n, D] unit-norm text embeddings, bool [n] has a text embedding) from
        :func:`token_chunks`' output over n rows."""
        import torch
        import torch.nn.functional as F

        dim = self.embed_dim
        out = np.zeros((n, dim), np.float32)
        has = np.zeros(n, bool)
        if not chunks:
            return out, has
        ys = []
        with torch.inference_mode():
            for _, ids in chunks:
                t = torch.from_numpy(ids).to(self._device, non_blocking=True)
                ys.append(self._forward(self._model.encode_text, t))
            y = F.normalize(torch.cat(ys), dim=-1).cpu().numpy()
        rows = np.concatenate([idx for idx, _ in chunks])
        out[rows] = y
        has[rows] = True
        return out, has

    def encode_tokens(self, tokens: list[list[int]]) -> np.ndarray:
        """Token id lists (any lengths) -> float32 [M, D] unit-norm text embeddings."""
        col = pa.array(tokens, pa.list_(pa.int32()))
        out, _ = self.encode_token_chunks(token_chunks(col, self.pad_id, self.cfg.inference_batch), len(tokens))
        return out

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()
        n = batch.num_rows
        dim = self.embed_dim
        img = np.zeros((n, dim), np.float32)
        has_img = np.zeros(n, bool)
        if S.PIXELS in batch.column_names:
            rows, pixels = stacked_pixels(batch.column(S.PIXELS), self.preprocess.image_size)  # type: ignore[union-attr]
            if len(rows):
                img[rows] = self.encode_pixels(pixels)
                has_img[rows] = True
        status_changed = thumbs_made = None
        if S.JPEG in batch.column_names:
            rows, datas = binary_views(batch.column(S.JPEG))
            if len(rows):
                emb, reasons, thumbs = self.encode_jpegs(datas)
                ok = np.array([r is None for r in reasons])
                img[rows[ok]] = emb[ok]
                has_img[rows[ok]] = True
                if not ok.all():
                    statuses, errors = S.column_list(batch, S.STATUS), S.column_list(batch, S.ERROR)
                    for r, why in zip(rows[~ok], (w for w in reasons if w is not None), strict=True):
                        statuses[r] = S.PREPROCESS_ERROR
                        errors[r] = f"stored JPEG did not decode on {self._device.type}: {why}"
                    status_changed = (statuses, errors)
                if thumbs is not None:
                    thumbs_made = S.column_list(batch, S.IMAGE_THUMB)
                    for r, t in zip(rows[ok], thumbs[ok], strict=True):
                        thumbs_made[r] = t.tobytes()
        if S.TOKENS in batch.column_names:
            chunks = token_chunks(batch.column(S.TOKENS), self.pad_id, self.cfg.inference_batch)
            txt, has_txt = self.encode_token_chunks(chunks, n)
        else:
            txt, has_txt = np.zeros((n, dim), np.float32), np.zeros(n, bool)

        both = has_img & has_txt
        score = np.where(both, (img * txt).sum(axis=1), np.nan).astype(np.float32)
        out = S.drop_if_present(batch, [S.PIXELS, S.JPEG, S.TOKENS])
        if status_changed is not None:
            out = S.set_column(out, S.STATUS, pa.array(status_changed[0], pa.string()))
            out = S.set_column(out, S.ERROR, pa.array(status_changed[1], pa.string()))
        if thumbs_made is not None:
            out = S.set_column(out, S.IMAGE_THUMB, pa.array(thumbs_made, pa.binary()))
        out = S.set_column(out, S.IMAGE_EMBEDDING, S.embedding_array(img, has_img))
        out = S.set_column(out, S.TEXT_EMBEDDING, S.embedding_array(txt, has_txt))
        out = S.set_column(out, S.CLIP_SCORE, pa.array(score, pa.float32(), mask=~both))
        out = S.set_column(out, S.MODEL, pa.array([self._model_id] * n, pa.string()))
        if self.moderation is not None:
            out = self.moderation.annotate(out, img, has_img, txt, has_txt)
        if self.cfg.debug_worker_column:
            out = S.set_column(out, S.EMBED_WORKER, pa.array([self._worker] * n, pa.string()))
        return out


__all__ = [
    "RANDOM_INIT_SEED",
    "EmbedStage",
    "embed_dim",
    "binary_views",
    "load_model",
    "model_id",
    "stacked_pixels",
    "token_chunks",
]
