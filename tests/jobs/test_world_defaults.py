"""The job with no settings on a fresh synthetic world, then a similarity takedown on its output
(issue 15, acceptance 5 and 3).

``python jobs/embed_laion.py --input urls.parquet --output out`` as a new user runs it (plus
``--allowed-networks 127.0.0.1/32``: the images are served on loopback, which the address
guard refuses otherwise). Every threshold comes from the bundled model's card. Checked against
the world's ground truth: unsafe recall and false positives, no row dropped as a duplicate of
another scene, exact copies linked whatever else drops them; then ``jobs/takedown.py --like``
of scenes with near copies removes those copies and nothing of other scenes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from jobs.takedown import main as takedown_main
from pipeline import schema as S
from pipeline.takedown import TAKEDOWN
from testkit.http_server import FaultServer
from testkit.synthetic import generate_world

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Not a seed the model was trained or calibrated on (train-*, stage2-*, 31, 32).
SEED = 4711
ROWS = 400


@pytest.fixture(scope="module")
def world_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("defaults-world")
    with FaultServer(root) as srv:
        gt = generate_world(root, ROWS, SEED, srv.base_url + "/", exact_dup_rate=0.06, unsafe_rate=0.1).to_pylist()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env |= {"RAY_TMPDIR": tempfile.mkdtemp(prefix="ccw-", dir="/tmp"), "PYTHONPATH": str(REPO)}
        out = root / "out"
        done = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "embed_laion.py"), "--input", str(root / "urls.parquet"),
             "--output", str(out), "--allowed-networks", "127.0.0.1/32"],
            capture_output=True, text=True, timeout=1200, env=env, cwd=root,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = pq.read_table(out / "embeddings").to_pylist()
        by_url = {r["url"]: r for r in gt}
        for r in rows:
            r["gt"] = by_url[r[S.URL]]
        yield {"root": root, "out": out, "rows": rows, "stdout": done.stdout, "gt": gt}


def test_unsafe_recall_and_false_positives_with_the_models_defaults(world_run: dict[str, Any]) -> None:
    ok = [r for r in world_run["rows"] if r[S.STATUS] == S.OK]
    assert len(ok) >= 0.95 * ROWS
    unsafe = [r for r in ok if r["gt"]["_gt_unsafe"]]
    safe = [r for r in ok if not r["gt"]["_gt_unsafe"]]
    assert len(unsafe) >= 25
    recall = sum(r[S.UNSAFE_CONCEPT] == "hazard" for r in unsafe) / len(unsafe)
    fpr = sum(r[S.UNSAFE_CONCEPT] is not None for r in safe) / len(safe)
    assert recall >= 0.9 and fpr <= 0.02, (recall, fpr)
    # ... and flagged rows are dropped as unsafe, naming the concept's calibrated threshold.
    reasons = {r[S.DROP_REASON] for r in unsafe if r[S.UNSAFE_CONCEPT]}
    assert all(x.startswith("unsafe:hazard(") for x in reasons), reasons
    assert "no row is dropped by moderation" not in world_run["stdout"]
    stats = json.loads((world_run["out"] / "_stats.json").read_text())
    assert any(n.startswith("defaults of tiny-synthetic (synthetic)") for n in stats["notes"])


def test_no_row_is_dropped_as_a_duplicate_of_another_scene(world_run: dict[str, Any]) -> None:
    by_key = {r[S.KEY]: r for r in world_run["rows"]}
    linked = [r for r in world_run["rows"] if r[S.DUPLICATE_OF] is not None]
    assert len(linked) >= 30
    crossed = [(r[S.KEY], r[S.DUPLICATE_OF]) for r in linked
               if by_key[r[S.DUPLICATE_OF]]["gt"]["_gt_scene_id"] != r["gt"]["_gt_scene_id"]]
    assert crossed == []
    # And near copies are found: a near copy and its original end at the same kept row.
    by_row = {r["gt"]["_gt_row"]: r for r in world_run["rows"]}

    def end(r: dict) -> str:
        while r[S.DUPLICATE_OF] is not None:
            r = by_key[r[S.DUPLICATE_OF]]
        return r[S.KEY]

    near = [r for r in world_run["rows"] if r["gt"]["_gt_duplicate_kind"] == "near" and r[S.STATUS] == S.OK
            and by_row[r["gt"]["_gt_duplicate_of"]][S.STATUS] == S.OK]
    found = sum(end(r) == end(by_row[r["gt"]["_gt_duplicate_of"]]) for r in near)
    assert found >= 0.85 * len(near), (found, len(near))


def test_exact_copies_are_linked_whatever_else_drops_them(world_run: dict[str, Any]) -> None:
    groups: dict[int, list[dict]] = {}
    for r in world_run["rows"]:
        if r[S.STATUS] != S.OK:
            continue
        g = r["gt"]
        src = g["_gt_duplicate_of"] if g["_gt_duplicate_kind"] == "exact" else g["_gt_row"]
        groups.setdefault(src, []).append(r)
    exact = {k: v for k, v in groups.items() if len(v) > 1 and any(r["gt"]["_gt_duplicate_kind"] == "exact" for r in v)}
    unsafe_groups = [v for v in exact.values() if v[0]["gt"]["_gt_unsafe"]]
    assert len(exact) >= 10 and unsafe_groups, "the world needs exact copies of unsafe pictures"
    for members in exact.values():
        keys = {r[S.KEY] for r in members}
        unlinked = [r for r in members if r[S.DUPLICATE_OF] is None]
        assert len(unlinked) == 1, [(r[S.KEY], r[S.DROP_REASON]) for r in members]
        assert all(r[S.DUPLICATE_OF] in keys for r in members if r[S.DUPLICATE_OF] is not None)
    # Copies of unsafe pictures are dropped as unsafe and still name their copy.
    for members in unsafe_groups:
        assert all(r[S.DROP_REASON].startswith("unsafe:") for r in members)


def test_similarity_takedown_removes_a_scenes_near_copies_and_nothing_else(world_run: dict[str, Any], tmp_path: Path) -> None:
    rows = world_run["rows"]
    ok = [r for r in rows if r[S.STATUS] == S.OK]
    scene_rows: dict[int, list[dict]] = {}
    for r in ok:
        scene_rows.setdefault(r["gt"]["_gt_scene_id"], []).append(r)
    # Scenes with a near copy stored: query each by its original row.
    queries = {}
    for sid, members in scene_rows.items():
        if any(r["gt"]["_gt_duplicate_kind"] == "near" for r in members):
            originals = [r for r in members if r["gt"]["_gt_duplicate_kind"] == ""]
            if originals:
                queries[sid] = originals[0][S.KEY]
    assert len(queries) >= 10
    out = str(world_run["out"])
    first = next(iter(queries.values()))
    review = tmp_path / "review"
    assert takedown_main(["--output", out, "--like", first, "--dry-run", "--review", str(review)]) == 0
    matches = pq.read_table(review / "matches.parquet").to_pylist()
    assert first in {m["key"] for m in matches}
    assert "<img" in (review / "review.html").read_text()
    assert not any(r[TAKEDOWN] for r in pq.read_table(world_run["out"] / "embeddings").to_pylist() if TAKEDOWN in r)

    # Text queries: the rows whose picture matches "a hazard sign" (CLIP's shared space).
    text_review = tmp_path / "text-review"
    assert takedown_main(["--output", out, "--like-text", "a hazard sign", "--threshold", "0.48",
                          "--dry-run", "--review", str(text_review)]) == 0
    found = {m["key"] for m in pq.read_table(text_review / "matches.parquet").to_pylist()}
    hazard = {r[S.KEY] for r in ok if r["gt"]["_gt_unsafe"]}
    assert len(found & hazard) >= 0.9 * len(hazard) and len(found - hazard) <= 0.05 * len(found)

    argv = ["--output", out, "--reason", "look-alikes"]
    for key in queries.values():
        argv += ["--like", key]
    assert takedown_main(argv) == 0
    after = {r[S.KEY]: r for r in pq.read_table(world_run["out"] / "embeddings").to_pylist()}
    taken = {k for k, r in after.items() if r.get(TAKEDOWN)}
    want = {r[S.KEY] for sid in queries for r in scene_rows[sid]}
    recall = len(taken & want) / len(want)
    assert recall >= 0.95, (recall, sorted(want - taken))
    others = sorted(taken - want)
    assert others == [], [(k, after[k][S.CAPTION]) for k in others]


def test_a_head_trained_on_the_world_filters_a_fresh_world(world_run: dict[str, Any], tmp_path: Path) -> None:
    """Scope 6 end to end: label a run's output, `clipcurate train-head`, `clipcurate calibrate
    --head`, then a job on a fresh world that moderates with the head alone."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401  (pa.compute)
    import yaml

    from pipeline.cli import main as cli

    table = pq.read_table(world_run["out"] / "embeddings")
    unsafe = {r["url"]: r["_gt_unsafe"] for r in world_run["gt"]}
    labelled = table.append_column("_gt_unsafe", pa.array([unsafe[u] for u in table.column(S.URL).to_pylist()]))
    # Train on half the sample, pick the threshold on the other half (a threshold chosen on the
    # training rows sits where the head is overconfident).
    half = pa.array([int(k) % 2 == 0 for k in labelled.column(S.KEY).to_pylist()])
    pq.write_table(labelled.filter(half), tmp_path / "train.parquet")
    pq.write_table(labelled.filter(pa.compute.invert(half)), tmp_path / "calibrate.parquet")
    head = tmp_path / "hazard-head.safetensors"
    assert cli(["train-head", "--input", str(tmp_path / "train.parquet"), "--label_col", "_gt_unsafe",
                "--out", str(head)]) == 0
    assert cli(["calibrate", "--input", str(tmp_path / "calibrate.parquet"), "--model", "tiny-synthetic",
                "--pretrained", "synthetic", "--concept", "hazard=a hazard sign|a warning sign",
                "--head", str(head), "--label_col", "_gt_unsafe", "--target_recall", "0.97",
                "--out", str(tmp_path / "thresholds.yaml")]) == 0
    threshold = yaml.safe_load((tmp_path / "thresholds.yaml").read_text())["head_threshold"]

    root = tmp_path / "fresh"
    with FaultServer(root) as srv:
        gt = {r["url"]: r for r in generate_world(root, 160, SEED + 1, srv.base_url + "/", unsafe_rate=0.15).to_pylist()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env |= {"RAY_TMPDIR": tempfile.mkdtemp(prefix="cch-", dir="/tmp"), "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "embed_laion.py"), "--input", str(root / "urls.parquet"),
             "--output", str(root / "out"), "--allowed-networks", "127.0.0.1/32", "--head", str(head),
             "--set", "moderate.concepts={}", "--set", f"moderate.head_threshold={threshold}"],
            capture_output=True, text=True, timeout=1200, env=env, cwd=root,
        )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [r for r in pq.read_table(root / "out" / "embeddings").to_pylist() if r[S.STATUS] == S.OK]
    pos = [r for r in rows if gt[r[S.URL]]["_gt_unsafe"]]
    neg = [r for r in rows if not gt[r[S.URL]]["_gt_unsafe"]]
    recall = sum(r[S.UNSAFE_SOURCE] == "head" for r in pos) / len(pos)
    fpr = sum(r[S.UNSAFE_SOURCE] is not None for r in neg) / len(neg)
    assert recall >= 0.9 and fpr <= 0.02, (recall, fpr, threshold)
    assert all(r[S.DROP_REASON].startswith("unsafe:head(head probability>") for r in pos if r[S.UNSAFE_SOURCE])
