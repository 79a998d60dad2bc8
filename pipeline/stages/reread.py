"""Re-read stage: a shard committed by an earlier run but not embedded (the run died between
committing the shard and writing its embeddings) -> its rows and model inputs again, without
downloading anything.

This is the only path that reads a run's own tars back, and it embeds the **stored** copy: the
image as the shard holds it (resized and JPEG-encoded by ``decode``; with ``resize_mode:
border`` padded too), decoded and turned into the model's input by the same
``resize_crop_uint8``. Such rows say so in ``embedded_from = "stored"`` (a fresh run's rows say
``"original"``), and the driver's log names the shards.

With ``stored_decode = "device"`` (``embed.stored_decode``) a stored image that is a baseline
RGB or grayscale JPEG (Pillow reads its header here, nothing more) travels as its bytes in
``_jpeg`` and the embed stage decodes it on its own device
(:mod:`clip_model.device_decode`); any other stored image is decoded here as before.

Rows come from ``<shard>.parquet``; passthrough columns the shard parquet does not hold (the
shard stage leaves out names starting with ``_``) are read again from the input file (no
download) and joined by key. An ``ok`` row whose image is not in the tar becomes
``image_missing``; one Pillow cannot decode becomes ``preprocess_error``.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa
from PIL import Image

from clip_model.config import PreprocessConfig
from pipeline import schema as S
from pipeline.config import ReadConfig, StorageConfig
from pipeline.shard_format import read_images, read_rows
from pipeline.stages.base import Resources, Stage, per_process
from pipeline.stages.read import ShardDescriptor, read_shard
from pipeline.storage import Storage
from pipeline.thumbnails import thumbnail


@dataclass
class RereadStage(Stage):
    """Shard descriptors (:class:`~pipeline.stages.read.ShardDescriptor` rows) of committed
    shards -> their rows with ``_pixels`` (and ``image_thumb``) made from the stored images."""

    expands: ClassVar[bool] = True

    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1))
    read: ReadConfig = field(default_factory=ReadConfig)
    number_sample_per_shard: int = 1000
    shard_folder: str = ""
    storage: StorageConfig = field(default_factory=StorageConfig)
    model_input: PreprocessConfig = field(default_factory=PreprocessConfig)
    thumbnails: bool = False
    stored_decode: str = "cpu"

    def _store(self) -> Storage:
        return per_process(("shard-storage", self.shard_folder, self.storage),
                           lambda: Storage(self.shard_folder, self.storage))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        parts = [self._one(ShardDescriptor(**row)) for row in batch.to_pylist()]
        if not parts:
            return pa.table({S.KEY: pa.array([], pa.string())})
        return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]

    def _one(self, d: ShardDescriptor) -> pa.Table:
        from clip_model.transform import resize_crop_uint8

        store = self._store()
        shard = S.shard_name(d.shard_id)
        table = read_rows(store, shard)
        missing = [c for c in self.read.save_additional_columns if c not in table.column_names]
        if missing:
            source = read_shard(d, self.read, self.number_sample_per_shard, self.storage)
            have = [c for c in missing if c in source.column_names]
            if have:
                table = table.join(source.select([S.KEY, *have]), S.KEY, join_type="left outer")
        table = table.sort_by(S.KEY)
        n = table.num_rows
        statuses, errors = S.column_list(table, S.STATUS), S.column_list(table, S.ERROR)
        keys = S.column_list(table, S.KEY)
        ok = [i for i in range(n) if statuses[i] == S.OK]
        pixels: list[bytes | None] = [None] * n
        thumbs: list[bytes | None] = [None] * n
        jpegs: list[bytes | None] = [None] * n
        try:
            images = read_images(store, shard, {keys[i] for i in ok})
        except (OSError, tarfile.TarError) as e:
            images = {}
            for i in ok:
                statuses[i], errors[i] = S.IMAGE_MISSING, f"shard tar unreadable: {e}"
            ok = []
        for i in ok:
            data = images.get(keys[i])
            if data is None:
                statuses[i], errors[i] = S.IMAGE_MISSING, "image not found in the shard tar"
                continue
            try:
                with Image.open(io.BytesIO(data)) as img:
                    if self.stored_decode == "device" and _device_decodable(img):
                        jpegs[i] = data
                        continue
                    arr = resize_crop_uint8(img, self.model_input)
            except Exception as e:  # Pillow raises many types for bad data; the row records it
                statuses[i], errors[i] = S.PREPROCESS_ERROR, f"{type(e).__name__}: {e}"
                continue
            pixels[i] = arr.tobytes()
            if self.thumbnails:
                thumbs[i] = thumbnail(Image.fromarray(arr, "RGB"))
        table = S.set_column(table, S.STATUS, pa.array(statuses, pa.string()))
        table = S.set_column(table, S.ERROR, pa.array(errors, pa.string()))
        table = S.set_column(table, S.PIXELS, S.binary_column(pixels))
        if self.stored_decode == "device":
            table = S.set_column(table, S.JPEG, S.binary_column(jpegs))
        if self.thumbnails:
            table = S.set_column(table, S.IMAGE_THUMB, pa.array(thumbs, pa.binary()))
        table = S.set_column(table, S.EMBEDDED_FROM, pa.array(["stored"] * n, pa.string()))
        return S.set_column(table, S.SHARD_ROWS, pa.array([n] * n, pa.int64()))


def _device_decodable(img: Image.Image) -> bool:
    """Whether a stored image (a Pillow image, header read) goes to the embed stage's device
    decode: a baseline (not progressive) JPEG of 3-channel RGB or 1-channel gray, what the
    decode stage writes. nvJPEG is given nothing else."""
    return (img.format == "JPEG" and img.mode in ("RGB", "L")
            and not img.info.get("progressive") and not img.info.get("progression"))
