"""Final ``keep`` / ``drop_reason`` of every row, after the stream and the global dedup.

Rows are never deleted: a dropped row gets ``keep = false`` and one ``drop_reason`` that names
the filter, its threshold and the model whose numbers it used. Reasons are checked in this
order and the first that applies is recorded:

0. ``takedown: <reason>``: the row was taken down (``takedown`` column, set by
   pipeline/takedown/); a re-decision never brings it back.
1. ``status:<status>``: the row failed upstream (``status:http_404``, ``status:decode_error``).
2. ``unsafe:<concept>(<side> margin>0.05; <model>)``: the moderate stage flagged it
   (``unsafe_score > 0``) and ``filter.unsafe`` is on. The side is ``image``, ``caption`` or
   ``head`` (then ``probability`` instead of ``margin``); the threshold is the concept's. The
   row's own score is in ``unsafe_score`` (score minus threshold), not in the reason, so rows
   dropped by the same rule share one reason.
3. ``clip_score<0.28 (<model>)``: ``filter.clip_score_threshold`` is set and the image-caption
   cosine is below it (a row without a caption has no clip_score and is dropped with
   ``clip_score<0.28 (<model>; no caption)``).
4. ``dedup:exact(sha256)``, ``dedup:semantic(cos>=0.95; <model>)``,
   ``dedup:previous_run(cos>=0.95 or sha256; <model>)``: a duplicate found by
   :func:`pipeline.dedup.dedup_table`, when ``filter.duplicates`` is on. With
   ``dedup.pixel_check`` the cosine test reads ``cos>=0.9 & pixels(mean<=4.5,blob<=23; per channel mean<=7,blob<=34)``.

Duplicate links (``duplicate_of``, ``dup_kind``) are recorded for every ``ok`` row that was not
taken down, whatever else drops it, so an exact copy dropped as unsafe still names its image's
other rows. Rows that pass 0-3 rank before all others, so a passing row is linked (and dropped
as a duplicate) only in favour of a passing row that is itself kept; a row dropped by 1-3 keeps
that reason and only gains the link. Everything is recomputed from the measured columns (status, scores,
embeddings), never from an earlier ``keep``/``drop_reason``: running the decisions again on
their own output gives the same result, which is what makes a re-run change nothing.

Models are named ``<architecture>@sha256:<first 12 hex digits>…`` in reasons (the ``model``
column keeps the full id), so reasons group well in counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.config import DedupConfig, FilterConfig

if TYPE_CHECKING:
    from pipeline.thumbnails import ThumbFile

DECISION_COLUMNS = (S.DUPLICATE_OF, S.DUP_GROUP_SIZE, S.DUP_KIND, S.KEEP, S.DROP_REASON)
# How a takedown's reason starts in drop_reason (pipeline/takedown/ writes the rest).
TAKEDOWN_PREFIX = S.REASON_TAKEDOWN

_SHA = "@sha256:"


def short_model(model: str | None) -> str:
    """``"ViT-B-32@sha256:<64 hex>"`` -> ``"ViT-B-32@sha256:<12 hex>…"``; other ids unchanged,
    None -> ``"unknown model"``."""
    if not model:
        return "unknown model"
    name, sep, digest = model.partition(_SHA)
    if sep and len(digest) > 12:
        return f"{name}{sep}{digest[:12]}…"
    return model


def unsafe_reason(concept: str, source: str | None, model: str | None, rules: Any = None) -> str:
    """The drop reason of a flagged row (``concept`` flagged by ``source``, ``image``,
    ``caption`` or ``head``). With ``rules`` (:class:`pipeline.stages.moderate.Rules`) it
    names the concept's threshold on that side; without, the rule ``unsafe_score>0``."""
    side = source or "image"
    threshold = None
    if rules is not None:
        if side == "head":
            threshold = rules.head_threshold
        elif side in ("image", "caption"):
            threshold = (rules.image_thresholds if side == "image" else rules.caption_thresholds).get(concept)
    m = short_model(model)
    if threshold is None:
        return f"{S.REASON_UNSAFE}{concept}({side} unsafe_score>0; {m})"
    kind = "probability" if side == "head" else "margin"
    return f"{S.REASON_UNSAFE}{concept}({side} {kind}>{threshold:g}; {m})"


def filter_reasons(table: pa.Table, filters: FilterConfig, rules: Any = None) -> list[str | None]:
    """Reasons 0-3 of the module docstring for every row (None: the row passes them)."""
    taken_down = S.column_list(table, S.TAKEDOWN)
    statuses = S.column_list(table, S.STATUS)
    scores = S.column_list(table, S.CLIP_SCORE)
    unsafe = S.column_list(table, S.UNSAFE_SCORE)
    concepts = S.column_list(table, S.UNSAFE_CONCEPT)
    sources = S.column_list(table, S.UNSAFE_SOURCE)
    models = S.column_list(table, S.MODEL)
    threshold = filters.clip_score_threshold
    out: list[str | None] = []
    for i, status in enumerate(statuses):
        if taken_down[i] is not None:
            out.append(f"{TAKEDOWN_PREFIX}{taken_down[i]}")
        elif status != S.OK:
            out.append(S.status_reason(status))
        elif filters.unsafe and concepts[i] is not None and unsafe[i] is not None and unsafe[i] > 0:
            out.append(unsafe_reason(concepts[i], sources[i], models[i], rules))
        elif threshold is not None and (scores[i] is None or np.isnan(scores[i])):
            out.append(f"{S.REASON_CLIP_SCORE}{threshold:g} ({short_model(models[i])}; no caption)")
        elif threshold is not None and scores[i] < threshold:
            out.append(f"{S.REASON_CLIP_SCORE}{threshold:g} ({short_model(models[i])})")
        else:
            out.append(None)
    return out


def dedup_reason(kind: str, model: str | None, cfg: DedupConfig) -> str:
    """The drop reason of a duplicate of ``kind`` (``exact``, ``semantic``, ``previous_run``)."""
    if kind == S.DUP_EXACT:
        return f"{S.REASON_DEDUP}{S.DUP_EXACT}(sha256)"
    test = f"cos>={cfg.threshold:g}"
    if cfg.pixel_check:
        test += (f" & pixels(mean<={cfg.pixel_mean_max:g},blob<={cfg.pixel_blob_max:g};"
                 f" per channel mean<={cfg.pixel_channel_mean_max:g},blob<={cfg.pixel_channel_blob_max:g})")
    if kind == S.DUP_SEMANTIC:
        return f"{S.REASON_DEDUP}{S.DUP_SEMANTIC}({test}; {short_model(model)})"
    return f"{S.REASON_DEDUP}{S.DUP_PREVIOUS_RUN}({test} or sha256; {short_model(model)})"


# What the model says about a row, as the decisions read it.
_MODEL_OUTPUTS = (S.CLIP_SCORE, S.UNSAFE_SCORE, S.UNSAFE_CONCEPT, S.UNSAFE_SOURCE)


def _one_pair_one_score(table: pa.Table) -> pa.Table:
    """``table`` where every ok row with the same image bytes (``sha256``) and the same caption
    as an earlier row (by key) carries that row's model outputs. They are one image-caption
    pair embedded twice, and the model's numbers can differ in the last bits by batch (bf16 /
    fp16 autocast, batch-dependent kernels): without this, that noise could put one copy
    above a threshold and the other below it, or pick which copy dedup keeps instead of the
    key. Only the columns the decisions read are replaced, in this copy."""
    if not {S.SHA256, S.CAPTION, S.KEY, S.STATUS} <= set(table.column_names):
        return table
    # Only ok rows whose bytes occur more than once can share a pair: find them in Arrow, so
    # the per-row Python below touches a run's copies, not all its rows.
    n = table.num_rows
    ok = pc.fill_null(pc.equal(table.column(S.STATUS), S.OK), False).to_numpy(zero_copy_only=False)
    codes = pc.dictionary_encode(table.column(S.SHA256)).combine_chunks().indices
    code = pc.fill_null(codes, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    ok &= code >= 0
    counts = np.bincount(code[ok], minlength=1)
    repeated = np.flatnonzero(ok & (counts[np.maximum(code, 0)] > 1))
    if not len(repeated):
        return table
    source = np.arange(n)
    pick = pa.array(repeated, pa.int64())
    keys = table.column(S.KEY).take(pick).to_pylist()
    captions = table.column(S.CAPTION).take(pick).to_pylist()
    first: dict[tuple[int, Any], int] = {}
    for j in sorted(range(len(repeated)), key=lambda r: keys[r]):
        i = int(repeated[j])
        source[i] = first.setdefault((int(code[i]), captions[j]), i)
    if (source == np.arange(n)).all():
        return table
    take = pa.array(source, pa.int64())
    for name in _MODEL_OUTPUTS:
        if name in table.column_names:
            table = S.set_column(table, name, table.column(name).take(take))
    return table


def decide(
    table: pa.Table,
    filters: FilterConfig,
    dedup: DedupConfig,
    rules: Any = None,
    previous: pa.Table | None = None,
    progress: Callable[[str], None] | None = None,
    thumbs: ThumbFile | None = None,
) -> pa.Table:
    """``table`` with ``duplicate_of``, ``dup_group_size``, ``dup_kind``, ``keep`` and
    ``drop_reason`` (re)computed; same rows, same order, other columns untouched.

    ``table`` needs ``key`` and ``status``; the filters read ``clip_score``, ``unsafe_score``,
    ``unsafe_concept``, ``unsafe_source``, ``model`` and dedup ``sha256`` and
    ``image_embedding`` (fixed_size_list<float16>[D]) where present. ``rules``: the moderate
    stage's resolved rules, for thresholds in unsafe reasons. ``previous``: rows an earlier run
    kept (see :func:`pipeline.dedup.dedup_table`); ``progress`` gets dedup's phase lines;
    ``thumbs``: the table's thumbnails spilled to a file, in place of its ``image_thumb``.
    Rows with the same bytes and caption are judged by the first one's scores
    (:func:`_one_pair_one_score`); the stored scores stay each row's own.
    """
    n = table.num_rows
    table_in = table
    table = _one_pair_one_score(table)
    reasons = filter_reasons(table, filters, rules)
    dup_of: list[str | None] = [None] * n
    group: list[int | None] = [None] * n
    kinds: list[str | None] = [None] * n
    if filters.duplicates and S.IMAGE_EMBEDDING in table.column_names:
        from pipeline.dedup import dedup_table

        # Links are found for every ok row, whatever else drops it ("every copy of this
        # image" must include copies dropped as unsafe), but rows that pass the filters rank
        # before all others: a passing row is only ever linked to another passing row, so
        # which passing rows are kept does not depend on the filtered ones.
        statuses = S.column_list(table, S.STATUS)
        taken_down = S.column_list(table, S.TAKEDOWN)
        linked = np.array([i for i, r in enumerate(reasons)
                           if statuses[i] == S.OK and taken_down[i] is None], np.int64)
        if len(linked):
            # dedup sees every row but only the linked ones as "ok": taking the linked rows
            # instead would copy the embedding and thumbnail columns (~3 KiB a row).
            cols = [c for c in (S.KEY, S.SHA256, S.CLIP_SCORE, S.IMAGE_EMBEDDING, S.IMAGE_THUMB) if c in table.column_names]
            sub = table.select(cols)
            is_linked = np.zeros(n, bool)
            is_linked[linked] = True
            sub = sub.append_column(S.STATUS, pa.array(np.where(is_linked, S.OK, None), pa.string()))
            for name, typ in ((S.SHA256, pa.string()), (S.CLIP_SCORE, pa.float32())):
                if name not in sub.column_names:
                    sub = sub.append_column(name, pa.nulls(n, typ))
            passes = np.array([r is None for r in reasons], bool)
            score = pc.cast(sub.column(S.CLIP_SCORE), pa.float64()).to_numpy(zero_copy_only=False)
            score = np.where(np.isnan(score), -2.0, score)  # cosines lie in [-1, 1]
            rank = np.where(passes, score, score - 10.0)
            sub = sub.set_column(sub.column_names.index(S.CLIP_SCORE), S.CLIP_SCORE, pa.array(rank, pa.float64()))
            marked = dedup_table(sub, dedup, previous, progress, thumbs=thumbs)
            models = S.column_list(table, S.MODEL)
            sub_dup = marked.column(S.DUPLICATE_OF).to_pylist()
            sub_size = marked.column(S.DUP_GROUP_SIZE).to_pylist()
            sub_kind = marked.column(S.DUP_KIND).to_pylist()
            for i in linked.tolist():
                dup_of[i], group[i], kinds[i] = sub_dup[i], sub_size[i], sub_kind[i]
                if sub_kind[i] is not None and passes[i]:
                    reasons[i] = dedup_reason(sub_kind[i], models[i], dedup)
    out = S.set_column(table_in, S.DUPLICATE_OF, pa.array(dup_of, pa.string()))
    out = S.set_column(out, S.DUP_GROUP_SIZE, pa.array(group, pa.int32()))
    out = S.set_column(out, S.DUP_KIND, pa.array(kinds, pa.string()))
    out = S.set_column(out, S.KEEP, pa.array([r is None for r in reasons], pa.bool_()))
    return S.set_column(out, S.DROP_REASON, pa.array(reasons, pa.string()))


def first_decisions(table: pa.Table, filters: FilterConfig, rules: Any = None) -> pa.Table:
    """``table`` with ``keep``/``drop_reason`` from reasons 0-3 only and no duplicate links
    yet: what the write stage stores before the global pass. For a row that no duplicate
    search links it equals :func:`decide`'s result, so the global pass rewrites only the
    files where dedup dropped (or linked) something."""
    reasons = filter_reasons(table, filters, rules)
    n = table.num_rows
    # A row dedup will look at (ok, not taken down, with an image embedding: see decide) is
    # its own group of one until the global pass finds another.
    has_emb = [False] * n
    if filters.duplicates and S.IMAGE_EMBEDDING in table.column_names:
        has_emb = pc.is_valid(table.column(S.IMAGE_EMBEDDING)).to_pylist()
    statuses, taken_down = S.column_list(table, S.STATUS), S.column_list(table, S.TAKEDOWN)
    size = [1 if e and st == S.OK and td is None else None
            for e, st, td in zip(has_emb, statuses, taken_down, strict=True)]
    out = S.set_column(table, S.DUPLICATE_OF, pa.nulls(n, pa.string()))
    out = S.set_column(out, S.DUP_GROUP_SIZE, pa.array(size, pa.int32()))
    out = S.set_column(out, S.DUP_KIND, pa.nulls(n, pa.string()))
    out = S.set_column(out, S.KEEP, pa.array([r is None for r in reasons], pa.bool_()))
    return S.set_column(out, S.DROP_REASON, pa.array(reasons, pa.string()))


def kept_rows(previous: pa.Table) -> pa.Table:
    """The rows of an earlier run's output that it kept (``keep`` true where the column
    exists), for deduplicating a new run against them."""
    if S.KEEP in previous.column_names:
        return previous.filter(pc.fill_null(previous.column(S.KEEP), False))
    return previous


__all__ = [
    "DECISION_COLUMNS",
    "TAKEDOWN_PREFIX",
    "decide",
    "first_decisions",
    "dedup_reason",
    "filter_reasons",
    "kept_rows",
    "short_model",
    "unsafe_reason",
]
