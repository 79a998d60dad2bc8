"""Preprocess and embed: the CPU stage that prepares model input, and the model actors.

    shard -> PreprocessStage (CPU tasks) -> EmbedStage (actor pool, one model each) -> ...

:class:`PreprocessStage` turns each ``ok`` row's stored image into the model's uint8 input
(``resize_crop_uint8``: resize, center crop, RGB; the exact arithmetic the weights expect) and
each caption into its token ids, so the actors never wait on JPEG decoding or BPE. The shard
stage drops image bytes from the rows it passes on, so images are read back from the committed
tar (one read per shard per batch); rows that still carry an ``image`` column (tests, the
calibration sample) use it directly.

:class:`EmbedStage` holds one CLIP model per actor (``clip_model.create_model``), normalises the
uint8 batch on the model's device (a quarter of the bytes of float32 cross to the GPU) and
encodes images and captions in chunks of ``inference_batch``. Captions are sorted by token
count and each chunk is padded only to its own longest caption: ``CLIP.encode_text`` never
computes positions after a batch's last end-of-text token, so short captions cost what their
length costs instead of the full 77 positions.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clip_model.config import PreprocessConfig
from clip_model.job_data import read_tar_images
from pipeline import schema as S
from pipeline.config import EmbedConfig, StorageConfig
from pipeline.stages.base import Stage
from pipeline.storage import Storage

log = logging.getLogger("clipcurate.embed")



def resolve_preprocess(model: str, pretrained: str | None) -> PreprocessConfig:
    """The image preprocessing of ``model`` with weights ``pretrained``, without loading them
    when the registry knows it (registered tags, random weights). Weights given as a path are
    read to find it (the file may state it, e.g. a Hugging Face folder)."""
    import clip_model
    from clip_model import pretrained as registry

    cfg = clip_model.get_model_config(model)
    if cfg is not None:
        if pretrained is None:
            return PreprocessConfig(image_size=cfg.vision.image_size)
        entry = registry.get_pretrained_entry(model, pretrained)
        if entry is not None:
            return entry.preprocess
    loaded, pp = clip_model.create_model(model, pretrained, device="cpu")
    del loaded
    return pp


RANDOM_INIT_SEED = 0


def load_model(name: str, pretrained: str | None, device: Any = "cpu") -> tuple[Any, PreprocessConfig]:
    """``clip_model.create_model`` in fp32; without weights the random init is seeded with
    :data:`RANDOM_INIT_SEED` (on CPU, then moved), so every actor and the driver build the
    same model and a job's embeddings stay comparable with each other."""
    import torch

    import clip_model

    if pretrained is not None:
        return clip_model.create_model(name, pretrained, device=device, precision="fp32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, pp = clip_model.create_model(name, None, device="cpu", precision="fp32")
    return model.to(device), pp


def model_id(model: Any) -> str:
    """``"<architecture>@sha256:<hex>"`` for a clip_model model, ``"<architecture>@random-init"``
    for the seeded random weights of :func:`load_model`."""
    sha = getattr(model, "weights_sha256", None)
    return f"{model.name}@sha256:{sha}" if sha else f"{model.name}@random-init"


def _set(table: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def _col(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


@dataclass
class PreprocessStage(Stage):
    """CPU stage: stored image -> ``_pixels`` (uint8 [S, S, 3] bytes), caption -> ``_tokens``.

    ``shard_folder``: where the shard tars are (the shard stage's output folder); needed unless
    the rows carry an ``image`` column. An ``ok`` row whose image is not in its tar becomes
    ``image_missing``; one Pillow cannot decode becomes ``preprocess_error``. Both keep their
    caption tokens. The ``image`` column, if any, is dropped. With ``thumbnails`` each decoded
    row also gets ``image_thumb`` (:func:`pipeline.pixel_check.thumbnail`, for dedup's pixel
    check).
    """

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    shard_folder: str | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)
    context_length: int = 77
    thumbnails: bool = False
    # The model's own tokenizer (``model.tokenizer``: torch-free, picklable); None: CLIP's BPE
    # at ``context_length``.
    tokenizer: Any = None

    def _images(self, batch: pa.Table, ok: list[int]) -> dict[int, bytes | None]:
        if S.IMAGE in batch.column_names:
            col = batch.column(S.IMAGE)
            return {i: col[i].as_py() for i in ok}
        if self.shard_folder is None:
            raise ValueError("PreprocessStage needs shard_folder when rows carry no image column")
        keys, shards = _col(batch, S.KEY), _col(batch, S.SHARD)
        by_shard: dict[str, list[int]] = {}
        for i in ok:
            by_shard.setdefault(shards[i], []).append(i)
        store = Storage(self.shard_folder, self.storage)
        out: dict[int, bytes | None] = {}
        for shard, rows in by_shard.items():
            found = read_tar_images(store.read_bytes(f"{shard}.tar"), {keys[i] for i in rows})
            for i in rows:
                out[i] = found.get(keys[i])
        return out

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        from clip_model.tokenizer import default_tokenizer
        from clip_model.transform import resize_crop_uint8
        from pipeline.pixel_check import thumbnail

        n = batch.num_rows
        statuses, errors = _col(batch, S.STATUS), _col(batch, S.ERROR)
        ok = [i for i in range(n) if statuses[i] == S.OK]
        pixels: list[bytes | None] = [None] * n
        thumbs: list[bytes | None] = [None] * n
        try:
            images = self._images(batch, ok)
        except (OSError, tarfile.TarError) as e:
            # A shard's tar cannot be read: every ok row of the batch records why.
            images = {}
            for i in ok:
                statuses[i], errors[i] = "image_missing", f"shard tar unreadable: {e}"
            ok = []
        for i in ok:
            data = images.get(i)
            if data is None:
                statuses[i], errors[i] = "image_missing", "image not found in the shard tar"
                continue
            try:
                with Image.open(io.BytesIO(data)) as img:
                    pixels[i] = resize_crop_uint8(img, self.preprocess).tobytes()
                    if self.thumbnails:
                        thumbs[i] = thumbnail(img)
            except Exception as e:  # Pillow raises many types for bad data; the row records it
                statuses[i], errors[i] = "preprocess_error", f"{type(e).__name__}: {e}"

        captions = _col(batch, S.CAPTION)
        with_text = [i for i in range(n) if isinstance(captions[i], str)]
        token_rows: list[list[int] | None] = [None] * n
        if with_text:
            tok = self.tokenizer or default_tokenizer().with_context_length(self.context_length)
            ids = tok.token_ids([captions[i] for i in with_text])
            for j, i in enumerate(with_text):
                token_rows[i] = ids[j]

        out = batch.drop_columns([c for c in (S.IMAGE,) if c in batch.column_names])
        out = _set(out, S.STATUS, pa.array(statuses, pa.string()))
        out = _set(out, S.ERROR, pa.array(errors, pa.string()))
        out = _set(out, S.PIXELS, pa.array(pixels, pa.binary()))
        if self.thumbnails:
            out = _set(out, S.IMAGE_THUMB, pa.array(thumbs, pa.binary()))
        return _set(out, S.TOKENS, pa.array(token_rows, pa.list_(pa.int32())))


def embedding_array(values: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """``fixed_size_list<float16>[D]`` from float [N, D] values; rows where ``valid`` is False
    are null."""
    n, dim = values.shape
    flat = pa.array(values.astype(np.float16, copy=False).reshape(-1))
    mask = pa.array(~valid.astype(bool)) if n else None
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


@dataclass
class EmbedStage(Stage):
    """Actor stage: ``_pixels``/``_tokens`` -> ``image_embedding``, ``text_embedding``,
    ``clip_score``, ``model``.

    Embeddings are unit norm (normalised in float32, then stored as float16); ``clip_score`` is
    the float32 cosine of the two. A row without an image (failed upstream) still gets its text
    embedding and keeps its status; a row without a caption gets no text embedding. Both are
    null when missing, and so is ``clip_score``.

    ``preprocess`` is what PreprocessStage used; ``setup`` checks that the loaded weights expect
    the same, so a mismatch fails at start-up instead of producing quietly wrong embeddings.
    """

    cfg: EmbedConfig = field(default_factory=EmbedConfig)
    preprocess: PreprocessConfig | None = None

    def __post_init__(self) -> None:
        self._model: Any = None
        self._device: Any = None
        self._autocast: Any = None
        self._model_id = ""
        self._worker = ""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    @property
    def embed_dim(self) -> int:
        return int(self._model.embed_dim)

    def setup(self) -> None:
        import torch


        if self._model is not None:
            return
        if self.resources.num_gpus > 0:
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"embed stage asked for {self.resources.num_gpus} GPU(s) per actor but this "
                    "worker sees no CUDA device"
                )
            self._device = torch.device("cuda")
        else:
            self._device = torch.device("cpu")
            # Ray gives a CPU actor num_cpus cores; more torch threads would only contend.
            torch.set_num_threads(max(1, int(round(self.resources.num_cpus or 1))))
        precision = self.cfg.precision
        if precision == "auto":
            precision = "fp16" if self._device.type == "cuda" else "fp32"
        self._autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        model, pp = load_model(self.cfg.model, self.cfg.pretrained, self._device)
        if self.preprocess is not None and pp != self.preprocess:
            raise ValueError(
                f"{self.cfg.model} ({self.cfg.pretrained}) expects preprocessing {pp}, but the "
                f"preprocess stage was built with {self.preprocess}"
            )
        self.preprocess = pp
        self._model = model
        self._model_id = model_id(model)
        self._worker = f"{socket.gethostname()}:{os.getpid()}"
        log.info("embed actor %s loaded %s on %s", self._worker, self._model_id, self._device)

    def _run(self, fn: Any, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            if self._autocast is not None:
                with torch.autocast(self._device.type, dtype=self._autocast):
                    y = fn(x)
            else:
                y = fn(x)
            return F.normalize(y.float(), dim=-1).cpu().numpy()

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [M, S, S, 3] -> float32 [M, D] unit-norm image embeddings."""
        from clip_model.transform import normalize_uint8

        dim = self.embed_dim
        out = np.empty((pixels.shape[0], dim), np.float32)
        step = self.cfg.inference_batch
        for s in range(0, pixels.shape[0], step):
            x = normalize_uint8(pixels[s : s + step], self.preprocess, self._device)
            out[s : s + step] = self._run(self._model.encode_image, x)
        return out

    def encode_tokens(self, tokens: list[list[int]]) -> np.ndarray:
        """Token id lists (<start_of_text> ... <end_of_text>, any lengths) -> float32 [M, D]
        unit-norm text embeddings. Chunks of similar length are padded to their own maximum."""
        import torch

        out = np.empty((len(tokens), self.embed_dim), np.float32)
        order = np.argsort([len(t) for t in tokens], kind="stable")
        step = self.cfg.inference_batch
        pad = int(self._model.tokenizer.pad_id)
        for s in range(0, len(order), step):
            idx = order[s : s + step]
            width = max(len(tokens[i]) for i in idx)
            ids = np.full((len(idx), width), pad, np.int64)
            for r, i in enumerate(idx):
                ids[r, : len(tokens[i])] = tokens[i]
            out[idx] = self._run(self._model.encode_text, torch.from_numpy(ids).to(self._device))
        return out

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self._model is None:
            self.setup()
        n = batch.num_rows
        dim = self.embed_dim
        size = self.preprocess.image_size  # type: ignore[union-attr]
        img = np.zeros((n, dim), np.float32)
        txt = np.zeros((n, dim), np.float32)
        has_img = np.zeros(n, bool)
        has_txt = np.zeros(n, bool)

        if S.PIXELS in batch.column_names:
            pix_col = batch.column(S.PIXELS)
            rows = np.flatnonzero(pc.is_valid(pix_col).to_numpy(zero_copy_only=False))
            if len(rows):
                stacked = np.empty((len(rows), size, size, 3), np.uint8)
                for r, i in enumerate(rows):
                    stacked[r] = np.frombuffer(pix_col[int(i)].as_py(), np.uint8).reshape(size, size, 3)
                img[rows] = self.encode_pixels(stacked)
                has_img[rows] = True
        if S.TOKENS in batch.column_names:
            tokens = batch.column(S.TOKENS).to_pylist()
            rows = np.array([i for i, t in enumerate(tokens) if t], np.int64)
            if len(rows):
                txt[rows] = self.encode_tokens([tokens[i] for i in rows])
                has_txt[rows] = True

        both = has_img & has_txt
        score = np.where(both, (img * txt).sum(axis=1), np.nan).astype(np.float32)
        out = batch.drop_columns([c for c in (S.PIXELS, S.TOKENS) if c in batch.column_names])
        out = _set(out, S.IMAGE_EMBEDDING, embedding_array(img, has_img))
        out = _set(out, S.TEXT_EMBEDDING, embedding_array(txt, has_txt))
        out = _set(out, S.CLIP_SCORE, pa.array(score, pa.float32(), mask=~both))
        out = _set(out, S.MODEL, pa.array([self._model_id] * n, pa.string()))
        if self.cfg.debug_worker_column:
            out = _set(out, S.EMBED_WORKER, pa.array([self._worker] * n, pa.string()))
        return out
