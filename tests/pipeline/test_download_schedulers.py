"""The download half (pipeline/download_job.py) on local worker processes (the default,
``--distributor multiprocessing``) against the loopback fault server: the rows, statuses,
stored images and manifests the Ray Data scheduler writes; resume without requests; worker
loss retried a bounded number of times or failing with the shard's name; decoder crashes
quarantined; the CLI flags. Faults are injected into the graph (testkit/faults.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.cli import main
from pipeline.config import (
    DecodeConfig,
    DownloadConfig,
    DownloadJobConfig,
    ExecutionConfig,
    ReadConfig,
    ShardConfig,
)
from pipeline.download_job import run_download
from pipeline.stages.decode import DecodeStage
from testkit.faults import CRASH_MARKER, CRASHING_DECODER, inject, kill_after
from testkit.http_server import FaultServer
from tests.ray_data_warnings import IGNORE_LEGACY_FIELDS

N_GOOD = 30
PER_SHARD = 8
DECODE = DecodeConfig(image_size=64, resize_mode="border")


def run_download_local(cfg: DownloadJobConfig, processes: int = 2, prefetch: int = 1, attempts: int = 3,
                       wrap_graph=None):  # noqa: ANN001, ANN201
    ex = ExecutionConfig(scheduler="local", processes=processes, prefetch=prefetch, attempts=attempts)
    return run_download(cfg, ex, wrap_graph)

pytestmark = [
    pytest.mark.shared_ray,
    IGNORE_LEGACY_FIELDS,
]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A run that hangs (a lost worker nobody notices) fails the test instead of the suite."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the download run did not finish within 120 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _images() -> dict[str, bytes]:
    files = {}
    for i in range(N_GOOD):
        im = Image.new("RGB", (100 + 9 * i, 80 + 4 * i), (7 * i % 256, 100, 255 - 5 * i % 256))
        buf = io.BytesIO()
        png = i % 6 == 0
        im.save(buf, "PNG" if png else "JPEG", quality=90)
        files[f"/img/{i}.{'png' if png else 'jpg'}"] = buf.getvalue()
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultServer, Path, dict[int, str], dict]]:
    """(server, URL list, expected status per row_id, sha256 of the stored image per row_id).

    The expected hashes come from decoding the served files in this process, without HTTP,
    worker processes or the crash guard."""
    files = _images()
    root = tmp_path_factory.mktemp("local-runner")
    with FaultServer(files=files) as srv:
        rows: list[tuple[str | None, str]] = [(srv.url(p), "ok") for p in files]
        good = next(iter(files))
        rows += [
            (srv.url("/nothing.jpg"), "http_404"),
            (srv.url(good, fault="truncate", frac="0.5"), "truncated"),
            (srv.url(good, fault="lie_type", body="html"), "unsupported_format"),
            (srv.url("/bomb.png", fault="bomb_png"), "too_many_pixels"),
            (None, "missing_url"),
            ("ftp://127.0.0.1/x.jpg", "bad_scheme"),
        ]
        pq.write_table(
            pa.table(
                {
                    "url": [r[0] for r in rows],
                    "caption": [f"caption {i}" for i in range(len(rows))],
                    "row_id": list(range(len(rows))),
                }
            ),
            root / "urls.parquet",
        )
        blobs = list(files.values())
        n = len(blobs)
        decoded = DecodeStage(cfg=DECODE, isolate=False).process_batch(
            pa.table({
                S.STATUS: [S.OK] * n, S.ERROR: pa.nulls(n, pa.string()),
                S.IMAGE_BYTES: pa.array(blobs, pa.binary()),
            })
        )  # fmt: skip
        sha = dict(enumerate(decoded.column(S.SHA256).to_pylist()))
        yield srv, root / "urls.parquet", {i: r[1] for i, r in enumerate(rows)}, sha


def _cfg(url_list: Path | str, out: Path) -> DownloadJobConfig:
    return DownloadJobConfig(
        read=ReadConfig(url_list=str(url_list), save_additional_columns=("row_id",)),
        download=DownloadConfig(timeout=10, retries=0, allowed_networks=("127.0.0.1/32",)),
        decode=DECODE,
        shard=ShardConfig(output_folder=str(out), number_sample_per_shard=PER_SHARD),
    )


def _rows(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("[0-9]*.parquet")))


def _members(out: Path) -> dict[str, bytes]:
    """member name -> content, over every tar of ``out``."""
    found: dict[str, bytes] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                found[m.name] = tar.extractfile(m).read()
    return found


def _stored(out: Path) -> dict[str, bytes]:
    """key -> stored image bytes, over every tar of ``out``."""
    return {k.removesuffix(".jpg"): v for k, v in _members(out).items() if k.endswith(".jpg")}


def _check_output(out: Path, expected: dict[int, str], sha: dict[int, str]) -> pa.Table:
    """Every row once with its status; stored images byte-identical to an in-process decode;
    manifests match the files; totals over all shards."""
    table = _rows(out)
    ids = table.column("row_id").to_pylist()
    assert sorted(ids) == list(range(len(expected)))
    assert dict(zip(ids, table.column("status").to_pylist(), strict=True)) == expected
    assert len(set(table.column("key").to_pylist())) == len(expected)
    stored = _stored(out)
    key_of = dict(zip(ids, table.column("key").to_pylist(), strict=True))
    assert set(stored) == {key_of[i] for i in sha}
    for i, digest in sha.items():
        assert hashlib.sha256(stored[key_of[i]]).hexdigest() == digest
    n_shards = -(-len(expected) // PER_SHARD)
    for s in range(n_shards):
        manifest = json.loads((out / f"{s:05d}.manifest.json").read_text())
        for name, info in manifest["files"].items():
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
    totals = json.loads((out / "_stats.json").read_text())
    assert totals["count"] == len(expected) and totals["successes"] == len(sha)
    assert totals["shards"] == n_shards
    return table


def test_same_output_as_the_ray_data_scheduler(world: tuple, tmp_path: Path, shared_ray: None) -> None:
    srv, url_list, expected, sha = world
    summary = run_download_local(_cfg(url_list, tmp_path / "mp"), processes=2)
    assert summary.scheduler == "local"
    assert summary.rows_this_run == len(expected) and summary.successes_this_run == N_GOOD
    assert summary.shards_written == summary.shards_planned and summary.shards_skipped == 0
    mp_rows = _check_output(tmp_path / "mp", expected, sha)

    summary = run_download(_cfg(url_list, tmp_path / "ray"), ExecutionConfig(scheduler="ray"))
    assert summary.scheduler == "ray"
    ray_rows = _rows(tmp_path / "ray")
    # Same shard tables (minus timings), same tars, same manifests' keys and file digests.
    volatile = {"download_s"}
    cols = [c for c in ray_rows.column_names if c not in volatile]
    assert mp_rows.select(cols).to_pylist() == ray_rows.select(cols).to_pylist()
    # (The tars' bytes differ only in member mtimes, which record when each run read the shard.)
    ray_manifests = sorted(p.name for p in (tmp_path / "ray").glob("*.manifest.json"))
    assert sorted(p.name for p in (tmp_path / "mp").glob("*.manifest.json")) == ray_manifests
    for name in ray_manifests:
        ray_manifest = json.loads((tmp_path / "ray" / name).read_text())
        mp_manifest = json.loads((tmp_path / "mp" / name).read_text())
        assert mp_manifest["keys"] == ray_manifest["keys"]
        assert (mp_manifest["count"], mp_manifest["samples"]) == (ray_manifest["count"], ray_manifest["samples"])
    assert _members(tmp_path / "mp") == _members(tmp_path / "ray")
    mp_totals = json.loads((tmp_path / "mp" / "_stats.json").read_text())
    ray_totals = json.loads((tmp_path / "ray" / "_stats.json").read_text())
    for k in ("count", "successes", "failed_to_download", "failed_to_resize", "status_dict", "shards"):
        assert mp_totals[k] == ray_totals[k]


def test_resume_requests_only_the_uncommitted_shard(world: tuple, tmp_path: Path) -> None:
    srv, url_list, expected, sha = world
    out = tmp_path / "out"
    run_download_local(_cfg(url_list, out), processes=2)
    n_shards = -(-len(expected) // PER_SHARD)

    srv.reset_log()
    again = run_download_local(_cfg(url_list, out), processes=2)
    assert srv.count() == 0
    assert (again.shards_skipped, again.shards_written, again.rows_this_run) == (n_shards, 0, 0)
    assert again.count == len(expected) and again.successes == N_GOOD  # totals over all shards

    (out / "00001.manifest.json").unlink()
    before = {s: (out / f"{s:05d}.tar").stat().st_mtime_ns for s in range(n_shards) if s != 1}
    srv.reset_log()
    third = run_download_local(_cfg(url_list, out), processes=2)
    assert (third.shards_skipped, third.shards_written, third.rows_this_run) == (n_shards - 1, 1, PER_SHARD)
    table = _rows(out)
    shard1 = table.filter(pa.compute.equal(table.column("shard"), "00001"))
    urls_shard1 = [u for u in shard1.column("url").to_pylist() if u]
    requested = [r.target for r in srv.requests()]
    assert len(requested) == len(urls_shard1)
    assert all(any(u.endswith(t) for u in urls_shard1) for t in requested)
    assert {s: (out / f"{s:05d}.tar").stat().st_mtime_ns for s in before} == before
    _check_output(out, expected, sha)


@pytest.mark.parametrize("stage", ["DecodeStage", "DownloadStage", "ShardStage"])
def test_a_killed_worker_is_replaced_and_its_shard_retried(world: tuple, tmp_path: Path, stage: str) -> None:
    srv, url_list, expected, sha = world
    # The worker that finishes its 2nd call of the stage dies.
    wrap = lambda g: inject(g, kill_after({stage: 2}, str(tmp_path)))  # noqa: E731
    summary = run_download_local(_cfg(url_list, tmp_path / "out"), processes=2, wrap_graph=wrap)
    killed = int((tmp_path / f"{stage}.killed").read_text())
    assert killed not in (os.getpid(), 0)
    assert summary.shards_written == summary.shards_planned
    _check_output(tmp_path / "out", expected, sha)


def test_a_shard_that_keeps_killing_its_worker_fails_the_run_by_name(world: tuple, tmp_path: Path) -> None:
    srv, url_list, expected, sha = world
    out = tmp_path / "out"
    wrap = lambda g: inject(g, kill_after({"DecodeStage": 1}, str(tmp_path)))  # noqa: E731
    with pytest.raises(RuntimeError, match=r"shard 0000\d: its cpu worker process was killed by SIGKILL"):
        run_download_local(_cfg(url_list, out), processes=1, prefetch=0, attempts=1, wrap_graph=wrap)
    assert not (out / "_stats.json").exists()
    # The rerun resumes: the killed shard is redone, and every row ends up once.
    summary = run_download_local(_cfg(url_list, out), processes=2)
    assert summary.shards_written >= 1
    _check_output(out, expected, sha)


def test_an_exception_in_a_stage_fails_the_run_naming_the_shard(world: tuple, tmp_path: Path) -> None:
    srv, url_list, expected, sha = world
    out = tmp_path / "out"
    (out / "00002.tar").mkdir(parents=True)  # the shard stage cannot put its tar there
    with pytest.raises(RuntimeError, match=r"(?s)shard 00002 failed in ReadStage\+.*ShardStage \(worker pid \d+\).*IsADirectoryError"):
        run_download_local(_cfg(url_list, out), processes=2)
    assert not (out / "00002.manifest.json").exists() and not (out / "_stats.json").exists()
    (out / "00002.tar").rmdir()
    summary = run_download_local(_cfg(url_list, out), processes=2)
    assert summary.shards_written >= 1 and summary.shards_written + summary.shards_skipped == summary.shards_planned
    _check_output(out, expected, sha)


def test_cli_reports_a_failed_run_in_one_line_and_exits_1(
    world: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url_list, _, _ = world
    out = tmp_path / "out"
    (out / "00001.tar").mkdir(parents=True)  # the shard stage cannot put its tar there
    args = _cli_args(url_list, out, "--distributor", "multiprocessing", "--processes_count", "2")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(
        r"clipcurate: error: RuntimeError: shard 00001 failed in ReadStage\+DownloadStage\+DecodeStage\+ShardStage "
        r"\(worker pid \d+\): IsADirectoryError: \[Errno 21\] Is a directory: .*00001\.tar.*",
        err[-2],
    ), err[-2:]
    assert err[-1] == "clipcurate: committed shards are kept; fix the cause and re-run the same command to resume"
    assert not (out / "_stats.json").exists()


def test_a_decoder_crash_is_quarantined(world: tuple, tmp_path: Path) -> None:
    from dataclasses import replace

    srv, url_list, expected, sha = world
    table = pq.read_table(url_list)
    urls = table.column("url").to_pylist()
    urls[3] = urls[3] + f"?tag={CRASH_MARKER}"
    marked = tmp_path / "urls.parquet"
    pq.write_table(table.set_column(0, "url", pa.array(urls)), marked)
    wrap = lambda g: inject(g, {"DecodeStage": lambda s: replace(s, decoder=CRASHING_DECODER)})  # noqa: E731
    summary = run_download_local(_cfg(marked, tmp_path / "out"), processes=2, wrap_graph=wrap)
    assert summary.status_dict[S.WORKER_CRASH] == 1
    rows = _rows(tmp_path / "out")
    got = dict(zip(rows.column("row_id").to_pylist(), rows.column("status").to_pylist(), strict=True))
    assert got == {**expected, 3: S.WORKER_CRASH}


def _cli_args(url_list: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "download", "--url_list", str(url_list), "--output_folder", str(out),
        "--save_additional_columns", "row_id", "--image_size", "64", "--resize_mode", "border",
        "--number_sample_per_shard", str(PER_SHARD), "--timeout", "10", "--retries", "0",
        "--allowed_networks", "127.0.0.1/32", *extra,
    ]  # fmt: skip


def test_cli_default_runs_without_ray_or_torch(world: tuple, tmp_path: Path) -> None:
    srv, url_list, expected, sha = world
    out = tmp_path / "out"
    args = _cli_args(url_list, out, "--processes_count", "2")  # multiprocessing is the default
    script = (
        "import sys; from pipeline.cli import main; code = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'imported ray or torch'; "
        "sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"rows: {len(expected)}  successes: {N_GOOD}" in done.stdout
    _check_output(out, expected, sha)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (("--distributor", "spark"), "execution.scheduler (--distributor)"),
        (("--distributor", "multiprocessing", "--processes_count", "0"), "execution.processes"),
        (("--distributor", "multiprocessing", "--ray_address", "auto"), "execution.ray_address"),
        (("--processes_count", "two"), "execution.processes"),
        (("--image_size", "0"), "decode.image_size"),
    ],
)
def test_cli_rejects_bad_distributor_settings(
    world: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], field: str
) -> None:
    _, url_list, _, _ = world
    assert main(_cli_args(url_list, tmp_path / "o", *extra)) == 2
    assert f"clipcurate: error: {field}:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_arguments_are_config_errors(world: tuple, tmp_path: Path) -> None:
    from pipeline.config import ConfigError

    _, url_list, _, _ = world
    with pytest.raises(ConfigError, match="execution.processes"):
        run_download_local(_cfg(url_list, tmp_path / "o"), processes=0)
    with pytest.raises(ConfigError, match="execution.attempts"):
        run_download_local(_cfg(url_list, tmp_path / "o"), attempts=0)
