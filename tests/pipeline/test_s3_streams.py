"""Tars read from S3 in one pass (the report's thumbnails, an img2dataset output's images) cost a
few requests, not one per read: pyarrow's S3 stream issues a ranged GET for every read it is
asked for, and tarfile reads 10 KB at a time."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from pipeline.shard_format import stream_tar_images
from pipeline.stages.unpack import read_tar_images
from pipeline.storage import STREAM_READ_AHEAD
from testkit.s3_server import LocalS3

MEMBERS = 500
SIZE = 12_000  # bytes per image member: a 6 MB tar, 1.4 read-aheads


@pytest.fixture
def tar_on_s3(s3_server: LocalS3, s3_bucket: str) -> tuple[str, dict[str, bytes], int]:
    images = {f"{i:09d}": os.urandom(SIZE) for i in range(MEMBERS)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in images.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    s3_server.client().put_object(Bucket=s3_bucket, Key="shards/00000.tar", Body=buf.getvalue())
    return s3_bucket, images, len(buf.getvalue())


def _gets_allowed(size: int) -> int:
    return -(-size // STREAM_READ_AHEAD) + 1  # the read-aheads, and the one that finds the end


def test_report_thumbnails_read_a_tar_in_a_few_requests(s3_server: LocalS3, tar_on_s3) -> None:
    bucket, images, size = tar_on_s3
    last, middle = f"{MEMBERS - 1:09d}", f"{MEMBERS // 2:09d}"
    found = stream_tar_images(f"s3://{bucket}/shards", {"00000": {last, middle}})
    assert found == {last: images[last], middle: images[middle]}
    gets = s3_server.request_count("GET", f"/{bucket}/shards/00000.tar")
    assert 1 <= gets <= _gets_allowed(size), gets


def test_img2dataset_tar_is_unpacked_in_a_few_requests(s3_server: LocalS3, tar_on_s3) -> None:
    bucket, images, size = tar_on_s3
    found, broken = read_tar_images(f"s3://{bucket}/shards/00000.tar", set(images), max_bytes=SIZE)
    assert broken is None
    assert {k: m.data for k, m in found.items()} == images
    gets = s3_server.request_count("GET", f"/{bucket}/shards/00000.tar")
    assert 1 <= gets <= _gets_allowed(size), gets
