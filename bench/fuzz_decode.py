"""Fuzz the decode stage for a fixed time and print counts per status, rows/s and peak RSS.

    python bench/fuzz_decode.py --seconds 180 --crash-dir /tmp/fuzz-crashes

Cases come from testkit.hostile_images (the generator tests/pipeline/test_decode_fuzz.py
uses), in batches of --batch rows with one DecodeConfig drawn per batch, and every output is
checked with the test's invariants. Batch ``i`` is generated from ``random.Random(seed + i)``, so
any batch replays from its number. A batch that raises or breaks an invariant is saved to
--crash-dir (the input bytes, ``batch.json`` with the seed, config and traceback); each batch's
inputs are written there before it runs and removed after, so a hard crash (a segfault in a
decoder) leaves them behind as ``inflight``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema as S  # noqa: E402
from pipeline.stages.decode import DecodeStage  # noqa: E402
from testkit.hostile_images import check_decoded, fuzz_batch, fuzz_config, hostile_case  # noqa: E402


def _save_batch(folder: Path, seed: int, kinds: list[str], cases: list[bytes], extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for j, data in enumerate(cases):
        (folder / f"{j:02d}.bin").write_bytes(data)
    (folder / "batch.json").write_text(json.dumps({"seed": seed, "kinds": kinds, **extra}, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="how long to run (wall clock)")
    ap.add_argument("--batch", type=int, default=8, help="rows per process_batch call")
    ap.add_argument("--seed", type=int, default=0, help="batch i uses random.Random(seed + i)")
    ap.add_argument("--crash-dir", default="/tmp/fuzz_decode_crashes", help="where failing batches go")
    args = ap.parse_args(argv)

    crash_dir = Path(args.crash_dir)
    inflight = crash_dir / "inflight"
    statuses: Counter[str] = Counter()
    mutations: Counter[str] = Counter()
    slowest = (0.0, -1)
    rows = batches = crashes = 0
    decode_s = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        seed = args.seed + batches
        rng = random.Random(seed)
        drawn = [hostile_case(rng) for _ in range(args.batch)]
        kinds = [k for k, _ in drawn]
        cases = [d for _, d in drawn]
        cfg = fuzz_config(rng)
        _save_batch(inflight, seed, kinds, cases, {"config": asdict(cfg)})
        batch = fuzz_batch(cases)
        t0 = time.perf_counter()
        try:
            # In-process, not in the crash guard: a decoder crash must stop this run (and leave
            # the in-flight batch on disk), not become a quarantined worker_crash row.
            out = DecodeStage(cfg=cfg, isolate=False).process_batch(batch)
            took = time.perf_counter() - t0
            check_decoded(batch, out)
        except Exception:
            took = time.perf_counter() - t0
            crashes += 1
            _save_batch(crash_dir / f"batch-{seed}", seed, kinds, cases, {"config": asdict(cfg), "traceback": traceback.format_exc()})
            print(f"batch {seed}: {traceback.format_exc().splitlines()[-1]}", file=sys.stderr)
        else:
            statuses.update(out.column(S.STATUS).to_pylist()[:-1])  # the last row is the http_404 control
        decode_s += took
        slowest = max(slowest, (took, seed))
        mutations.update(k.split("+", 1)[1].split("+")[0] for k in kinds)
        rows += args.batch
        batches += 1
    wall = time.perf_counter() - start
    shutil.rmtree(inflight, ignore_errors=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    print("| status | rows | share |\n|---|---:|---:|")
    for status, count in statuses.most_common():
        print(f"| {status} | {count} | {100 * count / max(1, rows):.1f} % |")
    print()
    print("| mutation | rows |\n|---|---:|")
    for m, count in sorted(mutations.items()):
        print(f"| {m} | {count} |")
    print()
    print(
        f"rows: {rows} in {batches} batches of {args.batch}; wall {wall:.1f} s (decode {decode_s:.1f} s, "
        f"the rest generating cases and checking outputs); {rows / wall:.1f} rows/s overall, "
        f"{rows / max(decode_s, 1e-9):.1f} rows/s in process_batch; slowest batch {slowest[0] * 1000:.0f} ms "
        f"(seed {slowest[1]}); peak RSS {peak_mib:.0f} MiB; crashes or broken invariants: {crashes}"
        + (f" (saved under {crash_dir})" if crashes else "")
    )
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
