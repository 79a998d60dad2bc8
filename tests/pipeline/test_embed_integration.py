"""The whole job on Ray Data (local Ray) + local S3 + the synthetic image server, with the
bundled tiny model: read -> download -> decode -> shard -> tokenize -> embed -> write, then the
global pass.

Thresholds are calibrated on a different seed's world (embedded by the same stages, without a
scheduler or HTTP) and then used by the job on the test world.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image, ImageOps

import clip_model
from pipeline import schema as S
from pipeline.calibrate import calibrate
from pipeline.config import (
    ConfigError,
    DecodeConfig,
    DownloadConfig,
    EmbedConfig,
    ExecutionConfig,
    FilterConfig,
    JobConfig,
    ModerateConfig,
    ReadConfig,
    ShardConfig,
    WriteConfig,
)
from pipeline.job import run
from testkit.embedding import embed_images
from testkit.evaluate_model import roc_auc
from testkit.http_server import FaultServer
from testkit.synthetic import HAZARD_PROMPT, generate_world

pytestmark = pytest.mark.machine_wide  # starts a Ray of its own (tests/conftest.py)

MODEL, WEIGHTS = "tiny-synthetic", "synthetic"
ROWS = 500
WORLD = dict(mismatch_rate=0.1, exact_dup_rate=0.03, near_dup_rate=0.05, unsafe_rate=0.2, min_side=96, max_side=320)
HAZARD = {"hazard": (HAZARD_PROMPT, "a warning sign", "a danger sign")}
NEUTRAL = ("a photo", "an image", "a picture")
# The world's scenes fill the centred square of each image, so a center crop stores every object
# and the tiny model sees them as it was trained to (border mode adds bars it never saw).
DECODE = DecodeConfig(image_size=128, resize_mode="center_crop")
# Rows whose URL is replaced by a fault, and the status each must end with.
FAULTS = {
    3: ("404", {}, "http_404"),
    10: ("500", {}, "http_500"),
    17: ("close", {}, "connection_error"),
    24: ("lie_type", {"body": "html"}, None),  # an HTML page: a decode-stage failure
    31: ("truncate", {"frac": 0.3}, None),  # a cut file: truncated or decode error
    38: ("bomb_png", {}, "too_many_pixels"),
    45: ("optout", {}, "opt_out"),
}


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray started after the S3 server so workers inherit its endpoint and credentials.
    No GPUs, whatever the machine has: the fail-fast test relies on it."""
    import ray

    from pipeline.ray_start import init_ray

    if ray.is_initialized():  # started before the S3 server: its workers lack the endpoint
        ray.shutdown()
    init_ray(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _calibration_rows(root: Path, table: pa.Table) -> pa.Table:
    """The calibration world through the job's own decode, tokenize and embed stages."""
    images = [(root / p).read_bytes() for p in table.column("_gt_path").to_pylist()]
    extra = {c: table.column(c) for c in ("_gt_unsafe", "_gt_hazard_in_caption")}
    return embed_images(images, table.column("caption").to_pylist(), MODEL, WEIGHTS, DECODE, extra=extra)


def _fault_url(srv: FaultServer, path: str, fault: str, params: dict) -> str:
    if fault == "optout":
        return srv.url(path, optout="noai")
    return srv.url(path, fault, **params)


def _s3fs() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://")[1], scheme="http")


def _read(fs: pafs.S3FileSystem, path: str) -> pa.Table:
    return pads.dataset(path, format="parquet", filesystem=fs).to_table().sort_by(S.KEY)


@pytest.fixture(scope="module")
def runs(ray_local, s3_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Calibrate on world 101; run the job on world 7 (with faults); then lose the Parquet
    files and run again, which must re-embed every committed shard from its tar."""
    tmp = tmp_path_factory.mktemp("embed-integration")
    cal_root = tmp / "cal"
    cal = generate_world(cal_root, 300, 101, "http://127.0.0.1/", **WORLD)
    moderate = ModerateConfig(concepts=HAZARD, neutral_prompts=NEUTRAL)
    embed_cfg = EmbedConfig(model=MODEL, pretrained=WEIGHTS, inference_batch=64,
                            concurrency=(1, 2), debug_worker_column=True)
    # Image side only: a hazard scene is a picture with the sign, whatever its caption says. A
    # caption side calibrated to the same recall target (0.95) sits at a margin where captions
    # that do not name a hazard cross it too (~5% on world 101, 8% false positives in all here).
    doc = calibrate(_calibration_rows(cal_root, cal), moderate, embed_cfg, label_col="_gt_unsafe",
                    target_recall=0.95)
    thresholds = tmp / "thresholds.yaml"
    thresholds.write_text(yaml.safe_dump(doc))

    bucket = f"embed-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    base = f"s3://{bucket}/run"
    root = tmp / "world"
    fs = _s3fs()
    with FaultServer(root) as srv:
        world = generate_world(root, ROWS, 7, srv.base_url + "/", **WORLD)
        urls = world.column("url").to_pylist()
        for row, (fault, params, _) in FAULTS.items():
            urls[row] = _fault_url(srv, world.column("_gt_path")[row].as_py(), fault, params)
        world = world.set_column(0, "url", pa.array(urls))
        pq.write_table(world, root / "urls_faults.parquet")
        job = JobConfig(
            input=str(root / "urls_faults.parquet"),
            output=base,
            read=ReadConfig(save_additional_columns=("_gt_row", "_gt_unsafe")),
            download=DownloadConfig(timeout=5, retries=0, allowed_networks=("127.0.0.1/32",)),
            decode=DECODE,
            shard=ShardConfig(number_sample_per_shard=128),
            embed=embed_cfg,
            moderate=ModerateConfig(thresholds_file=str(thresholds)),
            write=WriteConfig(row_group_rows=100),
            filter=FilterConfig(duplicates=False),
            execution=ExecutionConfig(scheduler="ray"),
        )
        started = time.time()
        first = run(job, lambda line: None)
        elapsed = time.time() - started
        listed = sorted(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/run/embeddings")))
        out = _read(fs, f"{bucket}/run/embeddings")
        for i in range(4):
            fs.delete_file(f"{bucket}/run/embeddings/{i:05d}.parquet")
        requests = srv.count()
        again = run(job, lambda line: None)
        redo = _read(fs, f"{bucket}/run/embeddings")
        # Once more, the stored JPEGs decoded by the embedding actors (embed.stored_decode).
        for i in range(4):
            fs.delete_file(f"{bucket}/run/embeddings/{i:05d}.parquet")
        on_device = run(replace(job, embed=replace(embed_cfg, stored_decode="device")), lambda line: None)
        new_requests = srv.count() - requests
    print(f"full graph: {ROWS} rows in {elapsed:.1f} s")
    yield {
        "doc": doc, "world": world, "first": first, "again": again, "listed": listed, "out": out,
        "redo": redo, "new_requests": new_requests, "fs": fs, "on_device": on_device,
        "redo_device": _read(fs, f"{bucket}/run/embeddings"),
        "bucket": bucket, "world_root": str(root),
    }
    fs.delete_dir_contents(bucket)


def _ray_data() -> Any:
    import ray

    return ray.data


def _ok_rows(runs: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in runs["out"].to_pylist() if r[S.STATUS] == S.OK]


def _truth(runs: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["_gt_row"]: r for r in runs["world"].to_pylist()}


@pytest.mark.slow
def test_every_input_row_once_in_files_named_by_shard(runs) -> None:
    assert runs["first"].rows_this_run == ROWS and runs["first"].shards_planned == 4
    assert runs["listed"] == [f"{i:05d}.parquet" for i in range(4)]
    out = runs["out"]
    assert out.num_rows == ROWS
    assert sorted(out.column("_gt_row").to_pylist()) == list(range(ROWS))
    assert len(set(out.column(S.KEY).to_pylist())) == ROWS
    dim = clip_model.get_model_config(MODEL).embed_dim
    for col in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
        t = out.schema.field(col).type
        assert pa.types.is_fixed_size_list(t) and t.value_type == pa.float16() and t.list_size == dim
    # Ray Data reads the files back as well.
    ds = _ray_data().read_parquet(f"{runs['bucket']}/run/embeddings", filesystem=runs["fs"])
    assert ds.count() == ROWS


@pytest.mark.slow
def test_failed_rows_keep_status_and_caption_embedding(runs) -> None:
    by_row = {r["_gt_row"]: r for r in runs["out"].to_pylist()}
    for row, (_, _, status) in FAULTS.items():
        got = by_row[row][S.STATUS]
        assert got != S.OK and (status is None or got == status), (row, got)
        assert by_row[row][S.IMAGE_EMBEDDING] is None and by_row[row][S.TEXT_EMBEDDING] is not None
        assert by_row[row][S.KEEP] is False and by_row[row][S.DROP_REASON] == f"status:{got}"
    assert len(_ok_rows(runs)) == ROWS - len(FAULTS)  # every other row of the world decodes


@pytest.mark.slow
def test_embeddings_unit_norm_and_model_id(runs) -> None:
    for r in _ok_rows(runs):
        for col in (S.IMAGE_EMBEDDING, S.TEXT_EMBEDDING):
            assert abs(np.linalg.norm(np.asarray(r[col], np.float64)) - 1) <= 1e-3
    assert set(runs["out"].column(S.MODEL).to_pylist()) == {runs["doc"]["model"]}
    sha = clip_model.pretrained.get_pretrained_entry(MODEL, WEIGHTS).sha256
    assert runs["doc"]["model"] == f"{MODEL}@sha256:{sha}"


@pytest.mark.slow
def test_clip_score_separates_mismatched_captions(runs) -> None:
    gt = _truth(runs)
    orig = [r for r in _ok_rows(runs) if gt[r["_gt_row"]]["_gt_duplicate_kind"] == ""]
    auc = roc_auc([r[S.CLIP_SCORE] for r in orig], [gt[r["_gt_row"]]["_gt_caption_matches"] for r in orig])
    assert auc >= 0.95, auc


@pytest.mark.slow
def test_hazard_scenes_flagged_with_thresholds_from_another_world(runs) -> None:
    gt = _truth(runs)
    ok = _ok_rows(runs)
    flagged = np.array([r[S.UNSAFE_CONCEPT] == "hazard" for r in ok])
    unsafe = np.array([gt[r["_gt_row"]]["_gt_unsafe"] for r in ok])
    for r, f in zip(ok, flagged, strict=True):
        if f:
            assert r[S.KEEP] is False and r[S.DROP_REASON].startswith("unsafe:hazard(image margin>")
    assert unsafe.sum() >= 50
    recall, fpr = flagged[unsafe].mean(), flagged[~unsafe].mean()
    image_auc = roc_auc([r[S.UNSAFE_SCORE] for r in ok], unsafe)
    assert recall >= 0.9 and fpr <= 0.05, (
        f"hazard recall {recall:.3f}, false positive rate {fpr:.3f} (unsafe_score ROC AUC "
        f"{image_auc:.3f}); calibration on world 101 reached {runs['doc']['concepts']['hazard']}"
    )


@pytest.mark.slow
def test_embeddings_equal_clip_model_on_the_downloaded_image(runs) -> None:
    """Decode once: each embedding is clip_model's own transform of the downloaded image (not
    of the stored copy), and each text embedding its tokenizer's."""
    model, preprocess = clip_model.create_model_and_transforms(MODEL, pretrained=WEIGHTS, device="cpu")
    root = Path(runs["world_root"])
    gt = _truth(runs)
    sample = _ok_rows(runs)[::40]
    assert {r[S.EMBEDDED_FROM] for r in _ok_rows(runs)} == {"original"}
    with torch.inference_mode():
        for r in sample:
            image = ImageOps.exif_transpose(Image.open(root / gt[r["_gt_row"]]["_gt_path"]))
            rgba = image.convert("RGBA")  # the decode stage flattens transparency onto white
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
            want_img = model.encode_image(preprocess(flat)[None], normalize=True)[0].numpy()
            want_txt = model.encode_text(clip_model.tokenize([r[S.CAPTION]]), normalize=True)[0].numpy()
            # Cosine, not per element: on a CPU with native bf16 the job's default precision
            # is bf16 autocast (within cosine 1e-4 of fp32, test_embed.py), stored as float16.
            got_img = np.asarray(r[S.IMAGE_EMBEDDING], np.float64)
            got_txt = np.asarray(r[S.TEXT_EMBEDDING], np.float64)
            assert got_img @ want_img / np.linalg.norm(got_img) >= 0.9999, r["_gt_row"]
            assert got_txt @ want_txt / np.linalg.norm(got_txt) >= 0.9999, r["_gt_row"]
            # clip_score is the cosine of the row's own two embeddings (float16 storage rounds
            # each value by <= 2^-11 of itself, which moves a cosine by ~1e-3 at most)...
            own = got_img @ got_txt / np.linalg.norm(got_img) / np.linalg.norm(got_txt)
            assert abs(r[S.CLIP_SCORE] - own) <= 1.5e-3
            # ...and close to fp32 clip_model's: on this world bf16 autocast alone moves it by up
            # to 0.0027 (every row, the transform's exact pixels), the decode task's pixels by
            # up to 0.0013 more in fp32; 2e-3 held only for the rows this sample happened to hit.
            cos = float(np.dot(want_img.astype(np.float64), want_txt.astype(np.float64)))
            assert abs(r[S.CLIP_SCORE] - cos) <= 4e-3


def _assert_same_rows_from_stored(first: pa.Table, again: pa.Table) -> list[bool]:
    """``again`` (a resumed run's output) has ``first``'s keys and statuses, and every ok row
    says it was embedded from the stored copy; returns which rows are ok."""
    assert again.column(S.KEY).to_pylist() == first.column(S.KEY).to_pylist()
    assert again.column(S.STATUS).to_pylist() == first.column(S.STATUS).to_pylist()
    ok = [s == S.OK for s in first.column(S.STATUS).to_pylist()]
    assert {v for v, o in zip(again.column(S.EMBEDDED_FROM).to_pylist(), ok, strict=True) if o} == {"stored"}
    return ok


def _vectors(table: pa.Table, column: str) -> np.ndarray:
    """The non-null embeddings of ``column`` as float64 [M, D]."""
    return np.asarray([v for v in table.column(column).to_pylist() if v is not None], np.float64)


@pytest.mark.slow
def test_resume_reembeds_the_stored_copies(runs) -> None:
    again, out, redo = runs["again"], runs["out"], runs["redo"]
    assert (again.shards_downloaded, again.shards_reembedded, again.rows_this_run) == (0, 4, ROWS)
    assert runs["new_requests"] == 0  # nothing downloaded again
    _assert_same_rows_from_stored(out, redo)
    # The stored copy (a 128 px centre crop, re-encoded as JPEG) embeds close to the original.
    a, b = _vectors(out, S.IMAGE_EMBEDDING), _vectors(redo, S.IMAGE_EMBEDDING)
    cos = (a * b).sum(axis=1)
    assert len(a) == len(b) and np.median(cos) >= 0.99 and cos.min() >= 0.95, (np.median(cos), cos.min())
    t_a, t_b = _vectors(out, S.TEXT_EMBEDDING), _vectors(redo, S.TEXT_EMBEDDING)
    assert np.abs(t_a - t_b).max() <= 1e-3  # captions are the same either way
    # Every row names the embedding worker that embedded it (host:pid).
    workers = set(redo.column(S.EMBED_WORKER).to_pylist())
    assert None not in workers and all(":" in w for w in workers), workers


@pytest.mark.slow
def test_resume_with_stored_jpegs_decoded_by_the_embedding_actors(runs) -> None:
    """embed.stored_decode "device" on Ray Data: the same rows, statuses and decisions as the
    CPU workers' decode, embeddings within cosine 1e-4 of theirs (both runs at the job's
    precision, so the bound holds the two decodes' few-level pixel differences)."""
    redo, dev, again = runs["redo"], runs["redo_device"], runs["on_device"]
    assert (again.shards_downloaded, again.shards_reembedded, again.rows_this_run) == (0, 4, ROWS)
    ok = _assert_same_rows_from_stored(redo, dev)
    a, b = _vectors(redo, S.IMAGE_EMBEDDING), _vectors(dev, S.IMAGE_EMBEDDING)
    assert len(a) == len(b) == sum(ok)
    cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    # Keep/drop follows: a row may flip only where its clip_score sits within ~1e-4 of the cut.
    flips = sum(x != y for x, y in zip(dev.column(S.KEEP).to_pylist(), redo.column(S.KEEP).to_pylist(), strict=True))
    assert flips <= 1, flips


def test_gpu_request_without_gpus_fails_fast(ray_local, tmp_path) -> None:
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.jpg"], "caption": ["x"]}), tmp_path / "in.parquet")
    cfg = JobConfig(input=str(tmp_path / "in.parquet"), output=str(tmp_path / "out"),
                    embed=EmbedConfig(num_gpus=1), execution=ExecutionConfig(scheduler="ray"))
    started = time.time()
    with pytest.raises(ConfigError, match=r"needs 1 GPU\(s\), but there are 0"):
        run(cfg, lambda line: None)
    assert time.time() - started < 10
    assert not (tmp_path / "out" / "shards").exists()
