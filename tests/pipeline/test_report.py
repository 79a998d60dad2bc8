"""pipeline.report: _stats.json counts, the HTML page's histograms and thumbnails, escaping.

The fixture table is built with known labels (which rows fail, which are flagged, which are
duplicates of which), and every expectation is computed from those labels or with numpy
directly, not with the report's own helpers. The page is rendered by headless Chromium: a
screenshot (must show the bars, the threshold lines and the photos) and the parsed DOM (must
hold the histogram SVGs and the expected number of <img>, and no injected element).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import report
from testkit.testdata import photos

PHOTOS = photos()
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror="document.title=1">'
MODEL = "ViT-B-32@sha256:" + "ab" * 32
CLIP_T = 0.2
SIZES = {2: 3, 3: 2, 5: 1}  # duplicate group size -> number of groups in the fixture


def _fixture() -> tuple[pa.Table, list[str | None]]:
    """A 300-row final table and, per row, the drop category the test expects (None: kept)."""
    rng = np.random.default_rng(7)
    n = 300
    keys = [f"{i // 100:05d}{i % 100:04d}" for i in range(n)]
    status = ["ok"] * n
    for i in range(0, 30):
        status[i] = "http_404"
    for i in range(30, 40):
        status[i] = "decode_error"
    for i in range(40, 52):
        status[i] = "timeout"
    ok = np.array([s == "ok" for s in status])
    clip = rng.normal(0.27, 0.05, n).astype(np.float32)
    unsafe = rng.normal(-0.12, 0.05, n).astype(np.float32)
    unsafe = np.minimum(unsafe, -0.001)  # nothing flagged except the rows set below
    concept: list[str | None] = [None] * n
    for i in (60, 61, 62):
        unsafe[i], concept[i] = 0.05, "nudity"
    for i in range(70, 77):
        unsafe[i], concept[i] = 0.02, "violence"
    clip[~ok] = np.nan
    unsafe[~ok] = np.nan
    clip[80] = np.nan  # an ok row without caption: no clip score
    caption = [f"a photo number {i}" for i in range(n)]
    caption[60] = HOSTILE
    caption[80] = None
    sha = [f"{i:064x}" if ok[i] else None for i in range(n)]
    # Duplicate groups: a kept root at 100 + 10 g, members after it.
    dup: list[str | None] = [None] * n
    expected_cat: list[str | None] = [None] * n
    g = 0
    for size, count in SIZES.items():
        for _ in range(count):
            root = 100 + 10 * g
            clip[root] = max(clip[root], CLIP_T + 0.05)
            for m in range(1, size):
                dup[root + m] = keys[root]
                expected_cat[root + m] = "dedup:semantic"
                clip[root + m] = max(clip[root + m], CLIP_T + 0.05)
            g += 1
    # An exact duplicate pointing at a dropped representative (one more step to the root):
    # joins the size-2 group rooted at 100, which becomes size 3.
    dup[105], sha[105], expected_cat[105] = keys[101], sha[101], "dedup:exact"
    clip[105] = max(clip[105], CLIP_T + 0.05)
    # A duplicate of an earlier run's row (its root key is not in this table).
    dup[200], expected_cat[200] = "previous-run-key", "dedup:previous_run"
    clip[200] = max(clip[200], CLIP_T + 0.05)

    reason: list[str | None] = [None] * n
    for i in range(n):
        if status[i] != "ok":
            expected_cat[i] = f"status:{status[i]}"
            reason[i] = f"status:{status[i]}"
        elif concept[i] is not None:
            expected_cat[i] = f"unsafe:{concept[i]}"
            reason[i] = f"unsafe:{concept[i]}(image margin 0.3>0.25; ViT-B-32@sha256:abab…)"
        elif np.isnan(clip[i]):
            expected_cat[i] = f"clip_score<{CLIP_T:g}"
            reason[i] = f"clip_score<{CLIP_T:g} (ViT-B-32@sha256:abab…; no caption)"
        elif clip[i] < CLIP_T:
            expected_cat[i] = f"clip_score<{CLIP_T:g}"
            reason[i] = f"clip_score<{CLIP_T:g} (ViT-B-32@sha256:abab…)"
        elif expected_cat[i] == "dedup:semantic":
            reason[i] = "dedup:semantic(cos>=0.95; ViT-B-32@sha256:abab…)"
        elif expected_cat[i] == "dedup:exact":
            reason[i] = "dedup:exact(sha256)"
        elif expected_cat[i] == "dedup:previous_run":
            reason[i] = "dedup:previous_run(cos>=0.95 or sha256; ViT-B-32@sha256:abab…)"
    keep = [r is None for r in reason]
    table = pa.table(
        {
            "key": keys,
            "shard": [k[:5] for k in keys],
            "url": [f"http://127.0.0.1:1/img/{i}.jpg" for i in range(n)],
            "caption": caption,
            "status": status,
            "sha256": sha,
            "clip_score": pa.array(clip, pa.float32(), mask=np.isnan(clip)),
            "unsafe_score": pa.array(unsafe, pa.float32(), mask=np.isnan(unsafe)),
            "unsafe_concept": concept,
            "duplicate_of": dup,
            "keep": keep,
            "drop_reason": reason,
            "model": [MODEL] * n,
        }
    )
    return table, expected_cat


def _thumbnail_source(table: pa.Table):
    photos = [p.read_bytes() for p in PHOTOS]
    keys = table.column("key").to_pylist()

    def get(key: str) -> bytes | None:
        i = keys.index(key)
        if i == 61:
            return b"not an image at all"
        if i == 62:
            raise OSError("tar member missing")
        return photos[i % len(photos)]

    return get


def test_stats_counts_add_up_to_the_input_rows() -> None:
    table, expected_cat = _fixture()
    stages = {"download": {"rows": 300, "seconds": 12.0}, "embed": {"rows": 248, "seconds": 4.0}}
    stats = report.build_stats(
        table, stages=stages, timings={"total": 20.0}, input_rows=300, clip_threshold=CLIP_T
    )
    assert stats["rows"] == stats["input_rows"] == 300
    assert sum(stats["status"].values()) == 300
    assert stats["status"] == {"decode_error": 10, "http_404": 30, "ok": 248, "timeout": 12}
    want = Counter(c for c in expected_cat if c is not None)
    assert stats["drop_reasons"] == dict(want)
    assert stats["kept"] == expected_cat.count(None) == 300 - sum(want.values())
    assert stats["kept"] + sum(stats["drop_reasons"].values()) == 300
    # img2dataset's keys, with its split of failures.
    assert (stats["count"], stats["successes"]) == (300, 248)
    assert (stats["failed_to_download"], stats["failed_to_resize"]) == (42, 10)
    assert stats["unsafe_concepts"] == {"nudity": 3, "violence": 7}
    # Groups: sizes 2, 2, 2, 3, 3, 5 planted; the exact duplicate makes one size-2 group 3;
    # the previous-run duplicate is a group of 2 whose other member is not in this table.
    assert stats["duplicates"]["group_sizes"] == {"2": 3, "3": 3, "5": 1}
    assert stats["duplicates"]["duplicate_rows"] == sum(
        1 for d in table["duplicate_of"].to_pylist() if d
    )
    assert stats["stages"]["download"]["rows_per_s"] == pytest.approx(25.0)
    assert stats["stages"]["embed"]["rows_per_s"] == pytest.approx(62.0)
    clip = table["clip_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    finite = clip[np.isfinite(clip)]
    assert stats["clip_score"]["n"] == finite.size == 247
    assert stats["clip_score"]["below_threshold"] == int((finite < CLIP_T).sum())
    assert stats["clip_score"]["p50"] == pytest.approx(float(np.median(finite)))
    json.dumps(stats, allow_nan=False)  # valid JSON, no NaN


def test_notes_are_shown_once_at_the_top_escaped() -> None:
    table, _ = _fixture()
    line = "moderation: no moderation thresholds are calibrated for <x>: no row is dropped by moderation"
    stats = report.build_stats(table, input_rows=300, clip_threshold=CLIP_T, extra={"notes": [line]})
    page = report.render_html(table, stats)
    notes = page.split('<div id="notes">', 1)[1].split("</div>", 1)[0]
    assert notes.count("<li>") == 1 and "calibrated for &lt;x&gt;" in notes
    assert page.index('<div id="notes">') < page.index('<div id="status-counts">')


def test_bad_input_is_a_clear_error() -> None:
    table, _ = _fixture()
    with pytest.raises(ValueError, match="300 rows but the input had 301"):
        report.build_stats(table, input_rows=301)
    with pytest.raises(ValueError, match="no 'status' column"):
        report.build_stats(table.drop_columns(["status"]))
    with pytest.raises(ValueError, match="needs 'rows' and 'seconds'"):
        report.build_stats(table, stages={"embed": {"rows": 3}})
    assert report.reason_category("unsafe:nudity(image margin 0.3>0.25; m)") == "unsafe:nudity"
    assert report.reason_category("clip_score<0.28 (m; no caption)") == "clip_score<0.28"
    assert report.reason_category(None) == report.reason_category("  ") == "unspecified"


class _Dom(HTMLParser):
    """Collects the elements of the page that the assertions look at."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[dict[str, str]] = []
        self.rects: dict[str, list[dict[str, str]]] = {}
        self.thresholds: dict[str, list[dict[str, str]]] = {}
        self.imgs: list[dict[str, str]] = []
        self.scripts = 0
        self.sections: list[str] = []
        self.title_text = ""
        self._svg: str | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self._svg = a.get("data-name", "")
            self.svgs.append(a)
        elif tag == "rect" and a.get("class") == "bar":
            self.rects.setdefault(self._svg or "", []).append(a)
        elif tag == "line" and a.get("class") == "threshold":
            self.thresholds.setdefault(self._svg or "", []).append(a)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "script":
            self.scripts += 1
        elif tag == "section":
            self.sections.append(a.get("data-reason", ""))
        elif tag == "title" and self._svg is None:
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_text += data


def _chromium(*args: str) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (`make test` installs the Debian package)"
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    try:
        return subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _near(rgb: np.ndarray, color: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(rgb.astype(int) - np.array(color)).max(axis=2) <= tol).sum())


def test_report_page_renders_histograms_thumbnails_and_escapes_captions(tmp_path: Path) -> None:
    assert len(PHOTOS) >= 3
    table, expected_cat = _fixture()
    stats = report.write_report(
        table,
        str(tmp_path / "out"),
        input_rows=300,
        clip_threshold=CLIP_T,
        thumbnails=_thumbnail_source(table),
        samples_per_reason=8,
    )
    written = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert written["drop_reasons"] == stats["drop_reasons"]
    page = (tmp_path / "out" / "report.html").read_text()

    # Escaping: the hostile caption is text, never markup.
    assert "<script" not in page.lower()
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in page
    assert "<img src=x" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        "http://127.0.0.1:1/img/", ""
    ), "the page must not reference anything outside itself"

    # What the page should show, from the fixture's own labels: per category, the rows that
    # have an image, at most 8 of them; minus the two rows whose thumbnail is unreadable.
    sha = table["sha256"].to_pylist()
    with_image = Counter(
        "kept" if c is None else c for c, h in zip(expected_cat, sha, strict=True) if h is not None
    )
    expected_imgs = sum(min(8, v) for v in with_image.values()) - 2

    shot = tmp_path / "shot.png"
    _chromium(
        "--window-size=1280,4000",
        f"--screenshot={shot}",
        (tmp_path / "out" / "report.html").as_uri(),
    )
    dom_html = _chromium("--dump-dom", (tmp_path / "out" / "report.html").as_uri()).stdout.decode()
    dom = _Dom()
    dom.feed(dom_html)

    assert dom.scripts == 0 and "pwned" not in dom.title_text and dom.title_text.strip()
    assert sorted(dom.sections) == sorted(with_image)
    assert len(dom.imgs) == expected_imgs
    assert all(i["src"].startswith("data:image/jpeg;base64,") for i in dom.imgs)
    assert {s["data-name"] for s in dom.svgs} == {"clip_score", "unsafe_score", "dup_group_size"}

    # Histogram bars hold numpy.histogram of the same data over the same range.
    for name, threshold in (("clip_score", CLIP_T), ("unsafe_score", 0.0)):
        values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[np.isfinite(values)]
        bars = dom.rects[name]
        counts = np.array([int(b["data-count"]) for b in bars])
        lo, hi = float(bars[0]["data-lo"]), float(bars[-1]["data-hi"])
        assert lo == min(values.min(), threshold) and hi == max(values.max(), threshold)
        ref, _ = np.histogram(values, bins=len(bars), range=(lo, hi))
        np.testing.assert_array_equal(counts, ref)
        assert counts.sum() == values.size
        heights = np.array([float(b["height"]) for b in bars])
        np.testing.assert_allclose(heights / heights.max(), counts / counts.max(), atol=1e-3)
        # The threshold line sits inside the bar whose bin holds the threshold.
        (line,) = dom.thresholds[name]
        assert float(line["data-value"]) == threshold
        k = min(int(np.searchsorted([float(b["data-hi"]) for b in bars], threshold)), len(bars) - 1)
        x0 = float(bars[k]["x"])
        assert x0 - 1 <= float(line["x1"]) <= x0 + float(bars[k]["width"]) + 1
    dup_bars = dom.rects["dup_group_size"]
    got = {
        round((float(b["data-lo"]) + float(b["data-hi"])) / 2): int(b["data-count"])
        for b in dup_bars
    }
    assert {k: v for k, v in got.items() if v} == {2: 3, 3: 3, 5: 1}

    # The screenshot is a real rendering: bars, threshold lines and photos are on it.
    with Image.open(shot) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[0] >= 1000 and rgb.shape[1] >= 1000
    assert rgb.std() > 20, "blank screenshot"
    assert _near(rgb, (0x3D, 0x7C, 0xC9)) > 2000, "histogram bars not drawn"
    assert _near(rgb, (0xD0, 0x34, 0x2C), tol=30) > 100, "threshold lines not drawn"
    colours = len(np.unique(rgb.reshape(-1, 3)[::7], axis=0))
    assert colours > 2000, f"only {colours} colours: thumbnails not drawn"


def test_thumbnail_is_scaled_and_rejects_garbage() -> None:
    uri = report.thumbnail_data_uri(PHOTOS[0].read_bytes(), size=64)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        assert max(img.size) == 64
    assert report.thumbnail_data_uri(b"<html>nope</html>") is None


def test_report_is_written_to_s3(s3_bucket: str, s3_server) -> None:
    table, _ = _fixture()
    stats = report.write_report(table, f"s3://{s3_bucket}/runs/day1", clip_threshold=CLIP_T)
    client = s3_server.client()
    body = client.get_object(Bucket=s3_bucket, Key="runs/day1/_stats.json")["Body"].read()
    assert json.loads(body)["drop_reasons"] == stats["drop_reasons"]
    page = client.get_object(Bucket=s3_bucket, Key="runs/day1/report.html")["Body"].read()
    assert page.startswith(b"<!DOCTYPE html>") and b'id="hist-clip_score"' in page


def test_thumbnails_are_read_from_the_shard_tars(tmp_path: Path) -> None:
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    photos = {
        f"0000{s}000{r}": PHOTOS[(2 * s + r) % len(PHOTOS)].read_bytes()
        for s in (0, 1)
        for r in (0, 1)
    }
    for s in (0, 1):
        with tarfile.open(shards / f"0000{s}.tar", "w") as tar:
            for key, data in photos.items():
                if not key.startswith(f"0000{s}"):
                    continue
                for name, payload in ((f"{key}.txt", b"caption"), (f"{key}.jpg", data)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    table = pa.table(
        {
            "key": [*photos, "000020000"],
            "shard": ["00000", "00000", "00001", "00001", "00002"],  # 00002.tar does not exist
            "status": ["ok"] * 5,
        }
    )
    wanted = {"000000001", "000010000", "000020000"}
    got = report.read_thumbnails_from_shards(str(shards), table, wanted)
    assert got == {k: photos[k] for k in ("000000001", "000010000")}
    with pytest.raises(ValueError, match="overwrite computed keys"):
        report.build_stats(table, extra={"rows": 1})
