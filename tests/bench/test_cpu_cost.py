"""bench/cpu_cost.py runs on a few images, prints both rows and appends exactly what it prints."""

from __future__ import annotations

import math

from tests.bench.bench_module import load_bench


def test_cpu_cost_measures_decode_and_preprocess_and_appends_its_table(tmp_path, capsys) -> None:
    out = tmp_path / "results.md"
    res = load_bench("cpu_cost").main(["--rows", "6", "--repeats", "2", "--min-side", "64", "--max-side", "128",
                                      "--append", str(out)])
    for name in ("decode", "preprocess"):
        assert len(res[name]) == 2
        assert all(math.isfinite(v) and v > 0 for v in res[name])
    printed = capsys.readouterr().out
    assert "| decode: JPEG 64-128 px -> 256 px border (decode_image) |" in printed
    assert "| preprocess: stored 256 px -> 224 px uint8 (resize_crop_uint8) |" in printed
    assert out.read_text() in printed
