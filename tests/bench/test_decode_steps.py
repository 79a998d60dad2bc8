"""bench/decode_steps.py times each step of the decode on real photos, one process and two at
once, and appends exactly the table it prints."""

from __future__ import annotations

import math

from testkit.testdata import PHOTOS_DIR
from tests.bench.bench_module import load_bench


def test_decode_steps_times_every_step_alone_and_two_at_once_and_appends_its_table(tmp_path, capsys) -> None:
    bench = load_bench("decode_steps")
    photos = sorted(str(p) for p in PHOTOS_DIR.glob("*.jpg"))
    assert len(photos) >= 5
    out = tmp_path / "results.md"
    runs = bench.main(["--paths", *photos * 2, "--copies", "1", "2", "--append", str(out)])
    assert sorted(runs) == [1, 2] and [len(r) for r in runs.values()] == [1, 2]
    steps = [s[0] for s in bench.STEPS]
    for result in (r for rs in runs.values() for r in rs):
        assert all(math.isfinite(result[k]) for k in [*steps, "rest", "total"])
        # Every step runs on these photos (they are larger than the 64 px model input and are
        # shrunk to 256 px), and the steps and the rest add up to the total.
        assert all(result[k] > 0 for k in steps if k != "pad"), result
        assert math.isclose(sum(result[k] for k in [*steps, "rest"]), result["total"], rel_tol=1e-6)
    printed = capsys.readouterr().out
    assert "| jpeg decode |" in printed and "| **total** |" in printed
    assert printed.strip().splitlines()[-1] in out.read_text()
