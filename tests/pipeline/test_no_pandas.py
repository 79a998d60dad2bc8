"""The local CPU workers and the decode children never load pandas (pyarrow would, for its
type checks: ~0.3 s of CPU and ~50 MiB each); a model worker and the driver still may."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pyarrow as pa

from pipeline.crashguard import Sandbox
from pipeline.graph import Graph
from pipeline.schedulers.local import LocalScheduler
from testkit.toy_stages import MakeRows, ModelPandasProbe, PandasProbe


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_refused_pandas_leaves_pyarrow_working_and_names_itself() -> None:
    out = _python(
        "import sys, pyarrow as pa\n"
        "from pipeline.no_pandas import refuse_pandas\n"
        "from testkit.toy_stages import pandas_state\n"
        "assert refuse_pandas()\n"
        "t = pa.Table.from_pylist([{'a': 1.5}, {'a': None}])\n"
        "assert t.column('a').to_pylist() == [1.5, None]\n"
        "assert list(pa.array([1, 2]).to_numpy(zero_copy_only=False)) == [1, 2]\n"
        "print(pandas_state())\n"
        "try:\n"
        "    import pandas\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    state, message = out.splitlines()
    assert state == "refused"
    assert "pipeline.no_pandas" in message


def test_refusing_after_pandas_is_loaded_changes_nothing() -> None:
    out = _python(
        "import pandas\n"
        "from pipeline.no_pandas import refuse_pandas\n"
        "print(refuse_pandas(), pandas.DataFrame({'a': [1]}).shape)\n"
    )
    assert out == "False (1, 1)"


def test_local_cpu_workers_never_load_pandas_model_workers_may() -> None:
    graph = Graph({"src": [MakeRows(batch_size=1), PandasProbe()]}, [ModelPandasProbe()])
    got: list[pa.Table] = []
    LocalScheduler(processes=2).run(graph, {"src": [{"shard_id": i, "length": 3} for i in range(4)]}, got.append)
    rows: list[dict[str, Any]] = pa.concat_tables(got).to_pylist()
    assert len(rows) == 12
    assert {r["pandas"] for r in rows} == {"refused"}
    assert {r["model_pandas"] for r in rows} == {"loaded"}


def test_a_decode_child_never_loads_pandas() -> None:
    box = Sandbox("testkit.toy_stages:pandas_state_item", timeout_s=60)
    try:
        assert box.map([None, None]) == ["refused", "refused"]
    finally:
        box.close()
