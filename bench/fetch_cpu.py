"""Download client CPU per image: the download stage against img2dataset's downloader.

One loopback server serves the photo-like world of ``bench/job_cpu.py``. Each client runs in
its own process and fetches the first ``--small`` and then the first ``--rows`` URLs of the
list (fresh process per size), with its own default concurrency:

- ``stage``: ``pipeline.stages.download.DownloadStage`` with default settings (address guard,
  deadline watchdog, byte cap, opt-out check, sha256 of each body; keep-alive connections),
  one ``process_batch`` call per 250 rows, as the job hands it shards;
- ``img2dataset``: img2dataset's ``download_image_with_retry`` (urllib, a new connection per
  image) on a thread pool of its default 256 threads;
- ``http.client``: a bare keep-alive GET per image on 8 threads, no checks at all: the floor.

The figure is the client process's own CPU (user + system, ``getrusage``) and the whole
machine's busy time (``/proc/stat``: the server's share included) per image, marginal between
the two sizes so that start-up cancels.

    python bench/fetch_cpu.py --rows 3000 --small 500 --rounds 3 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import job_cpu as J  # noqa: E402
from results_md import append  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLIENTS = ("stage", "img2dataset", "http.client")


def _client(name: str, urls: list[str]) -> int:
    """Fetch ``urls`` the way ``name`` does; the number fetched whole."""
    if name == "stage":
        import pyarrow as pa

        from pipeline.config import DownloadConfig
        from pipeline.stages.download import DownloadStage

        stage = DownloadStage(config=DownloadConfig(allowed_networks=("127.0.0.1/32",)))
        stage.setup()
        ok = 0
        try:
            for s in range(0, len(urls), 250):
                out = stage.process_batch(pa.table({"url": urls[s : s + 250]}))
                ok += out.column("status").to_pylist().count("ok")
        finally:
            stage.close()
        return ok
    if name == "img2dataset":
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from multiprocessing.pool import ThreadPool

        from img2dataset.downloader import download_image_with_retry

        def one(item: tuple[int, str]) -> bool:
            _, stream, _ = download_image_with_retry(item, 10, 0, "img2dataset", ["noai", "noimageai"])
            return stream is not None

        with ThreadPool(256) as pool:
            return sum(pool.imap_unordered(one, enumerate(urls)))
    import http.client
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlsplit

    local = threading.local()

    def get(url: str) -> bool:
        u = urlsplit(url)
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
        resp = conn.getresponse()
        return resp.status == 200 and bool(resp.read())

    with ThreadPoolExecutor(8) as ex:
        return sum(ex.map(get, urls))


def run_client(name: str, list_file: Path, rows: int) -> dict:
    """Run one client in a fresh process; its CPU seconds, the machine's, wall, rows fetched."""
    cmd = [sys.executable, __file__, "--_client", name, "--_list", str(list_file), "--_rows", str(rows)]
    m0, t0 = J.machine_busy_s(), time.monotonic()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    m1, t1 = J.machine_busy_s(), time.monotonic()
    res = json.loads(out.strip().splitlines()[-1])
    res.update(machine_s=m1 - m0, wall_s=t1 - t0)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    J.list_arguments(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    p.add_argument("--append", default=None)
    p.add_argument("--_client", help=argparse.SUPPRESS)
    p.add_argument("--_list", help=argparse.SUPPRESS)
    p.add_argument("--_rows", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._client:  # the child: fetch, then print its own CPU
        import pyarrow.parquet as pq

        urls = pq.read_table(a._list, columns=["url"]).column("url").to_pylist()[: a._rows]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        ok = _client(a._client, urls)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print(json.dumps({"ok": ok, "client_s": cpu}))
        return
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    work, world, servers, bases = J.serve_list(p, a)
    try:
        J.wait_http(bases[0] + "/")
        list_file = J.url_list(world, bases, a.rows, work / f"fetch-urls-{a.rows}.parquet")
        runs: dict[str, list[tuple[float, float, float]]] = {c: [] for c in a.clients}
        lines = ["| round | client | ok (small / big) | client CPU ms / image | machine ms / image | "
                 "wall rows/s (marginal) |", "|---:|---|---:|---:|---:|---:|"]
        for rnd in range(1, a.rounds + 1):
            for c in a.clients:
                small = run_client(c, list_file, a.small)
                big = run_client(c, list_file, a.rows)
                n = a.rows - a.small
                fig = (1000 * (big["client_s"] - small["client_s"]) / n,
                       1000 * (big["machine_s"] - small["machine_s"]) / n,
                       n / max(big["wall_s"] - small["wall_s"], 1e-9))
                runs[c].append(fig)
                lines.append(f"| {rnd} | {c} | {small['ok']} / {big['ok']} | {fig[0]:.3f} | {fig[1]:.3f} | "
                             f"{fig[2]:.0f} |")
                print(lines[-1], flush=True)
    finally:
        for s in servers:
            s.kill()
    ref = "img2dataset" if "img2dataset" in runs else None
    lines += ["", f"Median over {a.rounds} rounds:", "",
              "| client | client CPU ms / image | machine ms / image | client CPU vs img2dataset |",
              "|---|---:|---:|---:|"]
    for c, figs in runs.items():
        cl = statistics.median(f[0] for f in figs)
        ma = statistics.median(f[1] for f in figs)
        vs = "-"
        if ref:
            vs = f"{statistics.median(f[0] / r[0] for f, r in zip(figs, runs[ref], strict=True)):.2f}x"
        lines.append(f"| {c} | {cl:.3f} | {ma:.3f} | {vs} |")
    text = "\n".join(lines)
    print(text)
    if a.append:
        append(a.append, "Download client CPU per image: the download stage vs img2dataset's downloader",
               f"Photo-like JPEGs (300-1200 px, testkit/photo_like.py) from one loopback server; each client "
               f"in its own process, marginal between {a.small} and {a.rows} rows.", text, argv)

if __name__ == "__main__":
    main()
