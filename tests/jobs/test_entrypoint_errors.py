"""jobs/embed_laion.py's last words when a run fails: one line naming the root cause."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.errors import root_cause
from pipeline.storage import StorageError

REPO = Path(__file__).resolve().parents[2]


def _entrypoint():
    spec = importlib.util.spec_from_file_location("embed_laion_entry", REPO / "jobs" / "embed_laion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeRayTaskError(Exception):
    """Shaped like Ray's task errors: the worker's exception travels as ``.cause``."""

    def __init__(self, msg: str, cause: BaseException) -> None:
        super().__init__(msg)
        self.cause = cause


def test_root_cause_prefers_the_storage_error_anywhere_in_the_chain() -> None:
    store = StorageError("S3 PUT s3://b/run/shards/00000.tar failed after 1 attempt(s) (storage.s3_retries=0)")
    try:
        try:
            raise store
        except StorageError as inner:
            raise RuntimeError("UDF failed to process a batch") from inner
    except RuntimeError as outer:
        wrapped = FakeRayTaskError("ray::MapWorker failed", outer)
    assert root_cause(wrapped) is store
    plain = ValueError("bad bytes")
    assert root_cause(FakeRayTaskError("x", RuntimeError("y"))).args == ("y",)
    assert root_cause(plain) is plain


def test_a_failed_run_exits_1_with_one_line_naming_the_object(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    m = _entrypoint()
    import pipeline.job

    def fail(cfg, emit=None):
        raise FakeRayTaskError(
            "ray::MapWorker(MapBatches(_StageActor)) failed\nUDF failed",
            StorageError("S3 PUT s3://demo/run/shards/00001.tar failed after 1 attempt(s) (storage.s3_retries=0)"),
        )

    monkeypatch.setattr(pipeline.job, "run", fail)
    urls = tmp_path / "urls.parquet"
    urls.write_bytes(b"")
    rc = m.main(["--input", str(urls), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert err[-2] == ("embed_laion.py: error: StorageError: S3 PUT s3://demo/run/shards/00001.tar failed "
                       "after 1 attempt(s) (storage.s3_retries=0)")
    assert "re-run the same command to resume" in err[-1]
