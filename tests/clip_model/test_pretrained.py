"""Weight registry and verified, cached fetch over local paths, package://, http and s3://.

The checkpoint is generated here (random tensors in a safetensors file, a few MiB so streaming
crosses several 1 MiB chunks), served by a loopback HTTP server and by the local S3 server.
Expected hashes are computed with hashlib over the in-memory bytes, independently of
``file_sha256``.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import logging
import re
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import clip_model.config
from clip_model import pretrained
from clip_model.config import OPENAI_MEAN, OPENAI_STD
from clip_model.pretrained import (
    ChecksumError,
    DownloadError,
    PretrainedEntry,
    cache_path_for,
    fetch,
    file_sha256,
    get_pretrained_entry,
    list_pretrained,
)

OPENAI_ARCHS = {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "RN50", "RN101", "RN50x4"}
LAION_ENTRIES = {
    ("ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-L-14", "laion2b_s32b_b82k"),
    ("ViT-B-16", "laion2b_s34b_b88k"),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, dict]:
    """A ~3 MiB safetensors file of random tensors: (path, file bytes, tensors)."""
    rng = np.random.default_rng(1234)
    tensors = {
        "visual.proj": rng.standard_normal((512, 512), dtype=np.float32),
        "text_projection": rng.standard_normal((512, 512), dtype=np.float32),
        "logit_scale": np.array(4.6052, dtype=np.float32),
        "token_embedding.weight": rng.standard_normal((1000, 256), dtype=np.float32),
    }
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    data = path.read_bytes()
    assert len(data) > 2 * pretrained.CHUNK_SIZE  # exercises multi-chunk streaming
    return path, data, tensors


class _Files(http.server.ThreadingHTTPServer):
    """Loopback server: ``routes`` maps path -> body; counts every request by path."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, bytes] = {}
        self.truncated: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    @property
    def total_hits(self) -> int:
        with self.lock:
            return sum(self.hits.values())


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Files

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        with self.server.lock:
            self.server.hits[self.path] += 1
        if self.path in self.server.truncated:
            body = self.server.truncated[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


@pytest.fixture
def http_files() -> Iterator[_Files]:
    server = _Files()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _all_files(directory: Path) -> list[str]:
    """Every file under ``directory``, hidden temporaries included."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- http


def test_http_download_is_verified_cached_and_reused_without_requests(
    http_files: _Files, checkpoint, tmp_path: Path
) -> None:
    _, data, tensors = checkpoint
    http_files.routes["/weights/model.safetensors"] = data
    url = http_files.url("/weights/model.safetensors")
    expected = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"

    path = fetch(url, sha256=expected, cache_dir=str(cache))

    assert path.read_bytes() == data
    assert path.parent == cache and path == cache_path_for(url, cache)
    assert path.name.endswith("-model.safetensors")
    loaded = safetensors.numpy.load_file(str(path))
    np.testing.assert_array_equal(loaded["visual.proj"], tensors["visual.proj"])
    assert http_files.total_hits == 1
    assert _all_files(cache) == [path.name]  # no temporary left behind

    # Cached: neither a pinned nor an unpinned second fetch touches the network.
    assert fetch(url, sha256=expected, cache_dir=str(cache)) == path
    assert fetch(url, cache_dir=str(cache)) == path
    assert fetch(url, sha256=expected.upper(), cache_dir=str(cache)) == path
    assert http_files.total_hits == 1


def test_wrong_sha256_raises_and_keeps_no_file(
    http_files: _Files, checkpoint, tmp_path: Path
) -> None:
    _, data, _ = checkpoint
    http_files.routes["/m.safetensors"] = data
    url = http_files.url("/m.safetensors")
    wrong = "0" * 64
    cache = tmp_path / "cache"

    with pytest.raises(ChecksumError) as info:
        fetch(url, sha256=wrong, cache_dir=str(cache))

    err = info.value
    assert (err.uri, err.expected, err.actual) == (url, wrong, hashlib.sha256(data).hexdigest())
    message = str(err)
    assert url in message and wrong in message and err.actual in message
    assert _all_files(cache) == []  # neither the temporary nor the final file

    # The failure was not cached: a correct pin downloads again and succeeds.
    good = fetch(url, sha256=hashlib.sha256(data).hexdigest(), cache_dir=str(cache))
    assert good.read_bytes() == data
    assert http_files.total_hits == 2


def test_corrupt_cached_file_is_discarded_and_downloaded_again(
    http_files: _Files, checkpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, data, _ = checkpoint
    http_files.routes["/c.safetensors"] = data
    url = http_files.url("/c.safetensors")
    cached = cache_path_for(url, tmp_path)
    cached.write_bytes(b"not the checkpoint")

    with caplog.at_level(logging.WARNING, logger="clip_model.pretrained"):
        path = fetch(url, sha256=hashlib.sha256(data).hexdigest(), cache_dir=str(tmp_path))

    assert path == cached and path.read_bytes() == data
    assert http_files.total_hits == 1
    assert any("discarding cached" in r.getMessage() for r in caplog.records)


def test_unpinned_download_logs_a_warning(
    http_files: _Files, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    http_files.routes["/u.bin"] = b"unpinned bytes"
    url = http_files.url("/u.bin")
    with caplog.at_level(logging.WARNING, logger="clip_model.pretrained"):
        path = fetch(url, cache_dir=str(tmp_path))
    assert path.read_bytes() == b"unpinned bytes"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert url in warnings[0].getMessage() and "sha256" in warnings[0].getMessage()


def test_http_404_is_a_clear_error_naming_the_url(http_files: _Files, tmp_path: Path) -> None:
    url = http_files.url("/missing/model.pt")
    with pytest.raises(DownloadError, match=r"HTTP 404") as info:
        fetch(url, sha256="a" * 64, cache_dir=str(tmp_path))
    assert url in str(info.value)
    assert _all_files(tmp_path) == []


def test_truncated_body_is_an_error_and_keeps_no_file(http_files: _Files, tmp_path: Path) -> None:
    http_files.truncated["/t.bin"] = b"x" * 5000
    url = http_files.url("/t.bin")
    # Unpinned on purpose: the length check alone must catch the short body.
    with pytest.raises(DownloadError) as info:
        fetch(url, cache_dir=str(tmp_path))
    assert url in str(info.value)
    assert _all_files(tmp_path) == []


def test_connection_refused_names_the_url(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback has no listener here: the connect is refused immediately.
    url = "http://127.0.0.1:9/model.pt"
    with pytest.raises(DownloadError, match="could not fetch") as info:
        fetch(url, cache_dir=str(tmp_path), timeout=5)
    assert url in str(info.value)


def test_same_basename_from_different_urls_never_collides(
    http_files: _Files, tmp_path: Path
) -> None:
    http_files.routes["/a/open_clip_model.safetensors"] = b"weights A"
    http_files.routes["/b/open_clip_model.safetensors"] = b"weights B"
    path_a = fetch(http_files.url("/a/open_clip_model.safetensors"), cache_dir=str(tmp_path))
    path_b = fetch(http_files.url("/b/open_clip_model.safetensors"), cache_dir=str(tmp_path))
    assert path_a != path_b
    assert (path_a.read_bytes(), path_b.read_bytes()) == (b"weights A", b"weights B")


def test_default_cache_dir_comes_from_environment(
    http_files: _Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPCURATE_CACHE", str(tmp_path / "env-cache"))
    http_files.routes["/e.bin"] = b"env"
    path = fetch(http_files.url("/e.bin"), sha256=hashlib.sha256(b"env").hexdigest())
    assert path.parent == tmp_path / "env-cache"
    assert path.read_bytes() == b"env"


# --------------------------------------------------------------------------- s3


def test_s3_download_verified_cached_and_checksum_failure(
    s3_server, s3_bucket: str, checkpoint, tmp_path: Path
) -> None:
    _, data, tensors = checkpoint
    s3_server.client().put_object(Bucket=s3_bucket, Key="ckpt/model.safetensors", Body=data)
    uri = f"s3://{s3_bucket}/ckpt/model.safetensors"
    expected = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"

    with pytest.raises(ChecksumError) as info:
        fetch(uri, sha256="f" * 64, cache_dir=str(cache), s3_endpoint_url=s3_server.endpoint_url)
    assert uri in str(info.value) and info.value.actual == expected
    assert _all_files(cache) == []

    path = fetch(uri, sha256=expected, cache_dir=str(cache), s3_endpoint_url=s3_server.endpoint_url)
    assert path.read_bytes() == data
    loaded = safetensors.numpy.load_file(str(path))
    np.testing.assert_array_equal(
        loaded["token_embedding.weight"], tensors["token_embedding.weight"]
    )
    assert _all_files(cache) == [path.name]

    # A cached object is served without contacting S3: an endpoint with no listener works.
    again = fetch(uri, sha256=expected, cache_dir=str(cache), s3_endpoint_url="http://127.0.0.1:9")
    assert again == path


def test_s3_endpoint_from_environment_and_missing_key(
    s3_server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="small.bin", Body=b"s3 bytes")
    # Only the S3-specific variable is set; it must win over the generic one.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    path = fetch(f"s3://{s3_bucket}/small.bin", cache_dir=str(tmp_path))
    assert path.read_bytes() == b"s3 bytes"

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    missing = f"s3://{s3_bucket}/nope.bin"
    with pytest.raises(DownloadError, match="NoSuchKey") as info:
        fetch(missing, sha256="a" * 64, cache_dir=str(tmp_path / "other"))
    assert missing in str(info.value)
    assert _all_files(tmp_path / "other") == []


def test_s3_uri_without_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3://bucket/key"):
        fetch("s3://only-bucket", cache_dir=str(tmp_path))


# --------------------------------------------------------------------------- local, package


def test_local_path_and_file_uri_are_returned_in_place(checkpoint) -> None:
    path, data, _ = checkpoint
    expected = hashlib.sha256(data).hexdigest()
    assert fetch(str(path), sha256=expected) == path
    assert fetch(path.as_uri(), sha256=expected) == path
    assert fetch(str(path)) == path

    with pytest.raises(ChecksumError) as info:
        fetch(str(path), sha256="b" * 64)
    assert info.value.actual == expected
    assert path.read_bytes() == data  # the user's own file is never deleted

    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        fetch(str(path.parent / "does-not-exist.pt"))


def test_package_uri_resolves_inside_the_installed_package() -> None:
    config_file = Path(clip_model.config.__file__)
    expected = hashlib.sha256(config_file.read_bytes()).hexdigest()
    path = fetch("package://clip_model/config.py", sha256=expected)
    assert path.resolve() == config_file.resolve()

    with pytest.raises(FileNotFoundError, match="no-such-weights"):
        fetch("package://clip_model/weights/no-such-weights.safetensors")
    with pytest.raises(FileNotFoundError, match="not installed"):
        fetch("package://no_such_package_xyz/file.bin")
    with pytest.raises(ValueError, match="plain relative path"):
        fetch("package://clip_model/../pyproject.toml")


def test_package_uri_inside_a_zip_is_copied_to_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped_weights_pkg/__init__.py", "")
        zf.writestr("zipped_weights_pkg/weights/w.bin", b"zipped weights")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.delitem(sys.modules, "zipped_weights_pkg", raising=False)

    uri = "package://zipped_weights_pkg/weights/w.bin"
    cache = tmp_path / "cache"
    path = fetch(uri, sha256=hashlib.sha256(b"zipped weights").hexdigest(), cache_dir=str(cache))
    assert path.parent == cache and path.read_bytes() == b"zipped weights"
    monkeypatch.delitem(sys.modules, "zipped_weights_pkg", raising=False)


@pytest.mark.parametrize(
    ("uri", "sha", "match"),
    [
        ("ftp://example.invalid/x.pt", None, "unsupported URI scheme"),
        ("/tmp/x.pt", "abc", "64 hexadecimal"),
        ("/tmp/x.pt", "g" * 64, "64 hexadecimal"),
    ],
)
def test_bad_arguments_raise_value_error(uri: str, sha: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fetch(uri, sha256=sha)


def test_file_sha256_matches_hashlib(checkpoint, tmp_path: Path) -> None:
    path, data, _ = checkpoint
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # sha256 of the empty string, a published constant.
    assert file_sha256(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def open_clip_pretrained():
    # The reference registry; imported lazily because importing open_clip costs seconds.
    import open_clip

    return open_clip


def _open_clip_model_config(arch: str) -> dict:
    # Located without importing open_clip, so this stays cheap.
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    return json.loads((root / "model_configs" / f"{arch}.json").read_text())


def test_list_pretrained_contents() -> None:
    pairs = list_pretrained()
    assert ("ViT-B-32", "openai") in pairs
    assert ("tiny-synthetic", "synthetic") in pairs
    assert len(pairs) == len(set(pairs))
    assert {(a, t) for a, t in pairs if t == "openai"} == {(a, "openai") for a in OPENAI_ARCHS}
    assert LAION_ENTRIES <= set(pairs)
    for arch, tag in pairs:
        entry = get_pretrained_entry(arch, tag)
        assert isinstance(entry, PretrainedEntry) and (entry.arch, entry.tag) == (arch, tag)
        assert entry.file_format in pretrained.FILE_FORMATS


@pytest.mark.parametrize("arch", sorted(OPENAI_ARCHS))
def test_openai_entries_are_pinned_by_the_hash_in_their_url(
    arch: str, open_clip_pretrained
) -> None:
    entry = get_pretrained_entry(arch, "openai")
    assert entry is not None
    assert entry.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    assert entry.url.split("/")[-2] == entry.sha256
    assert entry.url.startswith("https://openaipublic.azureedge.net/clip/models/")
    assert entry.quick_gelu is True
    assert entry.file_format == "openai-torchscript"
    # Reference: open_clip's registry for the same weights.
    assert entry.url == open_clip_pretrained.get_pretrained_url(arch, "openai")
    _assert_preprocess_matches_open_clip(entry, open_clip_pretrained)


@pytest.mark.parametrize(("arch", "tag"), sorted(LAION_ENTRIES))
def test_laion_entries_are_hub_files_marked_unpinned(
    arch: str, tag: str, open_clip_pretrained
) -> None:
    entry = get_pretrained_entry(arch, tag)
    assert entry is not None
    cfg = open_clip_pretrained.get_pretrained_cfg(arch, tag)
    repo = cfg["hf_hub"].rstrip("/")
    assert entry.url == f"https://huggingface.co/{repo}/resolve/main/open_clip_model.safetensors"
    assert entry.sha256 is None and not entry.pinned
    assert "unpinned" in entry.notes
    assert entry.quick_gelu is bool(cfg.get("quick_gelu", False))
    _assert_preprocess_matches_open_clip(entry, open_clip_pretrained)


def _assert_preprocess_matches_open_clip(entry: PretrainedEntry, open_clip) -> None:
    cfg = open_clip.get_pretrained_cfg(entry.arch, entry.tag)
    pre = entry.preprocess
    assert pre.image_size == _open_clip_model_config(entry.arch)["vision_cfg"]["image_size"]
    assert (pre.mean, pre.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert pre.interpolation == cfg["interpolation"]
    assert pre.resize_mode == cfg["resize_mode"]


def test_preprocess_sizes_follow_the_architecture() -> None:
    sizes = {
        arch: get_pretrained_entry(arch, "openai").preprocess.image_size for arch in OPENAI_ARCHS
    }
    assert sizes["ViT-L-14-336"] == 336
    assert sizes["RN50x4"] == 288
    assert {sizes[a] for a in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "RN101")} == {224}
    laion_l14 = get_pretrained_entry("ViT-L-14", "laion2b_s32b_b82k")
    assert laion_l14.preprocess.mean == (0.5, 0.5, 0.5) and laion_l14.preprocess.std == (
        0.5,
        0.5,
        0.5,
    )


def test_quickgelu_names_and_tag_spelling() -> None:
    base = get_pretrained_entry("ViT-B-32", "openai")
    assert base is not None
    assert get_pretrained_entry("ViT-B-32-quickgelu", "openai") is base
    assert get_pretrained_entry("ViT-B-32", "OpenAI") is base
    assert get_pretrained_entry("ViT-B-32", "laion2b-s34b-b79k") is get_pretrained_entry(
        "ViT-B-32", "laion2b_s34b_b79k"
    )
    # LAION's ViT-B-32 was trained with GELU: no QuickGELU alias for it (as in open_clip).
    assert get_pretrained_entry("ViT-B-32-quickgelu", "laion2b_s34b_b79k") is None
    assert get_pretrained_entry("ViT-B-32", "no_such_tag") is None
    assert get_pretrained_entry("ViT-Z-99", "openai") is None


def test_tiny_synthetic_entry_and_bundled_file() -> None:
    entry = get_pretrained_entry("tiny-synthetic", "synthetic")
    assert entry is not None
    assert entry.url == "package://clip_model/weights/tiny-synthetic.safetensors"
    assert entry.sha256 == pretrained.TINY_SYNTHETIC_SHA256
    assert entry.preprocess.image_size == 64
    assert entry.preprocess.interpolation == "bicubic"
    assert (entry.preprocess.mean, entry.preprocess.std) == (OPENAI_MEAN, OPENAI_STD)
    assert entry.file_format == "safetensors"

    weights = Path(clip_model.config.__file__).parent / "weights" / "tiny-synthetic.safetensors"
    if weights.exists():
        # Once the weights are bundled, the registry must pin them and the pin must hold.
        assert entry.sha256 is not None, "bundled tiny weights need TINY_SYNTHETIC_SHA256 set"
        assert fetch(entry.url, sha256=entry.sha256).resolve() == weights.resolve()
    else:
        # A pin with no file behind it would make every load fail.
        assert entry.sha256 is None
        with pytest.raises(FileNotFoundError):
            fetch(entry.url)
