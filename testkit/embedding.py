"""Embed images and captions with the job's own stages, without a scheduler or HTTP: decode
(with the model's input, decode once), tokenize and embed, as a shard task and an embedding
worker would. Tests, benchmarks and calibration samples use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import DecodeConfig, EmbedConfig
from pipeline.stages.decode import DecodeStage
from pipeline.stages.embed import EmbedStage
from pipeline.stages.tokenize import TokenizeStage


def embed_images(
    images: Sequence[bytes | None],
    captions: Sequence[str | None],
    model: str = "tiny-synthetic",
    pretrained: str | None = "synthetic",
    decode: DecodeConfig | None = None,
    thumbnails: bool = False,
    keys: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> pa.Table:
    """One row per image (file bytes; None: a row that failed to download) with the job's
    output columns: status, stored-image sizes and sha256, ``image_embedding``,
    ``text_embedding``, ``clip_score``, ``model`` (and ``image_thumb`` with ``thumbnails``).
    ``extra``: more columns to carry along (e.g. ground truth)."""
    import clip_model

    n = len(images)
    cols: dict[str, Any] = {
        S.KEY: list(keys) if keys is not None else [f"{i:09d}" for i in range(n)],
        S.CAPTION: pa.array(list(captions), pa.string()),
        S.STATUS: [S.OK if b is not None else "http_404" for b in images],
        S.ERROR: pa.nulls(n, pa.string()),
        S.IMAGE_BYTES: pa.array(list(images), pa.binary()),
        **(extra or {}),
    }
    loaded, pp = clip_model.create_model(model, pretrained)
    rows = DecodeStage(cfg=decode or DecodeConfig(), model_input=pp, thumbnails=thumbnails).process_batch(pa.table(cols))
    rows = TokenizeStage(tokenizer=loaded.tokenizer).process_batch(rows)
    return EmbedStage(cfg=EmbedConfig(model=model, pretrained=pretrained), preprocess=pp).process_batch(rows)
