"""The img2dataset input format: the read stage over a real img2dataset output's shard tables,
then the unpack stage, which reads each row's image from the tar beside the table instead of
downloading it. The reference is what img2dataset wrote: its tar members, its sha256 column and
its statuses."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import schema as S
from pipeline.blocklist import BlocklistSpec
from pipeline.config import BlocklistConfig, ConfigError, ReadConfig
from pipeline.stages.read import ReadStage, plan_shards
from pipeline.stages.unpack import UnpackStage, read_tar_images
from testkit.img2dataset_output import make_img2dataset_output

ROWS = 14
PER_SHARD = 8  # img2dataset's shards: 8 + 6 rows
MISSING = (3, 11)  # rows whose URL answers 404


@pytest.fixture(scope="module")
def i2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_img2dataset_output(tmp_path_factory.mktemp("i2d-world"), ROWS, 5, missing=MISSING,
                                   number_sample_per_shard=PER_SHARD)


def _read(folder: Path, per_shard: int = PER_SHARD) -> pa.Table:
    cfg = ReadConfig(url_list=str(folder), input_format="img2dataset", save_additional_columns=("_gt_row",))
    plan = plan_shards(cfg, per_shard)
    stage = ReadStage(cfg=cfg, number_sample_per_shard=per_shard)
    return pa.concat_tables([stage.process_batch(pa.Table.from_pylist([d.as_row()])) for d in plan])


def _source(folder: Path) -> dict[str, dict]:
    """img2dataset's own rows, by its key, with the bytes of each stored image."""
    rows = {}
    for table_path in sorted(folder.glob("*.parquet")):
        with tarfile.open(table_path.with_suffix(".tar")) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for r in pq.read_table(table_path).to_pylist():
            r["jpg"] = members.get(f"{r['key']}.jpg")
            rows[r["key"]] = r
    return rows


def test_every_row_of_the_output_comes_once_with_its_image_or_its_failure(i2d: Path) -> None:
    source = _source(i2d)
    assert len(source) == ROWS  # img2dataset kept a row for each input row, failed ones too
    paths = pq.read_table(i2d.parent / "list.parquet").column("_gt_path").to_pylist()
    out = UnpackStage().process_batch(_read(i2d))
    rows = out.to_pylist()
    assert sorted(r["_gt_row"] for r in rows) == list(range(ROWS))
    assert sorted(r[S.SOURCE_KEY] for r in rows) == sorted(source)
    assert len({r[S.KEY] for r in rows}) == ROWS
    for r in rows:
        src = source[r[S.SOURCE_KEY]]
        assert (r[S.URL], r[S.CAPTION], r["_gt_row"]) == (src["url"], src["caption"], src["_gt_row"])
        if r["_gt_row"] in MISSING:
            assert src["status"] == "failed_to_download" and src["jpg"] is None
            assert r[S.STATUS] == S.SOURCE_FAILED and r[S.IMAGE_BYTES] is None
            assert r[S.ERROR] == f"failed_to_download: {src['error_message']}" and "404" in r[S.ERROR]
        else:
            assert r[S.STATUS] == S.OK and r[S.IMAGE_BYTES] == src["jpg"]
            # img2dataset's hash of what it downloaded (hash lists name originals), not of the
            # resized copy in its tar: the same file the server has.
            original = (i2d.parent / paths[r["_gt_row"]]).read_bytes()
            assert r[S.SOURCE_SHA256] == src["sha256"] == hashlib.sha256(original).hexdigest()
            assert src["sha256"] != hashlib.sha256(src["jpg"]).hexdigest()
            assert r[S.HTTP_STATUS] is None and r[S.DOWNLOAD_S] is None
    # Nothing the read stage carried for the unpack stage reaches a stored table.
    assert {S.SOURCE_STATUS, S.SOURCE_ERROR, S.SOURCE_TAR} <= set(out.column_names)


def test_smaller_shards_than_the_sources_still_read_every_row_once(i2d: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = UnpackStage().process_batch(_read(i2d, per_shard=3))
    assert "2 img2dataset shard(s) hold more rows than shard.number_sample_per_shard=3" in caplog.text
    assert sorted(out.column("_gt_row").to_pylist()) == list(range(ROWS))
    assert out.column(S.STATUS).to_pylist().count(S.OK) == ROWS - len(MISSING)


def _rewrite_tar(src: Path, dst: Path, keep) -> None:  # noqa: ANN001 - a predicate on the member
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            if keep(m):
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)


def test_a_missing_member_a_missing_tar_and_a_truncated_tar_are_recorded_per_row(i2d: Path, tmp_path: Path) -> None:
    folder = tmp_path / "i2d"
    shutil.copytree(i2d, folder)
    tables = sorted(folder.glob("*.parquet"))
    first_keys = [r["key"] for r in pq.read_table(tables[0]).to_pylist() if r["status"] == "success"]
    gone = first_keys[1]
    tar0 = tables[0].with_suffix(".tar")
    _rewrite_tar(i2d / tar0.name, tar0, lambda m: not m.name.startswith(gone + "."))
    tar1 = tables[1].with_suffix(".tar")
    with tarfile.open(tar1) as t:
        third = [m for m in t if m.name.endswith(".jpg")][2]
    data = tar1.read_bytes()
    tar1.write_bytes(data[: third.offset_data + third.size // 2])  # the writer died mid-image
    out = UnpackStage().process_batch(_read(folder))
    by_key = {r[S.SOURCE_KEY]: r for r in out.to_pylist()}
    assert by_key[gone][S.STATUS] == S.SOURCE_MISSING and by_key[gone][S.ERROR] == f"{gone} has no image in {tar0}"
    assert all(by_key[k][S.STATUS] == S.OK for k in first_keys if k != gone)
    second = [r for r in pq.read_table(tables[1]).to_pylist() if r["status"] == "success"]
    statuses = [by_key[r["key"]][S.STATUS] for r in second]
    # The two images before the cut are read; the ones from it on are missing, and say why.
    assert statuses == [S.OK] * 2 + [S.SOURCE_MISSING] * (len(second) - 2)
    lost = [by_key[r["key"]] for r in second[2:]]
    assert {r[S.ERROR] for r in lost} == {f"{tar1} is not readable after 2 image(s): ReadError: unexpected end of data"}
    assert len(out) == ROWS

    tar1.unlink()
    out = UnpackStage().process_batch(_read(folder))
    lost = [r for r in out.to_pylist() if r[S.SOURCE_KEY] in {x["key"] for x in second}]
    assert {(r[S.STATUS], r[S.ERROR]) for r in lost} == {(S.SOURCE_MISSING, f"{tar1} does not exist")}


def test_blocklists_and_the_byte_cap_apply_to_the_tar_images(i2d: Path, tmp_path: Path) -> None:
    source = [r for r in _source(i2d).values() if r["status"] == "success"]
    stored, original, url_listed = source[0], source[1], source[2]
    # A list may name the file in the tar, or the original img2dataset downloaded and resized.
    (tmp_path / "sha.txt").write_text(hashlib.sha256(stored["jpg"]).hexdigest() + "\n" + original["sha256"] + "\n")
    (tmp_path / "urls.txt").write_text(url_listed["url"] + "\n")
    lists = BlocklistSpec(BlocklistConfig(sha256=(f"bad-hashes={tmp_path / 'sha.txt'}",),
                                          urls=(f"bad-urls={tmp_path / 'urls.txt'}",)))
    out = {r[S.SOURCE_KEY]: r for r in UnpackStage(blocklist=lists).process_batch(_read(i2d)).to_pylist()}
    for row, name in ((stored, "bad-hashes"), (original, "bad-hashes"), (url_listed, "bad-urls")):
        got = out[row["key"]]
        assert got[S.STATUS] == S.BLOCKED and got[S.ERROR].startswith(f"blocklist {name} (")
        assert got[S.IMAGE_BYTES] is None
    assert sum(r[S.STATUS] == S.OK for r in out.values()) == len(source) - 3

    cap = sorted(len(r["jpg"]) for r in source)[len(source) // 2]
    out = UnpackStage(max_bytes=cap).process_batch(_read(i2d)).to_pylist()
    for r in out:
        size = len(_source(i2d)[r[S.SOURCE_KEY]]["jpg"] or b"")
        if r[S.STATUS] == S.TOO_LARGE:
            assert size > cap and f"is {size} bytes, over max_bytes {cap}" in r[S.ERROR]
        elif r[S.STATUS] == S.OK:
            assert size <= cap


def test_tar_reading_takes_only_regular_image_members_and_webdataset_keys(tmp_path: Path) -> None:
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        # WebDataset's fields: "d/b.png" is key "d/b", field "png"; "f.seg.png" is key "f",
        # field "seg.png" (a mask, say), not the sample's image.
        for name, data in [("a.jpg", b"A"), ("a.txt", b"cap"), ("d/b.png", b"B"), ("c.json", b"{}"),
                           ("a.png", b"second image of a"), ("f.seg.png", b"mask")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("e.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    found, broken = read_tar_images(str(tar), {"a", "d/b", "c", "e", "f"}, 1 << 20)
    assert broken is None
    assert {k: m.data for k, m in found.items()} == {"a": b"A", "d/b": b"B"}


def test_a_table_that_is_not_an_img2dataset_shard_table_is_a_config_error(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://x/a.jpg"], "caption": ["c"]}), tmp_path / "00000.parquet")
    with pytest.raises(ConfigError, match=r"read.input_format: img2dataset .* no 'key' or 'status' column"):
        plan_shards(ReadConfig(url_list=str(tmp_path), input_format="img2dataset"), 10)


def test_an_output_on_s3_reads_as_one_on_disk(i2d: Path, s3_server, s3_bucket: str) -> None:  # noqa: ANN001
    client = s3_server.client()
    for p in sorted(i2d.iterdir()):
        client.put_object(Bucket=s3_bucket, Key=f"i2d/{p.name}", Body=p.read_bytes())
    cfg = ReadConfig(url_list=f"s3://{s3_bucket}/i2d/", input_format="img2dataset", save_additional_columns=("_gt_row",))
    plan = plan_shards(cfg, PER_SHARD)
    rows = pa.concat_tables([ReadStage(cfg=cfg, number_sample_per_shard=PER_SHARD).process_batch(
        pa.Table.from_pylist([d.as_row()])) for d in plan])
    got = {r[S.SOURCE_KEY]: r for r in UnpackStage().process_batch(rows).to_pylist()}
    local = {r[S.SOURCE_KEY]: r for r in UnpackStage().process_batch(_read(i2d)).to_pylist()}
    assert sorted(got) == sorted(local)
    for key, r in got.items():
        assert (r[S.STATUS], r[S.IMAGE_BYTES], r[S.SOURCE_SHA256]) == (
            local[key][S.STATUS], local[key][S.IMAGE_BYTES], local[key][S.SOURCE_SHA256])
    # A tar gone from the bucket: its rows say so, the others are read.
    client.delete_object(Bucket=s3_bucket, Key="i2d/00001.tar")
    out = UnpackStage().process_batch(rows).to_pylist()
    lost = {r[S.ERROR] for r in out if r[S.STATUS] == S.SOURCE_MISSING}
    assert lost == {f"s3://{s3_bucket}/i2d/00001.tar does not exist"}
    assert sum(r[S.STATUS] == S.OK for r in out) == sum(
        r[S.STATUS] == S.OK and r[S.SOURCE_TAR].endswith("00000.tar") for r in local.values())


def test_the_model_sees_the_picture_not_the_border_img2dataset_padded_it_with(i2d: Path) -> None:
    from dataclasses import replace

    from clip_model.config import PreprocessConfig
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeOptions, _unpad_box, decode_image

    opts = DecodeOptions(DecodeConfig(image_size=64, resize_mode="center_crop"), PreprocessConfig(image_size=64))
    paths = pq.read_table(i2d.parent / "list.parquet").column("_gt_path").to_pylist()

    def pixels(data: bytes, o: DecodeOptions) -> np.ndarray:
        return np.frombuffer(decode_image(data, o).pixels, np.uint8).astype(np.float64)

    checked = 0
    for r in _source(i2d).values():
        if r["jpg"] is None:
            continue
        size = (r["original_width"], r["original_height"])
        box = _unpad_box(64, 64, size)
        if box is None or max(box[0], box[1]) < 3:
            continue  # (nearly) square: no margin worth the name
        # Reference: the model input a download of the original gets.
        ref = pixels((i2d.parent / paths[r["_gt_row"]]).read_bytes(), opts)
        unpadded = np.abs(pixels(r["jpg"], replace(opts, unpad=size)) - ref).mean()
        padded = np.abs(pixels(r["jpg"], opts) - ref).mean()
        assert unpadded < 6 and unpadded < padded / 2, (r["key"], unpadded, padded)
        checked += 1
    assert checked >= 5


def test_a_square_copy_without_white_margins_is_left_whole() -> None:
    from dataclasses import replace

    from PIL import Image

    from clip_model.config import PreprocessConfig
    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeOptions, decode_image

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    opts = DecodeOptions(DecodeConfig(image_size=64, resize_mode="center_crop"), PreprocessConfig(image_size=64))
    # A center-cropped copy of a 100 x 77 original: square, but all picture.
    whole = decode_image(buf.getvalue(), opts)
    got = decode_image(buf.getvalue(), replace(opts, unpad=(100, 77)))
    assert got.pixels == whole.pixels and (got.width, got.height) == (64, 64)


def test_a_sources_failures_keep_this_projects_words_and_map_anyone_elses() -> None:
    words = [S.http_failure(404), S.DECODE_ERROR, S.MISSING_URL, S.IMAGE_MISSING, S.TIMEOUT,
             "failed_to_download", "failed_to_resize", "http_oops", None]
    batch = pa.table({
        S.URL: [f"http://h/{i}" for i in range(len(words))],
        S.STATUS: [S.OK] * len(words),
        S.ERROR: pa.array([None] * len(words), pa.string()),
        S.SOURCE_KEY: [f"{i:04d}" for i in range(len(words))],
        S.SOURCE_STATUS: pa.array(words, pa.string()),
        S.SOURCE_ERROR: [f"why {i}" for i in range(len(words))],
        S.SOURCE_TAR: ["/nonexistent.tar"] * len(words),
    })
    out = UnpackStage().process_batch(batch).to_pylist()
    got = [(r[S.STATUS], r[S.ERROR]) for r in out]
    assert got[:5] == [(w, f"why {i}") for i, w in enumerate(words[:5])]  # clipcurate's: kept
    assert got[5:] == [(S.SOURCE_FAILED, "failed_to_download: why 5"), (S.SOURCE_FAILED, "failed_to_resize: why 6"),
                       (S.SOURCE_FAILED, "http_oops: why 7"), (S.SOURCE_FAILED, "no status: why 8")]


def _decode(table: pa.Table, cfg, **kw) -> dict[str, dict]:  # noqa: ANN001
    from clip_model.config import PreprocessConfig
    from pipeline.stages.decode import DecodeStage

    stage = DecodeStage(cfg=cfg, model_input=PreprocessConfig(image_size=64), isolate=False, **kw)
    return {r[S.SOURCE_KEY]: r for r in stage.process_batch(table).to_pylist()}


def test_a_stored_copy_that_already_is_the_jobs_copy_is_kept_byte_for_byte(i2d: Path) -> None:
    from PIL import Image

    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import _unpad_box

    source = _source(i2d)
    unpacked = UnpackStage().process_batch(_read(i2d))
    # The job stores what img2dataset stored (64 px border, JPEG q95): its files, unchanged.
    same = _decode(unpacked, DecodeConfig(image_size=64))
    # A download is always re-encoded: the same rows without the "stored" mark.
    as_download = _decode(S.set_column(unpacked, S.EMBEDDED_FROM, pa.array([None] * len(unpacked), pa.string())),
                          DecodeConfig(image_size=64))
    kept = 0
    for key, r in same.items():
        if r[S.STATUS] != S.OK:
            continue
        jpg = source[key]["jpg"]
        assert r[S.IMAGE] == jpg and r[S.SHA256] == hashlib.sha256(jpg).hexdigest()
        assert (r[S.WIDTH], r[S.HEIGHT]) == (64, 64)
        other = as_download[key]
        assert other[S.IMAGE] != jpg and (other[S.WIDTH], other[S.HEIGHT]) == (64, 64)
        # The model's input and the dedup thumbnail come from the same pixels either way.
        assert (r[S.PIXELS], r[S.PDQ]) == (other[S.PIXELS], other[S.PDQ])
        kept += 1
    assert kept == ROWS - len(MISSING)
    # Settings that change the file re-encode it: another quality, size or format; center_crop
    # does where border mode padded the picture (a copy without a margin is the same in both).
    for cfg in (DecodeConfig(image_size=64, encode_quality=90), DecodeConfig(image_size=48),
                DecodeConfig(image_size=64, encode_format="png"), DecodeConfig(image_size=64, resize_mode="center_crop")):
        for key, r in _decode(unpacked, cfg).items():
            src = source[key]
            if r[S.STATUS] != S.OK:
                continue
            box = _unpad_box(64, 64, (src["original_width"], src["original_height"]))
            if cfg.resize_mode != "center_crop" or (box and max(box[0], box[1]) >= 3):
                assert r[S.IMAGE] != src["jpg"], (cfg, key)
            if cfg.encode_quality != 95:
                # Re-made at the same size, the copy is the source's square again (padding and
                # the picture's edge), compressed once more: no pixel of the picture turns white.
                old, new = (np.asarray(Image.open(io.BytesIO(d)).convert("RGB"), np.float64)
                            for d in (src["jpg"], r[S.IMAGE]))
                assert 10 * np.log10(255**2 / ((old - new) ** 2).mean()) > 35, key


def test_a_stored_jpeg_carrying_anything_beside_its_pixels_is_re_encoded() -> None:
    from PIL import Image

    from pipeline.config import DecodeConfig
    from pipeline.stages.decode import DecodeOptions, decode_image

    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def jpeg(**kw) -> bytes:  # noqa: ANN003
        buf = io.BytesIO()
        picture.save(buf, "JPEG", quality=95, **kw)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x010F] = "camera maker"  # no orientation: the pixels are the same either way
    opts = DecodeOptions(DecodeConfig(image_size=64), stored=True)
    plain = jpeg()
    assert decode_image(plain, opts).data == plain
    for name, data in [("EXIF", jpeg(exif=exif.tobytes())), ("comment", jpeg(comment=b"hello")),
                       ("ICC profile", jpeg(icc_profile=b"\0" * 128)), ("trailing bytes", plain + b"PK\x03\x04zip"),
                       ("4:4:4 chroma", jpeg(subsampling=0)), ("grey", _grey_jpeg(picture))]:
        got = decode_image(data, opts)
        assert got.data != data, name
        reread = Image.open(io.BytesIO(got.data))
        assert reread.mode == "RGB" and [m for m, _ in reread.applist] == ["APP0"], name
        assert got.sha256 == hashlib.sha256(got.data).hexdigest()


def _grey_jpeg(picture) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    picture.convert("L").save(buf, "JPEG", quality=95)
    return buf.getvalue()
