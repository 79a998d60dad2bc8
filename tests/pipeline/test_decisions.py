"""Final keep/drop decisions on hand-worked rows (pipeline/decisions.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.config import DedupConfig, FilterConfig
from pipeline.decisions import decide, kept_rows, short_model
from pipeline.stages.moderate import Rules

MODEL = "tiny-synthetic@sha256:ab12cd34ef56" + "0" * 52
SHORT = "tiny-synthetic@sha256:ab12cd34ef56…"


def _unit(*v: float) -> list[float]:
    a = np.array(v, np.float64)
    return (a / np.linalg.norm(a)).tolist()


E1 = _unit(1, 0, 0, 0)
E2 = _unit(0, 1, 0, 0)
E2_NEAR = _unit(0.1, 1, 0, 0)  # cos(E2, E2_NEAR) = 0.995
E3 = _unit(0, 0, 1, 0)
E4 = _unit(0, 0, 0, 1)
E5 = _unit(1, 1, 1, 1)

# key, status, clip_score, embedding, sha256, unsafe_score, concept, source
ROWS = [
    ("k00", "ok", 0.35, E1, "A", -0.10, None, None),  # kept: best of the exact group
    ("k01", "ok", 0.30, E1, "A", -0.10, None, None),  # same bytes as k00
    ("k02", "ok", 0.40, E2, "B", -0.20, None, None),  # kept: better clip_score than k03
    ("k03", "ok", 0.33, E2_NEAR, "C", -0.20, None, None),  # near duplicate of k02
    ("k04", "http_404", None, None, None, None, None, None),
    ("k05", "ok", 0.20, E3, "D", -0.30, None, None),  # clip_score below 0.28
    ("k06", "ok", 0.50, E4, "E", 0.07, "hazard", "image"),  # unsafe: margin 0.05 + 0.07
    ("k07", "ok", 0.45, E4, "F", -0.01, None, None),  # same picture as k06 (which is dropped)
    ("k08", "ok", None, E5, "G", -0.05, None, None),  # no caption: no clip_score
    ("k09", "decode_error", None, None, None, None, None, None),
    ("k10", "ok", 0.60, E3, "H", 0.25, "hazard", "caption"),  # unsafe by its caption
]
RULES = Rules(
    concepts={"hazard": ("a hazard sign",)},
    neutral_prompts=("a photo",),
    image_thresholds={"hazard": 0.05},
    caption_thresholds={"hazard": 0.10},
    head_path=None,
    head_threshold=0.5,
    head_concept="head",
)


def _table(rows=ROWS) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    emb_type = S.embedding_type(4)
    return pa.table(
        {
            S.KEY: pa.array(cols[0], pa.string()),
            S.STATUS: pa.array(cols[1], pa.string()),
            S.CLIP_SCORE: pa.array(cols[2], pa.float32()),
            S.IMAGE_EMBEDDING: pa.array(
                [None if e is None else np.float16(e).tolist() for e in cols[3]], emb_type
            ),
            S.SHA256: pa.array(cols[4], pa.string()),
            S.UNSAFE_SCORE: pa.array(cols[5], pa.float32()),
            S.UNSAFE_CONCEPT: pa.array(cols[6], pa.string()),
            S.UNSAFE_SOURCE: pa.array(cols[7], pa.string()),
            S.MODEL: pa.array([MODEL] * len(rows), pa.string()),
            # What the stream wrote before the decisions: must not influence them.
            S.KEEP: pa.array([True] * len(rows)),
            S.DROP_REASON: pa.array(["stale"] * len(rows), pa.string()),
        }
    )


FILTERS = FilterConfig(clip_score_threshold=0.28, unsafe=True, duplicates=True)
DEDUP = DedupConfig(threshold=0.95)


def test_each_filter_names_its_threshold_and_model() -> None:
    out = decide(_table(), FILTERS, DEDUP, RULES)
    got = dict(zip(out[S.KEY].to_pylist(), out[S.DROP_REASON].to_pylist(), strict=True))
    assert got == {
        "k00": None,
        "k01": "dedup:exact(sha256)",
        "k02": None,
        "k03": f"dedup:semantic(cos>=0.95; {SHORT})",
        "k04": "status:http_404",
        "k05": f"clip_score<0.28 ({SHORT})",
        "k06": f"unsafe:hazard(image margin>0.05; {SHORT})",
        # k06 is dropped as unsafe, so its twin k07 is not a duplicate of a dropped row.
        "k07": None,
        "k08": f"clip_score<0.28 ({SHORT}; no caption)",
        "k09": "status:decode_error",
        "k10": f"unsafe:hazard(caption margin>0.1; {SHORT})",
    }
    keep = dict(zip(out[S.KEY].to_pylist(), out[S.KEEP].to_pylist(), strict=True))
    assert [k for k, v in keep.items() if v] == ["k00", "k02", "k07"]
    dup = dict(zip(out[S.KEY].to_pylist(), out[S.DUPLICATE_OF].to_pylist(), strict=True))
    assert dup["k01"] == "k00" and dup["k03"] == "k02"
    # Rows dropped by another filter still name their picture's other row (and keep their
    # reason): k06 (unsafe) shows k07's picture; k05 (low clip_score) and k10 (unsafe) share
    # one, and k10 ranks first by clip_score. Passing rows rank first, so k07 is not k06's.
    assert dup["k06"] == "k07" and dup["k05"] == "k10"
    assert [k for k, v in dup.items() if v] == ["k01", "k03", "k05", "k06"]
    kinds = out["dup_kind"].to_pylist()
    assert kinds[1] == "exact" and kinds[3] == "semantic" and kinds[6] == "semantic"
    sizes = dict(zip(out[S.KEY].to_pylist(), out["dup_group_size"].to_pylist(), strict=True))
    assert sizes["k00"] == 2 and sizes["k02"] == 2 and sizes["k07"] == 2 and sizes["k10"] == 2
    # Failed rows have no group.
    assert sizes["k04"] is None and sizes["k09"] is None


def test_exact_copies_are_linked_whatever_drops_them() -> None:
    """Three rows with the same bytes: one unsafe, one below the clip_score threshold, one
    kept. Both dropped rows name the kept one; neither changes who is kept."""
    rows = [
        ("u", "ok", 0.50, E4, "SAME", 0.07, "hazard", "image"),
        ("c", "ok", 0.10, E4, "SAME", -0.01, None, None),
        ("k", "ok", 0.40, E4, "SAME", -0.01, None, None),
        ("x", "ok", 0.90, E1, "OTHER", 0.2, "hazard", "image"),
    ]
    out = decide(_table(rows), FILTERS, DEDUP, RULES).to_pylist()
    by = {r[S.KEY]: r for r in out}
    assert by["k"][S.KEEP] and by["k"][S.DUPLICATE_OF] is None
    assert by["u"][S.DUPLICATE_OF] == "k" and by["u"][S.DROP_REASON].startswith("unsafe:")
    assert by["c"][S.DUPLICATE_OF] == "k" and by["c"][S.DROP_REASON].startswith("clip_score<")
    assert by["u"]["dup_kind"] == by["c"]["dup_kind"] == "exact"
    assert by["x"][S.DUPLICATE_OF] is None and not by["x"][S.KEEP]


def test_rows_are_never_removed_or_reordered_and_other_columns_untouched() -> None:
    t = _table()
    out = decide(t, FILTERS, DEDUP, RULES)
    assert out.num_rows == t.num_rows
    for c in (S.KEY, S.STATUS, S.CLIP_SCORE, S.IMAGE_EMBEDDING, S.SHA256, S.MODEL):
        assert out[c].equals(t[c])


def test_decisions_of_their_own_output_are_the_same() -> None:
    once = decide(_table(), FILTERS, DEDUP, RULES)
    assert decide(once, FILTERS, DEDUP, RULES).equals(once)


def test_filters_off_leave_only_failed_statuses_dropped() -> None:
    off = FilterConfig(clip_score_threshold=None, unsafe=False, duplicates=False)
    out = decide(_table(), off, DEDUP, RULES)
    reasons = out[S.DROP_REASON].to_pylist()
    assert [r for r in reasons if r] == ["status:http_404", "status:decode_error"]
    assert out[S.DUPLICATE_OF].null_count == out.num_rows


def test_unsafe_reason_without_rules_names_the_score_rule() -> None:
    out = decide(_table(), FILTERS, DEDUP, rules=None)
    assert out[S.DROP_REASON][6].as_py() == f"unsafe:hazard(image unsafe_score>0; {SHORT})"


def test_previous_run_drops_only_repeats_of_rows_it_kept() -> None:
    previous = pa.table(
        {
            S.KEY: ["p0", "p1"],
            S.SHA256: ["zz0", "zz1"],
            S.IMAGE_EMBEDDING: pa.array([np.float16(E1).tolist(), np.float16(E2).tolist()], S.embedding_type(4)),
            S.STATUS: ["ok", "ok"],
            S.DUPLICATE_OF: pa.array([None, None], pa.string()),
            S.KEEP: [True, False],  # the earlier run dropped p1 (e.g. unsafe)
        }
    )
    out = decide(_table(), FILTERS, DEDUP, RULES, previous=kept_rows(previous))
    got = dict(zip(out[S.KEY].to_pylist(), out[S.DROP_REASON].to_pylist(), strict=True))
    prev_reason = f"dedup:previous_run(cos>=0.95 or sha256; {SHORT})"
    assert got["k00"] == prev_reason
    assert out[S.DUPLICATE_OF][0].as_py() == "p0"
    # k01 has k00's bytes: still an exact duplicate of k00, which now points at p0.
    assert got["k01"] == "dedup:exact(sha256)"
    # p1 was not kept, so k02 (same picture as p1) is new and stays.
    assert got["k02"] is None and got["k03"] == f"dedup:semantic(cos>=0.95; {SHORT})"


def test_short_model() -> None:
    assert short_model(MODEL) == SHORT
    assert short_model("ViT-B-32@random-init") == "ViT-B-32@random-init"
    assert short_model(None) == "unknown model"


def test_a_taken_down_row_stays_down_whatever_its_scores() -> None:
    t = _table()
    marks = [None] * t.num_rows
    marks[2] = "DMCA 2026-118"  # k02 was the keeper of the near-duplicate pair
    t = t.append_column("takedown", pa.array(marks, pa.string()))
    # pipeline/takedown/ also removes the image embedding of a taken-down row.
    emb = t[S.IMAGE_EMBEDDING].to_pylist()
    emb[2] = None
    t = t.set_column(t.column_names.index(S.IMAGE_EMBEDDING), S.IMAGE_EMBEDDING, pa.array(emb, S.embedding_type(4)))
    out = decide(t, FILTERS, DEDUP, RULES)
    assert out[S.DROP_REASON][2].as_py() == "takedown: DMCA 2026-118" and out[S.KEEP][2].as_py() is False
    # Its near twin k03 no longer has a kept row it duplicates, so it is kept now.
    assert out[S.DROP_REASON][3].as_py() is None and out[S.KEEP][3].as_py() is True
    assert decide(out, FILTERS, DEDUP, RULES).equals(out)


def test_one_image_caption_pair_twice_gets_one_decision() -> None:
    """The same bytes with the same caption, scored a hair apart (the model's numbers differ
    by batch under bf16/fp16): both copies are judged by the first key's scores, so the
    threshold treats them alike and dedup keeps the first key, not the noisier score. The
    stored scores stay each row's own. Another caption on the same bytes is its own pair."""
    rows = [
        ("k0", "ok", 0.2799, E1, "A", -0.10, None, None),
        ("k1", "ok", 0.2801, E1, "A", -0.10, None, None),  # k0's pair, just above 0.28
        ("k2", "ok", 0.3401, E2, "B", 0.0495, None, None),
        ("k3", "ok", 0.3403, E2, "B", 0.0505, "hazard", "image"),  # k2's pair, margin noise
    ]
    t = _table(rows).append_column(S.CAPTION, pa.array(["a cat", "a cat", "a dog", "a dog"]))
    out = decide(t, FILTERS, DEDUP, RULES)
    assert out[S.DROP_REASON].to_pylist() == [f"clip_score<0.28 ({SHORT})"] * 2 + [None, "dedup:exact(sha256)"]
    assert out[S.DUPLICATE_OF].to_pylist()[3] == "k2"
    assert out[S.CLIP_SCORE].to_pylist() == t[S.CLIP_SCORE].to_pylist()
    # k1 with a caption of its own is judged on its own score: kept, k0 below the threshold.
    t2 = t.set_column(t.column_names.index(S.CAPTION), S.CAPTION, pa.array(["a cat", "a kitten", "a dog", "a dog"]))
    assert decide(t2, FILTERS, DEDUP, RULES)[S.KEEP].to_pylist()[:2] == [False, True]


def test_only_ok_rows_with_repeated_bytes_share_scores() -> None:
    """A failed row with the same bytes and caption neither lends its scores nor takes them,
    and rows without a sha256 are each their own pair."""
    rows = [
        ("k0", "decode_error", 0.9, None, "A", None, None, None),  # first key, but not ok
        ("k1", "ok", 0.2799, E1, "A", -0.10, None, None),
        ("k2", "ok", 0.2801, E2, None, -0.10, None, None),
        ("k3", "ok", 0.2801, E3, None, -0.10, None, None),
    ]
    t = _table(rows).append_column(S.CAPTION, pa.array(["a cat"] * 4))
    out = decide(t, FILTERS, DEDUP, RULES)
    # k1 keeps its own 0.2799 (below 0.28), not the failed row's 0.9; k2 and k3 keep theirs.
    assert out[S.KEEP].to_pylist() == [False, False, True, True]
    assert out[S.DROP_REASON].to_pylist()[1] == f"clip_score<0.28 ({SHORT})"
