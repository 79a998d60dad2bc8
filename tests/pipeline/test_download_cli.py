"""End to end: ``clipcurate download`` on local Ray against the loopback fault server."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import ConfigError
from testkit.http_server import FaultServer
from tests.ray_data_warnings import IGNORE_LEGACY_FIELDS

N_GOOD = 40
PER_SHARD = 16


pytestmark = [
    pytest.mark.shared_ray,
    IGNORE_LEGACY_FIELDS,
]


@pytest.fixture(scope="module")
def ray_local(shared_ray: None) -> None:
    """The shared local Ray (tests/conftest.py), started after the local S3 server so Ray's
    workers inherit its endpoint and credentials from the environment, as they would inherit
    real ones on a cluster."""


def _images() -> dict[str, bytes]:
    files = {}
    for i in range(N_GOOD):
        im = Image.new("RGB", (120 + 7 * i, 90 + 3 * i), (6 * i % 256, 128, 255 - 6 * i % 256))
        buf = io.BytesIO()
        im.save(buf, "PNG" if i % 5 == 0 else "JPEG", quality=90)
        files[f"/img/{i}.{'png' if i % 5 == 0 else 'jpg'}"] = buf.getvalue()
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultServer, FaultServer, Path, dict]]:
    files = _images()
    root = tmp_path_factory.mktemp("urls")
    with FaultServer(files=files) as srv, FaultServer(host="127.0.0.2", files=files) as other:
        rows: list[tuple[str | None, str | None, str]] = []  # url, caption, expected status
        for i, path in enumerate(files):
            rows.append((srv.url(path), f"image number {i}", "ok"))
        good = list(files)[0]
        rows += [
            (srv.url("/nothing.jpg"), "gone", "http_404"),
            (srv.url(good, fault="truncate", frac="0.5"), "cut", "truncated"),
            (srv.url(good, fault="lie_type", body="html"), "html", "unsupported_format"),
            (srv.url("/bomb.png", fault="bomb_png"), "bomb", "too_many_pixels"),
            (srv.url("/bomb.gif", fault="bomb_gif"), "frames", "too_many_frames"),
            (srv.url(good, optout="noai"), "opted out", "opt_out"),
            (other.url(good), "other host", "blocked_address"),
            (None, "no url", "missing_url"),
            ("ftp://127.0.0.1/x.jpg", "ftp", "bad_scheme"),
        ]
        pq.write_table(
            pa.table(
                {
                    "url": [r[0] for r in rows],
                    "caption": [r[1] for r in rows],
                    "row_id": list(range(len(rows))),
                }
            ),
            root / "urls.parquet",
        )
        expected = {i: r[2] for i, r in enumerate(rows)}
        yield srv, other, root / "urls.parquet", expected


def _args(url_list: Path | str, out: str, *extra: str) -> list[str]:
    return [
        "download",
        "--url_list", str(url_list),
        "--output_folder", out,
        "--input_format", "parquet",
        "--url_col", "url",
        "--caption_col", "caption",
        "--save_additional_columns", "row_id",
        "--image_size", "64",
        "--resize_mode", "border",
        "--number_sample_per_shard", str(PER_SHARD),
        "--timeout", "10",
        "--retries", "0",
        "--allowed_networks", "127.0.0.1/32",
        *extra,
    ]  # fmt: skip


def _all_rows(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("[0-9]*.parquet")))


def test_download_end_to_end_and_resume(ray_local: None, world: tuple, tmp_path: Path, capsys) -> None:
    srv, other, url_list, expected = world
    out = tmp_path / "out"
    srv.reset_log()
    assert main(_args(url_list, str(out))) == 0
    n_rows = len(expected)
    n_shards = -(-n_rows // PER_SHARD)
    printed = capsys.readouterr().out
    assert f"rows: {n_rows}  successes: {N_GOOD}" in printed

    # Acceptance 5: every input row exactly once, with its status.
    table = _all_rows(out)
    assert sorted(table.column("row_id").to_pylist()) == list(range(n_rows))
    got = dict(zip(table.column("row_id").to_pylist(), table.column("status").to_pylist(), strict=True))
    assert got == expected
    assert len(set(table.column("key").to_pylist())) == n_rows
    assert other.count() == 0  # the guard refused 127.0.0.2 before connecting

    # img2dataset layout plus manifests, and totals.
    names = {p.name for p in out.iterdir()}
    for s in range(n_shards):
        assert {f"{s:05d}.tar", f"{s:05d}.parquet", f"{s:05d}_stats.json", f"{s:05d}.manifest.json"} <= names
    totals = json.loads((out / "_stats.json").read_text())
    assert totals["count"] == n_rows and totals["successes"] == N_GOOD
    assert totals["status_dict"]["too_many_frames"] == 1
    assert totals["failed_to_resize"] == 4  # truncated, html, two bombs

    # Acceptance 4: tars load three ways, keys unique and safe, manifests match.
    keys_tarfile = []
    for s in range(n_shards):
        tar_path = out / f"{s:05d}.tar"
        manifest = json.loads((out / f"{s:05d}.manifest.json").read_text())
        for name, info in manifest["files"].items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
        with tarfile.open(tar_path) as tar:
            members = tar.getnames()
            stems = sorted({m.rsplit(".", 1)[0] for m in members})
            assert stems == manifest["keys"]
            for m in members:
                assert "/" not in m and ".." not in m
            for stem in stems:
                img = Image.open(io.BytesIO(tar.extractfile(f"{stem}.jpg").read()))
                assert img.size == (64, 64)
        keys_tarfile += stems
    assert len(keys_tarfile) == len(set(keys_tarfile)) == N_GOOD

    import webdataset as wds

    tars = [str(out / f"{s:05d}.tar") for s in range(n_shards)]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(keys_tarfile)
    meta = json.loads(samples[0]["json"])
    assert meta["status"] == "success" and meta["caption"] == samples[0]["txt"].decode()

    import ray

    ray_rows = ray.data.read_webdataset(tars).take_all()
    assert sorted(r["__key__"] for r in ray_rows) == sorted(keys_tarfile)

    # Resume: nothing left to do, no request sent.
    srv.reset_log()
    assert main(_args(url_list, str(out))) == 0
    assert srv.count() == 0
    assert f"{n_shards} planned, {n_shards} already done, 0 written" in capsys.readouterr().out

    # A shard without its manifest is redone, alone.
    (out / "00001.manifest.json").unlink()
    before = (out / "00000.tar").stat().st_mtime_ns
    assert main(_args(url_list, str(out))) == 0
    urls_shard1 = {u for u in table.filter(pa.compute.equal(table.column("shard"), "00001")).column("url").to_pylist()}
    requested = {r.target for r in srv.requests()}
    assert requested and all(any(u.endswith(t) for u in urls_shard1 if u) for t in requested)
    assert (out / "00000.tar").stat().st_mtime_ns == before
    assert (out / "00001.manifest.json").exists()
    assert sorted(_all_rows(out).column("row_id").to_pylist()) == list(range(n_rows))


def test_download_to_s3(ray_local: None, world: tuple, s3_bucket: str, s3_server) -> None:
    _, _, url_list, expected = world
    out = f"s3://{s3_bucket}/shards"
    assert main(_args(url_list, out, "--number_sample_per_shard", "100")) == 0
    client = s3_server.client()
    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="shards/")
    names = sorted(o["Key"].removeprefix("shards/") for o in listing["Contents"])
    assert names == ["00000.manifest.json", "00000.parquet", "00000.tar", "00000_stats.json", "_stats.json"]
    body = client.get_object(Bucket=s3_bucket, Key="shards/00000.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(body))
    assert table.num_rows == len(expected)
    assert table.column("status").to_pylist() == [expected[i] for i in table.column("row_id").to_pylist()]
    tar = tarfile.open(fileobj=io.BytesIO(client.get_object(Bucket=s3_bucket, Key="shards/00000.tar")["Body"].read()))
    assert len(tar.getnames()) == 3 * N_GOOD


def test_bad_config_exits_before_starting(tmp_path: Path, capsys) -> None:
    code = main(_args(tmp_path / "missing.parquet", str(tmp_path / "o"), "--resize_mode", "stretch"))
    assert code == 2
    assert "decode.resize_mode" in capsys.readouterr().err
    code = main(_args(tmp_path / "missing.parquet", str(tmp_path / "o")))
    assert code == 2
    assert "read.url_list: no input files" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_download_flags_config_file_and_set_share_the_jobs_loader(tmp_path) -> None:
    """clipcurate download reads img2dataset's flags, --config and --set with the job's loader:
    values typed by field, precedence defaults < file < flags < --set."""
    from pipeline.cli import build_parser, config_from_args

    (tmp_path / "c.yaml").write_text("decode: {image_size: 96, resize_mode: center_crop}\nexecution: {prefetch: 2}\n")
    args = build_parser().parse_args([
        "download", "--url_list", "in.parquet", "--output_folder", str(tmp_path / "o"),
        "--config", str(tmp_path / "c.yaml"), "--image_size", "64", "--resize_only_if_bigger",
        "--save_additional_columns", '["a","b"]', "--allowed_networks", "127.0.0.1/32",
        "--allowed_networks", "127.0.0.2/32", "--set", "download.retries=0",
    ])  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.decode.image_size == 64 and cfg.decode.resize_mode == "center_crop"  # flag over file
    assert cfg.decode.resize_only_if_bigger is True
    assert cfg.read.save_additional_columns == ("a", "b")
    assert cfg.download.allowed_networks == ("127.0.0.1/32", "127.0.0.2/32")
    assert cfg.download.retries == 0 and cfg.execution.prefetch == 2
    assert cfg.execution.scheduler == "local"  # img2dataset's default distributor: multiprocessing
    missing = build_parser().parse_args(["download", "--output_folder", "o"])
    with pytest.raises(ConfigError, match="read.url_list: is required"):
        config_from_args(missing)
