"""Find every row of an output that looks like given images, rows or text (similarity takedown).

    rows = find_similar(output, like=["suspect.jpg", "000120042"], like_text=["..."], threshold=0.9)

The output's image embeddings (``embeddings/*.parquet``, unit vectors) go into a faiss index
(:class:`VectorIndex`): exact inner products (``IndexFlatIP``) below
:data:`EXACT_BELOW` rows, else an inverted file of ``nlist`` ~ 4 sqrt(N) cells with fp16
vectors (``IVF<nlist>,SQfp16``, 2 bytes a dimension) searched in ``nprobe`` cells. faiss was
chosen over usearch by bench/vector_index.py (1M x 512 on this 2-core machine): IVF builds in
25 s and answers a range query in 0.9-1.7 ms at recall 1.0, where usearch's HNSW took 182 s to
build 100k vectors and has no range search (a k-nearest search must guess k).

Queries: an image file (local path or ``s3://``) is decoded, resized and embedded exactly as the
job did it (the output's ``config.yaml``: decode settings and model), a row key takes that
row's stored embedding, a text its text embedding (CLIP's shared space). A row matches when its
cosine to any query is >= ``threshold`` (default: the output's ``dedup.threshold``, the model's
near-duplicate setting). With ``pixel_check`` (default: the output's ``dedup.pixel_check``),
image matches are also confirmed by aligned thumbnails (pipeline/pixel_check.py), as dedup
confirms near duplicates: for a weak model whose embeddings link different scenes in the same
colours, that is what makes "looks like" mean the same picture. Text queries have no pixels and
match by cosine alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.config import EMBEDDINGS_DIR, SHARDS_DIR, ConfigError, JobConfig, StorageConfig
from pipeline.storage import Storage, filesystem_for

EXACT_BELOW = 50_000
DEFAULT_NPROBE = 32
# The files of a review folder (write_review).
MATCHES_NAME = "matches.parquet"
REVIEW_NAME = "review.html"


class VectorIndex:
    """Unit float32 vectors [N, D] for range queries by cosine (faiss, inner product)."""

    def __init__(self, vectors: np.ndarray, nprobe: int = DEFAULT_NPROBE, seed: int = 0) -> None:
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = x.shape
        self.size = n
        if n < EXACT_BELOW:
            self.kind = "IndexFlatIP (exact)"
            self.index = faiss.IndexFlatIP(dim)
        else:
            nlist = int(min(65536, max(64, 4 * math.sqrt(n))))
            quant = faiss.IndexFlatIP(dim)
            self.index = faiss.IndexIVFScalarQuantizer(quant, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                       faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = x[rng.choice(n, min(n, 64 * nlist), replace=False)]
            self.index.train(sample)
            self.index.nprobe = min(nprobe, nlist)
            self._quant = quant  # the IVF index refers to it; keep it alive
            self.kind = f"IVF{nlist},SQfp16 nprobe={self.index.nprobe}"
        if n:
            self.index.add(x)

    def within(self, queries: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query (unit float32 [Q, D]): (row indices, cosines) of the rows with
        cosine >= ``threshold``, most similar first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if not self.size or not len(q):
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        lims, sims, ids = self.index.range_search(q, float(threshold) - 1e-6)
        out = []
        for k in range(len(q)):
            i, s = ids[lims[k] : lims[k + 1]].astype(np.int64), sims[lims[k] : lims[k + 1]]
            keep = s >= threshold - 1e-6
            i, s = i[keep], s[keep]
            order = np.argsort(-s, kind="stable")
            out.append((i[order], s[order]))
        return out


@dataclass
class Query:
    """One thing to look for: ``what`` as given, its unit embedding and its thumbnail (None
    for text)."""

    what: str
    kind: str  # "image", "row" or "text"
    embedding: np.ndarray
    thumb: bytes | None = None


@dataclass
class Match:
    """A row that looks like a query."""

    key: str
    shard: str | None
    url: str | None
    caption: str | None
    cosine: float
    query: str
    pixel_confirmed: bool | None = None


@dataclass
class Rows:
    """The searchable rows of an output: keys and their embeddings (rows without one, failed
    or already taken down, are not searchable)."""

    keys: list[str]
    shards: list[str | None]
    urls: list[str | None]
    captions: list[str | None]
    vectors: np.ndarray
    thumbs: list[bytes | None] | None
    by_key: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key = {k: i for i, k in enumerate(self.keys)}


def read_rows(output: str, storage: StorageConfig, thumbs: bool) -> Rows:
    """Every row of ``<output>/embeddings/*.parquet`` that has an image embedding."""
    folder = f"{output.rstrip('/')}/{EMBEDDINGS_DIR}"
    names = sorted(n for n in Storage(folder, storage).list_names() if n.endswith(".parquet") and not n.startswith("."))
    if not names:
        raise ConfigError(f"{folder}: no embeddings files: not a finished job output")
    keys, shards, urls, caps, vecs, th = [], [], [], [], [], []
    for name in names:
        fs, path = filesystem_for(f"{folder}/{name}", storage)
        have = pq.read_schema(path, filesystem=fs).names
        cols = [c for c in (S.KEY, S.SHARD, S.URL, S.CAPTION, S.IMAGE_EMBEDDING, S.IMAGE_THUMB) if c in have]
        if not thumbs and S.IMAGE_THUMB in cols:
            cols.remove(S.IMAGE_THUMB)
        t = pq.read_table(path, filesystem=fs, columns=cols)
        col = t.column(S.IMAGE_EMBEDDING)
        dim = col.type.list_size
        emb, ok = S.embedding_matrix(col, dim)
        idx = np.flatnonzero(ok)
        sub = t.take(pa.array(idx, pa.int64()))
        keys += sub.column(S.KEY).to_pylist()
        for target, c in ((shards, S.SHARD), (urls, S.URL), (caps, S.CAPTION)):
            target += S.column_list(sub, c)
        if thumbs:
            th += S.column_list(sub, S.IMAGE_THUMB)
        v = emb[idx]
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        vecs.append(v)
    vectors = np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
    return Rows(keys, shards, urls, caps, vectors, th if thumbs else None)


def _load_job_config(output: str, storage: StorageConfig) -> JobConfig:
    from pipeline import job_config as J

    try:
        text = Storage(output.rstrip("/"), storage).read_bytes("config.yaml").decode("utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{output}/config.yaml: missing; it says which model embedded the output") from e
    return J.from_yaml_text(text)


class QueryEmbedder:
    """Embeds query images and texts with the output's model, as the job embedded its rows."""

    def __init__(self, cfg: JobConfig) -> None:
        from pipeline.stages.embed import load_model

        self.cfg = cfg
        self.model, self.preprocess = load_model(cfg.embed.model, cfg.embed.pretrained, text_model=cfg.embed.text_model)

    def image(self, data: bytes) -> tuple[np.ndarray, bytes | None]:
        """(unit embedding float32 [D], 32 x 32 thumbnail) of image file bytes: decoded with
        the output's decode settings and turned into the model's input by the decode task's
        own code (decode once), as the job embedded its rows."""
        import torch

        from pipeline.stages.decode import DecodeOptions, RowFailure, decode_image

        try:
            decoded = decode_image(data, DecodeOptions(self.cfg.decode, self.preprocess, thumbnails=True))
        except RowFailure as e:
            raise ConfigError(f"cannot use the image: {e.status}: {e}") from e
        size = self.preprocess.image_size
        assert decoded.pixels is not None
        pixels = np.frombuffer(decoded.pixels, np.uint8).reshape(size, size, 3)
        from clip_model.transform import normalize_uint8

        with torch.inference_mode():
            x = normalize_uint8(torch.from_numpy(pixels.copy())[None], self.preprocess)
            e = self.model.encode_image(x).float()
        v = (e / e.norm(dim=-1, keepdim=True)).numpy()[0]
        return v.astype(np.float32), decoded.thumb

    def text(self, text: str) -> np.ndarray:
        from pipeline.stages.moderate import embed_prompts

        return embed_prompts(self.model, [text])[0]


def _read_image(path: str, storage: StorageConfig) -> bytes:
    fs, p = filesystem_for(path, storage)
    with fs.open_input_stream(p) as f:
        return f.read()


def build_queries(
    rows: Rows, like: Sequence[str], like_text: Sequence[str], cfg: JobConfig, storage: StorageConfig
) -> list[Query]:
    """Queries for ``like`` (row keys of the output, else image files) and ``like_text``."""
    queries: list[Query] = []
    embedder: QueryEmbedder | None = None
    for item in like:
        if item in rows.by_key:
            i = rows.by_key[item]
            queries.append(Query(item, "row", rows.vectors[i], rows.thumbs[i] if rows.thumbs else None))
            continue
        try:
            data = _read_image(item, storage)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--like {item!r}: neither a row key of the output (with an image embedding) "
                              f"nor a readable image file ({e})") from e
        embedder = embedder or QueryEmbedder(cfg)
        v, thumb = embedder.image(data)
        queries.append(Query(item, "image", v, thumb))
    for text in like_text:
        embedder = embedder or QueryEmbedder(cfg)
        queries.append(Query(text, "text", embedder.text(text)))
    return queries


def find_similar(
    output: str,
    like: Sequence[str] = (),
    like_text: Sequence[str] = (),
    threshold: float | None = None,
    pixel_check: bool | None = None,
    storage: StorageConfig | None = None,
    emit: Callable[[str], None] | None = None,
) -> tuple[list[Match], dict[str, Any]]:
    """Rows of ``output`` that look like any query (see the module docstring). Returns the
    matches (best cosine per row) and facts for the summary (index kind, timings, settings)."""
    import time

    emit = emit or (lambda line: None)
    storage = storage or StorageConfig()
    if not like and not like_text:
        raise ConfigError("give at least one --like image or row key, or --like-text")
    cfg = _load_job_config(output, storage)
    t = cfg.dedup.threshold if threshold is None else threshold
    if isinstance(t, str) or not 0 < float(t) <= 1:
        raise ConfigError(f"--threshold must be a cosine in (0, 1], got {t!r}")
    pixels = bool(cfg.dedup.pixel_check is True) if pixel_check is None else pixel_check
    started = time.perf_counter()
    rows = read_rows(output, storage, thumbs=pixels)
    emit(f"{len(rows.keys):,} rows with an image embedding ({time.perf_counter() - started:.1f} s)")
    t0 = time.perf_counter()
    index = VectorIndex(rows.vectors) if len(rows.keys) else None
    build_s = time.perf_counter() - t0
    queries = build_queries(rows, like, like_text, cfg, storage)
    t0 = time.perf_counter()
    hits = index.within(np.stack([q.embedding for q in queries]), float(t)) if index is not None else [
        (np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
    query_s = (time.perf_counter() - t0) / max(1, len(queries))
    best: dict[int, Match] = {}
    for q, (idx, sims) in zip(queries, hits, strict=True):
        confirmed: np.ndarray | None = None
        if pixels and q.kind != "text" and len(idx):
            from pipeline.pixel_check import PixelBounds, confirm_pairs
            from pipeline.thumbnails import thumbs_array

            assert rows.thumbs is not None
            qt, qok = thumbs_array([q.thumb])
            rt, rok = thumbs_array([rows.thumbs[i] for i in idx.tolist()])
            confirmed = confirm_pairs(qt, qok, rt, rok, np.zeros(len(idx), np.int64), np.arange(len(idx)),
                                      PixelBounds.of(cfg.dedup))
        for k, (i, s) in enumerate(zip(idx.tolist(), sims.tolist(), strict=True)):
            if confirmed is not None and not confirmed[k]:
                continue
            if i not in best or s > best[i].cosine:
                best[i] = Match(rows.keys[i], rows.shards[i], rows.urls[i], rows.captions[i], float(s), q.what,
                                None if confirmed is None else True)
        emit(f"  {q.kind} {q.what!r}: {len(idx)} within cosine {float(t):g}"
             + (f", {int(confirmed.sum())} confirmed by pixels" if confirmed is not None else ""))
    matches = sorted(best.values(), key=lambda m: (-m.cosine, m.key))
    facts = {"index": index.kind if index is not None else "none", "rows": len(rows.keys),
             "build_s": build_s, "query_ms": query_s * 1e3, "threshold": float(t), "pixel_check": pixels,
             "queries": [{"what": q.what, "kind": q.kind} for q in queries]}
    return matches, facts


def write_review(matches: list[Match], facts: dict[str, Any], output: str, folder: str,
                 storage: StorageConfig | None = None) -> tuple[str, str]:
    """``<folder>/matches.parquet`` and ``<folder>/review.html`` (thumbnails from the shard
    tars, inline), for a person to check before the takedown runs. Returns both paths."""
    import base64
    import html
    import io
    import os

    from PIL import Image

    from pipeline.shard_format import read_images

    storage = storage or StorageConfig()
    review = Storage(folder, storage)
    table = pa.table({
        S.KEY: [m.key for m in matches], S.SHARD: [m.shard for m in matches], S.URL: [m.url for m in matches],
        S.CAPTION: [m.caption for m in matches],
        S.MATCH_COSINE: pa.array([m.cosine for m in matches], pa.float32()),
        S.MATCH_QUERY: [m.query for m in matches],
        S.MATCH_PIXEL_CONFIRMED: pa.array([m.pixel_confirmed for m in matches], pa.bool_()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    review.write_atomic(MATCHES_NAME, buf.getvalue())
    shards = Storage(f"{output.rstrip('/')}/{SHARDS_DIR}", storage)
    by_shard: dict[str, set[str]] = {}
    for m in matches:
        if m.shard:
            by_shard.setdefault(m.shard, set()).add(m.key)
    images: dict[str, bytes] = {}
    for shard, keys in by_shard.items():
        try:
            images.update(read_images(shards, shard, keys))
        except (OSError, FileNotFoundError):
            continue
    cells = []
    for m in matches:
        img = ""
        if m.key in images:
            try:
                im = Image.open(io.BytesIO(images[m.key])).convert("RGB")
                im.thumbnail((160, 160))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
                img = f'<img alt="{html.escape(m.key)}" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
            except Exception:  # an unreadable stored image is listed without a picture
                img = ""
        cells.append(f"<figure>{img}<figcaption><b>{html.escape(m.key)}</b> cos {m.cosine:.4f}<br>"
                     f"{html.escape(m.url or '')}<br><i>{html.escape(m.caption or '')}</i><br>like "
                     f"{html.escape(m.query)}</figcaption></figure>")
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        "<title>takedown review</title><style>body{font-family:sans-serif}figure{display:inline-block;width:200px;"
        "vertical-align:top;margin:6px;font-size:12px;word-break:break-all}</style></head><body>"
        f"<h1>Takedown review: {len(matches)} row(s) of {html.escape(output)}</h1>"
        f"<p>cosine &gt;= {facts['threshold']:g}{' and pixel-confirmed' if facts['pixel_check'] else ''}; index "
        f"{html.escape(facts['index'])} over {facts['rows']:,} rows. Nothing is removed until the takedown runs "
        "without --dry-run.</p>" + "".join(cells) + "</body></html>"
    )
    review.write_atomic(REVIEW_NAME, page.encode("utf-8"))
    return os.path.join(folder, MATCHES_NAME), os.path.join(folder, REVIEW_NAME)


__all__ = ["Match", "Query", "VectorIndex", "find_similar", "read_rows", "write_review"]
