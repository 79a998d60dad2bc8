"""Moderation scoring (as the embed stage runs it), the safetensors head, thresholds YAML and
calibration; flagged rows' keep/drop_reason as pipeline/decisions.py decides them.

Scores are checked against float64 numpy computations written out in the tests; thresholds
against hand-worked examples.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import yaml
from safetensors.numpy import save

from pipeline import schema as S
from pipeline.calibrate import calibrate
from pipeline.calibrate import main as calibrate_main
from pipeline.config import ConfigError, EmbedConfig, FilterConfig, ModerateConfig
from pipeline.decisions import first_decisions
from pipeline.metrics import UnreachableTarget, confusion_at, threshold_for
from pipeline.schema import embedding_array, embedding_matrix
from pipeline.stages.embed import load_model
from pipeline.stages.moderate import Head, Moderation, Rules, margins

D = 8


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _stage(image_thr: dict, caption_thr: dict, head: Head | None = None, head_thr: float = 0.5) -> Moderation:
    """Moderation with hand-set directions: concept "a" = e0, "b" = e1; neutral = e2, e3."""
    rules = Rules({"a": ("x",), "b": ("y",)}, ("n1", "n2"), image_thr, caption_thr, None, head_thr, "nsfw")
    eye = np.eye(D, dtype=np.float32)
    return Moderation(rules, eye[:2], eye[2:4], head, "m@test")


def _moderated(m: Moderation, batch: pa.Table) -> pa.Table:
    """What the embed stage stores for ``batch``'s embeddings, and the write stage's
    keep/drop_reason for it."""
    dim = m.neutral.shape[1]
    img, img_ok = embedding_matrix(batch.column(S.IMAGE_EMBEDDING), dim)
    txt, txt_ok = embedding_matrix(batch.column(S.TEXT_EMBEDDING), dim)
    out = m.annotate(batch, img, img_ok, txt, txt_ok)
    if S.MODEL not in out.column_names:
        out = out.append_column(S.MODEL, pa.array([m.model_id] * out.num_rows))
    return first_decisions(out, FilterConfig(duplicates=False), m.rules)


def _batch(img: np.ndarray, img_ok: list[bool], txt: np.ndarray, txt_ok: list[bool], status: list[str]) -> pa.Table:
    return pa.table(
        {
            S.KEY: [str(i) for i in range(len(status))],
            S.STATUS: status,
            S.IMAGE_EMBEDDING: embedding_array(img, np.array(img_ok)),
            S.TEXT_EMBEDDING: embedding_array(txt, np.array(txt_ok)),
        }
    )


def test_margins_against_float64() -> None:
    rng = np.random.default_rng(0)
    e = _unit(rng.normal(size=(20, D)))
    c = _unit(rng.normal(size=(3, D)))
    n = _unit(rng.normal(size=(4, D)))
    want = e @ c.T - (e @ n.T).max(axis=1, keepdims=True)
    got = margins(e.astype(np.float32), c.astype(np.float32), n.astype(np.float32))
    assert np.abs(got - want).max() < 1e-6


def test_embedding_matrix_of_a_sliced_column() -> None:
    # Ray hands stages zero-copy slices of blocks: offsets and nulls must be honoured.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(10, D)).astype(np.float32)
    valid = np.array([i % 4 != 1 for i in range(10)])
    col = embedding_array(x, valid).slice(3, 5)
    got, ok = embedding_matrix(col, D)
    assert ok.tolist() == valid[3:8].tolist()
    assert np.array_equal(got[ok], x[3:8][ok].astype(np.float16).astype(np.float32))
    assert not got[~ok].any()


def test_scores_flags_and_keep_columns() -> None:
    # Row 0: image close to concept a (margin 0.8 - 0.1 = 0.7 > 0.3) -> flagged a, image.
    # Row 1: image mildly b (0.5 - 0.4 = 0.1 < 0.2), caption strongly b (0.9 - 0 = 0.9 > 0.6).
    # Row 2: nothing above threshold: score is the largest (margin - threshold), negative.
    # Row 3: failed download, only a caption, which names a -> flagged via caption, but keep
    #        was already false for its status and the drop reason stays the status.
    # Row 4: no embeddings at all -> null score.
    img = np.zeros((5, D), np.float32)
    txt = np.zeros((5, D), np.float32)
    img[0, [0, 2]] = [0.8, 0.1]
    img[1, [1, 2]] = [0.5, 0.4]
    txt[1, 1] = 0.9
    img[2, [0, 3]] = [0.2, 0.3]
    txt[2, 2] = 1.0
    txt[3, [0, 3]] = [0.95, 0.05]
    s = _stage({"a": 0.3, "b": 0.2}, {"a": 0.5, "b": 0.6})
    out = _moderated(s, _batch(img, [True, True, True, False, False], txt, [False, True, True, True, False],
                               [S.OK, S.OK, S.OK, "http_404", "http_404"]))
    score = out.column(S.UNSAFE_SCORE).to_pylist()
    # float16 storage rounds the inputs, hence the tolerance.
    assert score[0] == pytest.approx(0.7 - 0.3, abs=2e-3)
    assert score[1] == pytest.approx(0.9 - 0.6, abs=2e-3)
    # Row 2: image a: 0.2-0.3-0.3 = -0.4, b: 0-0.3-0.2 = -0.5; caption a: 0-1-0.5, b: 0-1-0.6.
    assert score[2] == pytest.approx(-0.4, abs=2e-3)
    assert score[3] == pytest.approx(0.95 - 0.05 - 0.5, abs=2e-3)
    assert score[4] is None
    assert out.column(S.UNSAFE_CONCEPT).to_pylist() == ["a", "b", None, "a", None]
    assert out.column(S.UNSAFE_SOURCE).to_pylist() == ["image", "caption", None, "caption", None]
    assert out.column(S.KEEP).to_pylist() == [False, False, True, False, False]
    reasons = out.column(S.DROP_REASON).to_pylist()
    # One reason vocabulary (pipeline/decisions.py): concept, side, threshold, model.
    assert reasons[0] == "unsafe:a(image margin>0.3; m@test)"
    assert reasons[1] == "unsafe:b(caption margin>0.6; m@test)"
    assert reasons[2] is None
    assert reasons[3] == reasons[4] == "status:http_404"


def test_disabled_side_flags_nothing() -> None:
    img = np.zeros((2, D), np.float32)
    img[:, 0] = 1.0
    s = _stage({"a": None, "b": 0.0}, {"a": None, "b": None})
    out = _moderated(s, _batch(img, [True, True], img, [True, True], [S.OK, S.OK]))
    # Concept a is switched off on both sides; b's margin is 0 - 0 = 0, not > 0.
    assert out.column(S.UNSAFE_CONCEPT).to_pylist() == [None, None]
    assert out.column(S.UNSAFE_SCORE).to_pylist() == [0.0, 0.0]
    assert out.column(S.KEEP).to_pylist() == [True, True]


def _mlp_bytes(rng: np.random.Generator) -> tuple[bytes, list[np.ndarray]]:
    w0 = rng.normal(size=(5, D)).astype(np.float32)
    b0 = rng.normal(size=5).astype(np.float32)
    w1 = rng.normal(size=(1, 5)).astype(np.float32)
    b1 = np.array([0.3], np.float32)
    return save({"layers.0.weight": w0, "layers.0.bias": b0, "layers.1.weight": w1, "layers.1.bias": b1}), [w0, b0, w1, b1]


def test_head_mlp_against_float64_and_flags(tmp_path) -> None:
    rng = np.random.default_rng(1)
    data, (w0, b0, w1, b1) = _mlp_bytes(rng)
    head = Head.from_bytes(data, D)
    e = _unit(rng.normal(size=(30, D)))
    h = np.maximum(e @ w0.T.astype(np.float64) + b0, 0)
    want = 1 / (1 + np.exp(-(h @ w1.T.astype(np.float64) + b1)[:, 0]))
    assert np.abs(head(e.astype(np.float32)) - want).max() < 1e-5

    s = _stage({"a": None, "b": None}, {"a": None, "b": None}, head=head, head_thr=0.6)
    e16 = e.astype(np.float16).astype(np.float32)
    out = _moderated(s, _batch(e16, [True] * 30, e16, [True] * 30, [S.OK] * 30))
    p = head(e16)
    assert out.column(S.UNSAFE_SCORE).to_numpy() == pytest.approx(p - 0.6, abs=1e-6)
    flagged = [c is not None for c in out.column(S.UNSAFE_CONCEPT).to_pylist()]
    assert flagged == list(p > 0.6) and 0 < sum(flagged) < 30
    assert {x for x in out.column(S.UNSAFE_SOURCE).to_pylist() if x} == {"head"}
    assert {x for x in out.column(S.UNSAFE_CONCEPT).to_pylist() if x} == {"nsfw"}


def test_head_rejects_bad_files() -> None:
    rng = np.random.default_rng(2)
    data, _ = _mlp_bytes(rng)
    with pytest.raises(ValueError, match="expects 8-d"):
        Head.from_bytes(data, 16)
    with pytest.raises(ValueError, match="one output"):
        Head.from_bytes(save({"layers.0.weight": np.zeros((2, D), np.float32)}))
    with pytest.raises(ValueError, match="no 'layers.0.weight'"):
        Head.from_bytes(save({"w": np.zeros((1, D), np.float32)}))


def test_threshold_for_hand_worked() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    labels = [1, 1, 0, 1, 0, 1, 0, 0]
    # Recall 0.75 needs the top 4 (3 positives): cut between 0.6 and 0.5.
    c = threshold_for(scores, labels, min_recall=0.75)
    assert c.threshold == pytest.approx(0.55)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 1, 3)
    # Recall 1 needs the top 6: cut between 0.4 and 0.3.
    assert threshold_for(scores, labels, min_recall=1.0).threshold == pytest.approx(0.35)
    # Precision >= 0.75 at most recall: top 4 (3/4) is the lowest such cut (top 6 is 4/6).
    c = threshold_for(scores, labels, min_precision=0.75)
    assert c.threshold == pytest.approx(0.55) and c.precision == 0.75
    assert confusion_at(scores, labels, 0.85).recall == 0.25
    with pytest.raises(UnreachableTarget):
        threshold_for([0.1, 0.9], [1, 0], min_precision=0.9)
    with pytest.raises(ValueError, match="positives and negatives"):
        threshold_for([0.1, 0.9], [1, 1], min_recall=0.9)


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny-synthetic", None)
    return model


def _labelled_sample(stage: Moderation, n: int, seed: int) -> pa.Table:
    """Image embeddings near concept "hazard" for labelled rows, random otherwise."""
    rng = np.random.default_rng(seed)
    dim = stage.neutral.shape[1]
    unsafe = rng.random(n) < 0.3
    mention = unsafe & (rng.random(n) < 0.5)
    noise = _unit(rng.normal(size=(n, dim)))
    # Push along the part of the concept direction the neutral prompt does not share (a random
    # model's text directions are strongly correlated), so labelled rows get large margins.
    n0 = stage.neutral[0]
    d = _unit(stage.directions[0] - (stage.directions[0] @ n0) * n0)
    img = _unit(noise + np.where(unsafe[:, None], 1.5, 0.0) * d + rng.normal(0, 0.3, (n, 1)) * d)
    txt = _unit(noise[::-1] + np.where(mention[:, None], 1.5, 0.0) * d)
    return pa.table(
        {
            S.KEY: [str(i) for i in range(n)],
            S.STATUS: [S.OK] * n,
            S.IMAGE_EMBEDDING: embedding_array(img, np.ones(n, bool)),
            S.TEXT_EMBEDDING: embedding_array(txt, np.ones(n, bool)),
            S.MODEL: ["tiny-synthetic@random-init"] * n,
            "is_unsafe": unsafe,
            "says_unsafe": mention,
        }
    )


def test_calibrate_meets_target_and_job_reads_yaml(tiny, tmp_path) -> None:
    embed = EmbedConfig(model="tiny-synthetic")
    mod = ModerateConfig(concepts={"hazard": ("a hazard sign", "a warning sign")}, neutral_prompts=("a photo",))
    probe = Moderation.prepare(mod, None, tiny)
    sample = _labelled_sample(probe, 400, seed=3)
    doc = calibrate(sample, mod, embed, label_col="is_unsafe", caption_label_col="says_unsafe",
                    target_recall=0.9, model=tiny)
    entry = doc["concepts"]["hazard"]
    assert doc["model"] == "tiny-synthetic@random-init"
    assert entry["prompts"] == ["a hazard sign", "a warning sign"]
    assert entry["image_achieved"]["recall"] >= 0.9
    assert entry["caption_achieved"]["recall"] >= 0.9
    path = tmp_path / "thr.yaml"
    path.write_text(yaml.safe_dump(doc))

    # A fresh sample from the same distribution, scored by a job stage that reads the YAML.
    job = Moderation.prepare(ModerateConfig(concepts={"other": ("x",)}, thresholds_file=str(path)), None, tiny)
    assert list(job.rules.concepts) == ["hazard"]  # the file brings its prompts
    test = _labelled_sample(probe, 400, seed=4)
    out = _moderated(job, test)
    flagged = np.array([c is not None for c in out.column(S.UNSAFE_CONCEPT).to_pylist()])
    unsafe = test.column("is_unsafe").to_numpy()
    says = test.column("says_unsafe").to_numpy()
    assert flagged[unsafe].mean() >= 0.85
    # Independent check of the image side: recompute the margin in float64 from the YAML.
    img = np.asarray(test.column(S.IMAGE_EMBEDDING).to_pylist(), np.float64)
    m = img @ job.directions[0] - (img @ job.neutral.T).max(axis=1)
    src = out.column(S.UNSAFE_SOURCE).to_pylist()
    by_image = m > entry["image_threshold"]
    assert all(flagged[by_image])
    assert all(by_image[i] or src[i] == "caption" for i in np.flatnonzero(flagged))
    assert flagged[~unsafe & ~says].mean() <= 0.05


def test_thresholds_for_another_model_are_refused(tiny, tmp_path) -> None:
    path = tmp_path / "thr.yaml"
    path.write_text(yaml.safe_dump({"model": "ViT-L-14@sha256:00", "concepts": {"c": {"prompts": ["p"], "image_threshold": 0.1}}}))
    cfg = ModerateConfig(thresholds_file=str(path))
    with pytest.raises(ConfigError, match="calibrated for ViT-L-14"):
        Moderation.prepare(cfg, None, tiny)
    path.write_text("just a string")
    with pytest.raises(ConfigError, match="no 'concepts'"):
        Moderation.prepare(cfg, None, tiny)


def test_calibrate_cli_writes_yaml(tiny, tmp_path, capsys) -> None:
    import pyarrow.parquet as pq

    mod = ModerateConfig(concepts={"hazard": ("a hazard sign",)}, neutral_prompts=("a photo",))
    probe = Moderation.prepare(mod, None, tiny)
    pq.write_table(_labelled_sample(probe, 200, seed=5), tmp_path / "sample.parquet")
    # The CLI loads its own copy: the seeded random init makes it the same model as ``tiny``.
    out = tmp_path / "t.yaml"
    rc = calibrate_main(["--input", str(tmp_path / "sample.parquet"), "--out", str(out),
                         "--model", "tiny-synthetic", "--pretrained", "none", "--concept", "hazard=a hazard sign",
                         "--neutral", "a photo", "--label_col", "is_unsafe", "--target_precision", "0.9"])
    assert rc == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["concepts"]["hazard"]["image_achieved"]["precision"] >= 0.9
    assert doc["concepts"]["hazard"]["caption_threshold"] is None
    assert "hazard (image): threshold" in capsys.readouterr().out
    rc = calibrate_main(["--input", str(tmp_path / "sample.parquet"), "--out", str(out),
                         "--model", "tiny-synthetic", "--pretrained", "none", "--label_col", "missing", "--target_recall", "0.9"])
    assert rc == 2


def test_clipcurate_calibrate_subcommand(tiny, tmp_path) -> None:
    import pyarrow.parquet as pq

    from pipeline.cli import main as clipcurate

    mod = ModerateConfig(concepts={"hazard": ("a hazard sign",)}, neutral_prompts=("a photo",))
    probe = Moderation.prepare(mod, None, tiny)
    pq.write_table(_labelled_sample(probe, 200, seed=6), tmp_path / "sample.parquet")
    out = tmp_path / "t.yaml"
    rc = clipcurate(["calibrate", "--input", str(tmp_path / "sample.parquet"), "--out", str(out),
                     "--model", "tiny-synthetic", "--pretrained", "none", "--concept", "hazard=a hazard sign",
                     "--neutral", "a photo", "--label_col", "is_unsafe",
                     "--caption_label_col", "says_unsafe", "--target_recall", "0.9"])
    assert rc == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["concepts"]["hazard"]["caption_achieved"]["recall"] >= 0.9
