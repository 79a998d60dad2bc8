"""Blocklists at LAION scale: memory and CPU per image of a 10M-entry exact list and a 1M-entry
PDQ list. The targets: the lists fit in a download or decode worker next to its other work,
and the checks add <= 1 ms of CPU per image, small beside downloading and decoding it.

Writes the lists as text files the way hash lists are distributed (one hex digest a line),
loads them with :func:`pipeline.blocklist.load` (the worker's path: parse, validate, index),
then times, per image, what a worker adds for it:

* ``check_url``: the URL and domain lookups before the request (10M-entry URL list);
* ``check_bytes``: the digests of the downloaded bytes for every ``--exact-kinds`` list, each
  looked up (sha256 is hashed for every row anyway, for ``source_sha256``);
* ``pdq_of``: the PDQ hash of the decoded picture (box filter to 64 x 64, then the hash in numpy);
* ``check_pdq``: the multi-index lookup at distance 31 in the 1M PDQ list (queries near and far).

Images: the decoded, resized pictures of real photos (``../shared/testdata``) and synthetic
scenes, at the job's default stored size (256 px) and the bytes of a ~100 KB JPEG. Memory is the
indexes' own bytes (``Blocklist.nbytes``) and the process's peak RSS over the load.

    .venv/bin/python bench/blocklist.py --exact 10000000 --pdq 1000000 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from PIL import Image

from pipeline.blocklist import load, pdq_of
from pipeline.config import BlocklistConfig, StorageConfig

MACHINE = "2-core CI box, CPU, shared with other work"
REPO = Path(__file__).resolve().parents[1]


def write_hex_list(path: Path, n: int, nbytes: int, seed: int, extra: list[bytes] = ()) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for start in range(0, n, 1_000_000):
            m = min(1_000_000, n - start)
            raw = rng.integers(0, 256, (m, nbytes), dtype=np.uint8)
            f.write("\n".join(bytes(row).hex() for row in raw))
            f.write("\n")
        for e in extra:
            f.write(e.hex() + "\n")


def write_url_list(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for start in range(0, n, 1_000_000):
            f.write("\n".join(f"https://img{i % 997}.example.com/a/{i}.jpg" for i in range(start, min(n, start + 1_000_000))))
            f.write("\n")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pictures() -> list[Image.Image]:
    from testkit import synthetic as syn
    from testkit.testdata import photos

    out = [Image.open(p).convert("RGB") for p in photos()]
    out += [syn.render(s, (900, 700)) for s in syn.sample_scenes(8, 3)]
    resized = []
    for im in out:
        s = 256 / max(im.size)
        resized.append(im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.HAMMING))
    return resized


def cpu_per_call(fn, items, repeat: int) -> float:
    t0 = time.process_time()
    for _ in range(repeat):
        for x in items:
            fn(x)
    return (time.process_time() - t0) / (repeat * len(items))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exact", type=int, default=10_000_000, help="entries of each exact list")
    p.add_argument("--exact-kinds", nargs="+", default=["sha256"], help="md5 sha1 sha256")
    p.add_argument("--urls", type=int, default=10_000_000)
    p.add_argument("--pdq", type=int, default=1_000_000)
    p.add_argument("--append")
    a = p.parse_args(argv)
    pics = pictures()
    pic_hashes = [pdq_of(im) for im in pics]
    buf = io.BytesIO()
    Image.open(sorted(__import__("testkit.testdata", fromlist=["photos"]).photos())[0]).convert("RGB").resize(
        (1024, 768)).save(buf, "JPEG", quality=92)
    jpeg = buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        t0 = time.perf_counter()
        widths = {"md5": 16, "sha1": 20, "sha256": 32}
        for i, kind in enumerate(a.exact_kinds):
            write_hex_list(t / f"{kind}.txt", a.exact, widths[kind], i)
        write_url_list(t / "urls.txt", a.urls)
        # Half the pictures are listed (their own hash): lookups that hit and that miss.
        write_hex_list(t / "pdq.txt", a.pdq, 32, 99, extra=pic_hashes[::2])
        sizes = {f.name: f.stat().st_size for f in t.iterdir()}
        write_s = time.perf_counter() - t0
        cfg = BlocklistConfig(urls=(str(t / "urls.txt"),), pdq=(str(t / "pdq.txt"),),
                              **{k: (str(t / f"{k}.txt"),) for k in a.exact_kinds})
        rss0 = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        bl = load(cfg, StorageConfig())
        load_s, load_cpu = time.perf_counter() - t0, time.process_time() - c0
        rss1 = rss_mb()
    per_kind = {k: s.nbytes for k, s in bl.sets.items()}
    per_kind["pdq"] = bl.pdq.nbytes if bl.pdq is not None else 0
    urls = [f"https://img{i % 997}.example.org/b/{i}.jpg" for i in range(200)] + [
        f"https://img{i % 997}.example.com/a/{i}.jpg" for i in range(0, a.urls, max(1, a.urls // 200))]
    assert all(bl.check_url(u) is not None for u in urls[200:])
    assert bl.check_pdq(pic_hashes[0]) is not None and bl.check_pdq(pic_hashes[1]) is None
    t_url = cpu_per_call(bl.check_url, urls, 5)
    t_bytes = cpu_per_call(bl.check_bytes, [jpeg], 200)
    import hashlib

    t_sha = cpu_per_call(lambda d: hashlib.sha256(d).digest(), [jpeg], 200)
    t_pdq_hash = cpu_per_call(pdq_of, pics, 20)
    t_pdq = cpu_per_call(bl.check_pdq, pic_hashes, 50)
    total = t_url + t_bytes + t_pdq_hash + t_pdq
    lines = [
        f"### Blocklists: {a.exact:,}-entry exact list(s) ({', '.join(a.exact_kinds)}), {a.urls:,} URLs, "
        f"{a.pdq:,} PDQ hashes ({dt.date.today()}, {MACHINE})",
        "",
        f"`{' '.join(shlex.quote(s) for s in ['.venv/bin/python', 'bench/blocklist.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"Text files {', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in sorted(sizes.items()))} (written in {write_s:.0f} s). "
        f"Loading (parse, validate, sort, index) took {load_s:.1f} s wall, {load_cpu:.1f} s CPU; peak RSS "
        f"{rss0:,.0f} MB before, {rss1:,.0f} MB after (parsing holds one 8 MB block and the growing arrays).",
        "",
        "| structure | entries | bytes held | bytes / entry |",
        "|---|---:|---:|---:|",
    ]
    counts = {"url": a.urls, "pdq": a.pdq, **{k: a.exact for k in a.exact_kinds}}
    for kind, nbytes in per_kind.items():
        lines.append(f"| {kind} | {counts[kind]:,} | {nbytes / 1e6:,.1f} MB | {nbytes / max(1, counts[kind]):.1f} |")
    lines += [
        "",
        "| per image (CPU, one thread) | ms |",
        "|---|---:|",
        f"| check_url (URL + domain lookups, {a.urls:,} URLs) | {t_url * 1e3:.3f} |",
        f"| check_bytes ({' + '.join(a.exact_kinds)} of a {len(jpeg) / 1e3:.0f} KB JPEG + lookups) | {t_bytes * 1e3:.3f} |",
        f"| of which sha256 alone (the job hashes every download anyway) | {t_sha * 1e3:.3f} |",
        f"| pdq_of (256 px picture: box to 64 x 64, hash) | {t_pdq_hash * 1e3:.3f} |",
        f"| check_pdq ({a.pdq:,} entries, distance <= 31) | {t_pdq * 1e3:.3f} |",
        f"| **total** | **{total * 1e3:.3f}** |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    raise SystemExit(main())
