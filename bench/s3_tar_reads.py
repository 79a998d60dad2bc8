"""One streamed pass over a WebDataset tar on S3: requests and seconds, with and without the
read-ahead of ``pipeline.storage.open_sequential``.

The job streams tars this way for the report's thumbnails (``stream_tar_images``) and for an
img2dataset output's images (``read_tar_images``). pyarrow's S3 stream sends a ranged GET for
every read when it has no buffer, and tarfile reads 10 KB at a time. The server is the local
moto S3 (testkit/s3_server.py) on loopback; its request log gives the GET count. On S3 itself each
request also costs a round trip (tens of ms) and a request charge, which this does not show.

    python bench/s3_tar_reads.py --members 500 2000 --size 15000 --append bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from results_md import append  # noqa: E402

from pipeline.storage import STREAM_READ_AHEAD, filesystem_for, open_sequential  # noqa: E402
from testkit.s3_server import LocalS3  # noqa: E402


def _tar(members: int, size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(members):
            for name, payload in ((f"{i:09d}.jpg", os.urandom(size)), (f"{i:09d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _one_pass(s3: LocalS3, uri: str, path: str, buffered: bool) -> tuple[int, float, int]:
    """(GET requests, seconds, members read) of one pass that reads every member."""
    fs, p = filesystem_for(uri)
    before = s3.request_count("GET", path)
    t0 = time.perf_counter()
    stream = open_sequential(fs, p) if buffered else fs.open_input_stream(p)
    n = 0
    with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for m in tar:
            f = tar.extractfile(m)
            if f is not None:
                f.read()
                n += 1
    return s3.request_count("GET", path) - before, time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, nargs="+", default=[500, 2000], help="images per tar")
    p.add_argument("--size", type=int, default=15000, help="bytes per image member")
    p.add_argument("--append", default=None)
    a = p.parse_args(argv)
    lines = [
        "| images | tar MB | reader | GET requests | seconds |",
        "|---:|---:|---|---:|---:|",
    ]
    with LocalS3() as s3:
        for k, v in s3.env().items():
            os.environ[k] = v
        bucket = s3.create_bucket("bench-tar-reads")
        for members in a.members:
            data = _tar(members, a.size)
            key = f"shards/{members:05d}.tar"
            s3.client().put_object(Bucket=bucket, Key=key, Body=data)
            for buffered in (False, True):
                gets, secs, n = _one_pass(s3, f"s3://{bucket}/{key}", f"/{bucket}/{key}", buffered)
                assert n == 2 * members, (n, members)
                reader = f"read-ahead {STREAM_READ_AHEAD >> 20} MiB" if buffered else "no buffer (before)"
                lines.append(f"| {members:,} | {len(data) / 1e6:.1f} | {reader} | {gets:,} | {secs:.2f} |")
    text = "\n".join(lines)
    print(text)
    if a.append:
        append(a.append, "Streaming a tar from S3: requests with and without read-ahead",
               f"Local moto S3 on loopback (testkit/s3_server.py); tars of {a.size:,}-byte random "
               "image members plus a caption each, read member by member with tarfile's stream mode, "
               "as the report and the img2dataset input do.", text, argv)


if __name__ == "__main__":
    main()
