"""Training data from a clipcurate job's output: the rows the job kept, streamed from its shards.

Layout read (stable across the job's versions): ``<output>/shards/NNNNN.tar`` (img2dataset
WebDataset: ``<key>.jpg``, ``<key>.txt``, ``<key>.json``), committed when
``<output>/shards/NNNNN.manifest.json`` exists, and ``<output>/embeddings/NNNNN.parquet`` with
``key``, ``keep``, ``status`` and ``caption`` per row. ``<output>`` is a local folder or
``s3://bucket/prefix`` (boto3; endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, as
clip_model.pretrained fetches weights).

Order: the index (shard, key, caption) of every usable row is built from the Parquet files
alone. Epoch ``e`` visits the shards in an order drawn from (seed, e), ``window`` shards at a
time with their rows shuffled together, so batch ``step`` is a pure function of (seed, step):
a resumed run reads exactly the batches an uninterrupted one would, and only the tars of the
window in use are held in memory (the images of their usable rows).
"""

from __future__ import annotations

import io
import os
import random
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import PreprocessConfig

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class JobOutputError(ValueError):
    """The folder is not a job output we can train on."""


class _Store:
    """Read-only access to a local folder or an s3:// prefix."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.s3 = root.startswith("s3://")
        self._client: Any = None
        if self.s3:
            bucket, _, prefix = self.root[len("s3://") :].partition("/")
            self.bucket, self.prefix = bucket, prefix

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            import botocore.config

            from .pretrained import _s3_endpoint

            self._client = boto3.client(
                "s3", endpoint_url=_s3_endpoint(None),
                config=botocore.config.Config(retries={"max_attempts": 5, "mode": "standard"}),
            )  # fmt: skip
        return self._client

    def list(self, sub: str) -> list[str]:
        """File names directly under ``<root>/<sub>/``."""
        if not self.s3:
            folder = os.path.join(self.root, sub)
            return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        prefix = f"{self.prefix}/{sub}/".lstrip("/")
        names: list[str] = []
        for page in self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
        return sorted(n for n in names if "/" not in n)

    def read(self, sub: str, name: str) -> bytes:
        if not self.s3:
            with open(os.path.join(self.root, sub, name), "rb") as f:
                return f.read()
        key = f"{self.prefix}/{sub}/{name}".lstrip("/")
        return self._s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # boto3 clients do not pickle; each worker makes its own
        return state


@dataclass(frozen=True)
class Row:
    shard: str
    key: str
    caption: str


def index_rows(root: str, *, keep_only: bool = True) -> tuple[list[Row], dict[str, int]]:
    """The usable rows of a job output, in (shard, key) order, and counts for the log.

    keep_only: rows whose ``keep`` is true (what the job's filters kept); False: every row
    with status ``ok`` (every image the job downloaded and stored). Only committed shards
    count; a row needs a caption.
    """
    import pyarrow.parquet as pq

    store = _Store(root)
    committed = {n[: -len(".manifest.json")] for n in store.list("shards") if n.endswith(".manifest.json")}
    parquets = [n for n in store.list("embeddings") if n.endswith(".parquet")]
    if not committed or not parquets:
        raise JobOutputError(
            f"{root}: no committed shards (shards/*.manifest.json) or no embeddings/*.parquet; "
            "is this a clipcurate job output?"
        )
    rows: list[Row] = []
    counts = {"rows": 0, "ok": 0, "kept": 0, "shards": 0}
    for name in parquets:
        shard = name[: -len(".parquet")]
        if shard not in committed:
            continue
        table = pq.read_table(io.BytesIO(store.read("embeddings", name)))
        missing = {"key", "keep", "status", "caption"} - set(table.column_names)
        if missing:
            raise JobOutputError(f"{root}/embeddings/{name} lacks columns {sorted(missing)}")
        counts["shards"] += 1
        cols = {c: table.column(c).to_pylist() for c in ("key", "keep", "status", "caption")}
        for key, keep, status, cap in zip(
            cols["key"], cols["keep"], cols["status"], cols["caption"], strict=True
        ):
            counts["rows"] += 1
            ok = status == "ok"
            counts["ok"] += ok
            counts["kept"] += bool(keep) and ok
            usable = (bool(keep) if keep_only else True) and ok and isinstance(cap, str)
            if usable:
                rows.append(Row(shard, key, cap))
    if not rows:
        raise JobOutputError(f"{root}: no {'kept' if keep_only else 'downloaded'} rows to train on")
    rows.sort(key=lambda r: (r.shard, r.key))
    return rows, counts


def epoch_order(rows: list[Row], seed: int, epoch: int, window: int) -> list[int]:
    """Row indices of one epoch: shards in a seeded order, rows shuffled within each window of
    ``window`` consecutive shards."""
    rng = random.Random(f"job-data-{seed}-{epoch}")
    by_shard: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_shard.setdefault(r.shard, []).append(i)
    shards = sorted(by_shard)
    rng.shuffle(shards)
    order: list[int] = []
    for w in range(0, len(shards), window):
        group = [i for s in shards[w : w + window] for i in by_shard[s]]
        rng.shuffle(group)
        order += group
    return order


def read_tar_images(data: bytes, keys: set[str]) -> dict[str, bytes]:
    """Image bytes of the members ``<key>.<jpg|jpeg|png|webp>`` of a WebDataset tar, for the
    wanted keys."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition(".")
            if stem in keys and ext.lower() in _IMAGE_EXTS:
                f = tar.extractfile(member)
                if f is not None:
                    found[stem] = f.read()
    return found


class JobOutputBatches:
    """``batch(step) -> (images float32 [B, 3, S, S], tokens int64 [B, L])`` over a job output's
    usable rows; see the module docstring for the order. Picklable (DataLoader workers)."""

    def __init__(
        self,
        root: str,
        rows: list[Row],
        batch_size: int,
        seed: int,
        preprocess: PreprocessConfig,
        tokenizer: Callable[[list[str]], Any],
        window: int = 2,
    ) -> None:
        self.store = _Store(root)
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.preprocess, self.tokenizer, self.window = preprocess, tokenizer, window
        self._orders: OrderedDict[int, list[int]] = OrderedDict()
        self._shards: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._keys: dict[str, set[str]] = {}
        for r in rows:
            self._keys.setdefault(r.shard, set()).add(r.key)

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders[epoch] = epoch_order(self.rows, self.seed, epoch, self.window)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _images(self, shard: str) -> dict[str, bytes]:
        if shard not in self._shards:
            self._shards[shard] = read_tar_images(self.store.read("shards", f"{shard}.tar"), self._keys[shard])
            # A window's shards plus the next window's first: the images of one batch at most.
            while len(self._shards) > self.window + 1:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        return self._shards[shard]

    def _indices(self, first_step: int, steps: int) -> list[int]:
        n = len(self.rows)
        positions = range(first_step * self.batch_size, (first_step + steps) * self.batch_size)
        return [self._order(p // n)[p % n] for p in positions]

    def rows_of(self, step: int) -> list[Row]:
        return [self.rows[i] for i in self._indices(step, 1)]

    def _pixels(self, indices: list[int]) -> np.ndarray:
        from PIL import Image

        from .transform import resize_crop_uint8

        s = self.preprocess.image_size
        pixels = np.empty((len(indices), s, s, 3), dtype=np.uint8)
        for out, i in enumerate(indices):
            r = self.rows[i]
            data = self._images(r.shard).get(r.key)
            if data is None:
                raise JobOutputError(f"{self.store.root}: image {r.key} missing from shard {r.shard}.tar")
            with Image.open(io.BytesIO(data)) as img:
                pixels[out] = resize_crop_uint8(img, self.preprocess)
        return pixels

    def normalize(self, pixels: np.ndarray):
        """uint8 [n, S, S, 3] -> the model's input, float32 [n, 3, S, S]."""
        from .transform import normalize_uint8

        return normalize_uint8(pixels, self.preprocess)

    def pool(self, first_step: int, steps: int):
        """The rows of batches ``first_step .. first_step + steps - 1``, in stream order, for
        clip_model.neighbour_batches: (uint8 pixels [n, S, S, 3], tokens [n, L], row ids)."""
        indices = self._indices(first_step, steps)
        return self._pixels(indices), self.tokenizer([self.rows[i].caption for i in indices]), indices

    def __call__(self, step: int):
        indices = self._indices(step, 1)
        return self.normalize(self._pixels(indices)), self.tokenizer([self.rows[i].caption for i in indices])


def job_output_batches(
    root: str,
    *,
    image_size: int,
    batch_size: int,
    seed: int,
    preprocess: PreprocessConfig | None = None,
    tokenizer: Callable[[list[str]], Any],
    keep_only: bool = True,
    window: int = 2,
    log: Callable[[str], None] | None = None,
) -> JobOutputBatches:
    """Data factory (see clip_model.train) over a job output's kept (or all ok) rows."""
    rows, counts = index_rows(root, keep_only=keep_only)
    if log is not None:
        log(
            f"data {root}: {counts['shards']} committed shards, {counts['rows']} rows, "
            f"{counts['ok']} downloaded, {counts['kept']} kept; training on {len(rows)} "
            f"({'kept' if keep_only else 'all downloaded'})"
        )
    pp = preprocess or PreprocessConfig(image_size=image_size)
    return JobOutputBatches(root, rows, batch_size, seed, pp, tokenizer, window)
