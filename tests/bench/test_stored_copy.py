"""bench/stored_copy.py runs img2dataset over photo-like JPEGs, decodes its stored copies both
ways, and appends exactly the table it prints."""

from __future__ import annotations

import numpy as np

from tests.bench.bench_module import load_bench


def test_stored_copies_are_kept_one_way_and_re_encoded_the_other(tmp_path, capsys) -> None:
    bench = load_bench("stored_copy")
    out = tmp_path / "results.md"
    results = bench.main(["--rows", "8", "--workdir", str(tmp_path / "work"), "--append", str(out)])
    again = next(v for k, v in results.items() if k.startswith("re-encoded"))
    kept = next(v for k, v in results.items() if k.startswith("kept"))
    assert again[1] == 0 and kept[1] == 8 and kept[2].size == 0
    # A second JPEG pass at the same size: close to the stored copy, not equal to it.
    assert again[2].size == 8 and 35 < np.median(again[2]) < 80
    assert again[0] > 0 and kept[0] > 0
    printed = capsys.readouterr().out
    assert "| kept where it is the job's copy |" in printed and "| 8 of 8 |" in printed
    assert printed.strip().splitlines()[-1] in out.read_text()
