"""Registry of released CLIP weights and a verified, cached fetch of weight files.

Each registry entry records where a weight file lives, its sha256 (when known) and the image
preprocessing the weights were trained with. :func:`fetch` turns a URI (local path, ``file://``,
``package://``, ``http(s)://`` or ``s3://``) into a local file whose sha256 has been checked.

This module must stay free of Ray and pipeline imports; boto3 is imported only when an ``s3://``
URI is fetched, so loading local or http weights never needs it.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import importlib.util
import logging
import os
import pathlib
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from clip_model.config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig

if TYPE_CHECKING:
    from importlib.abc import Traversable

logger = logging.getLogger(__name__)

# sha256 of the bundled tiny model (clip_model/weights/tiny-synthetic.safetensors); the card
# (tiny-synthetic.md) says how to reproduce it. Retraining changes the file and so this value.
TINY_SYNTHETIC_SHA256: str | None = "936636acdb2e56eadbc046f85899c0512e8c599b7a342668384bea68484bd970"

# sha256 of the bundled multilingual model (clip_model/weights/multilingual-synthetic.safetensors,
# card: multilingual-synthetic.md).
MULTILINGUAL_SYNTHETIC_SHA256: str | None = "60e56f2560a19f675e5b045e2efd5acf09239f9764d2db861c35b7c03d1054dd"

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough that hashing, not syscalls, dominates
CACHE_ENV_VAR = "CLIPCURATE_CACHE"
_USER_AGENT = "clipcurate/0.1 (+weights fetch)"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# InceptionV3-style normalisation; open_clip records it for the LAION ViT-L-14 2B run.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# Names of the on-disk layouts a checkpoint loader must handle.
FILE_FORMATS = {
    "openai-torchscript": "OpenAI's release: a TorchScript archive (state dict readable from it)",
    "openclip": "torch-pickled state dict with open_clip key names",
    "safetensors": "safetensors file with open_clip key names",
}


class ChecksumError(ValueError):
    """A file's sha256 differs from the pinned value."""

    def __init__(self, uri: str, expected: str, actual: str) -> None:
        self.uri = uri
        self.expected = expected
        self.actual = actual
        super().__init__(f"sha256 mismatch for {uri}: expected {expected}, got {actual}")


class DownloadError(OSError):
    """A remote weight file could not be retrieved (HTTP error, missing S3 object, truncation)."""


@dataclass(frozen=True)
class ModerationDefaults:
    """Unsafe-concept prompts with thresholds calibrated for one set of weights.

    concepts: (name, prompts) pairs; neutral_prompts: what a concept must beat; image_thresholds
    / caption_thresholds: (name, margin threshold or None = side off) pairs, margins as in
    pipeline/stages/moderate.py. calibration: how and on what the thresholds were chosen.
    """

    concepts: tuple[tuple[str, tuple[str, ...]], ...]
    neutral_prompts: tuple[str, ...]
    image_thresholds: tuple[tuple[str, float | None], ...]
    caption_thresholds: tuple[tuple[str, float | None], ...]
    calibration: str


@dataclass(frozen=True)
class ModelDefaults:
    """Filter settings that belong to a set of weights (a job uses them unless told otherwise).

    clip_score_threshold: image-caption cosine below which a pair is dropped (None: no
    calibrated value; the job then drops nothing by clip_score). moderation: calibrated unsafe
    concepts (None: the job records generic concept scores and drops nothing by them).
    dedup_threshold / dedup_pixel_check / pixel bounds: semantic duplicate settings (None: the
    job's generic default). sources: where each value comes from, for the job's log and report.
    """

    clip_score_threshold: float | None = None
    moderation: ModerationDefaults | None = None
    dedup_threshold: float | None = None
    dedup_pixel_check: bool | None = None
    dedup_pixel_mean_max: float | None = None
    dedup_pixel_blob_max: float | None = None
    dedup_pixel_channel_mean_max: float | None = None
    dedup_pixel_channel_blob_max: float | None = None
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class PretrainedEntry:
    """One released set of weights for one architecture.

    arch: architecture config name (``clip_model/configs/<arch>.json``), without ``-quickgelu``.
    tag: the weights' name, e.g. "openai" or "laion2b_s34b_b79k".
    url: where the file lives: http(s)://, s3:// or package://<package>/<path>.
    sha256: lowercase hex digest of the file, or None when not pinned (then downloads are
        not verified and a warning is logged).
    preprocess: the image preprocessing the weights were trained with.
    quick_gelu: the weights expect QuickGELU activations (all OpenAI releases do).
    file_format: one of FILE_FORMATS' keys, telling the loader how to read the file.
    notes: free text for humans (provenance, caveats).
    defaults: filter settings calibrated for these weights (:class:`ModelDefaults`), or None.
    """

    arch: str
    tag: str
    url: str
    sha256: str | None
    preprocess: PreprocessConfig
    quick_gelu: bool = False
    file_format: str | None = None
    notes: str = ""
    defaults: ModelDefaults | None = None

    @property
    def pinned(self) -> bool:
        """True when downloads of this entry are verified against a recorded sha256."""
        return self.sha256 is not None


# LAION-5B kept English pairs whose OpenAI ViT-B/32 image-caption cosine is >= 0.28 (0.3 for
# LAION-400M); no other published threshold is tied to one set of weights.
_LAION_B32 = ModelDefaults(
    clip_score_threshold=0.28,
    sources=("clip_score 0.28: LAION-5B's filter for English pairs with OpenAI ViT-B/32",),
)

# The bundled tiny model, calibrated on fresh synthetic worlds (testkit/calibrate_tiny.py, seeds
# 31 and 32, 500 rows each, 256 px centre-crop inputs as decode makes the model's input): hazard
# image margins 0.056-0.144 vs at most 0.039 for other scenes, so 0.05 flags every hazard scene
# and none else (recall 1.0, fpr 0; with the border-padded stored image, 0.955-0.962 at fpr 0);
# captions that name the hazard reach 0.15, others at most 0.04; clip_score 0.3 drops 1-2 % of
# matching captions and 92-98 % of mismatched ones. Near duplicates: see the card.
_TINY_SYNTHETIC = ModelDefaults(
    clip_score_threshold=0.3,
    moderation=ModerationDefaults(
        concepts=(("hazard", ("a hazard sign", "a warning sign", "a danger sign")),),
        neutral_prompts=("a photo", "an image", "a picture"),
        image_thresholds=(("hazard", 0.05),),
        caption_thresholds=(("hazard", 0.1),),
        calibration="testkit/calibrate_tiny.py on worlds 31 and 32 (500 rows each): recall 1.0 at fpr 0",
    ),
    dedup_threshold=0.9,
    dedup_pixel_check=True,
    dedup_pixel_mean_max=4.5,
    dedup_pixel_blob_max=23.0,
    dedup_pixel_channel_mean_max=7.0,
    dedup_pixel_channel_blob_max=34.0,
    sources=(
        "clip_score 0.3 and hazard margins 0.05 (image) / 0.1 (caption): testkit/calibrate_tiny.py",
        "dedup cos>=0.9 confirmed by 32x32 thumbnails: bench/pixel_check.py (recall 0.963-0.988, "
        "no row dropped for another scene on five worlds); per-channel bounds 7/34 from the job's "
        "default worlds: bench/pixel_check.py --world default (2026-12-06)",
    ),
)


# The multilingual towers' defaults, from the job's embeddings of labelled worlds
# (bench/calibrate_model_defaults.py; clip_model/weights/multilingual-synthetic.md).
_MULTILINGUAL_SYNTHETIC = ModelDefaults(
    clip_score_threshold=0.407,
    # The job's margin over neutral prompts does not suit this model (recall 0.95 costs 62 %
    # false positives: it never saw a caption as bare as "a photo"); no calibrated moderation.
    moderation=None,
    # Different scenes reach cosine 0.998-0.999 while near copies start at 0.957: candidates at
    # 0.95, each confirmed by the thumbnails' pixel check (bounds as for tiny-synthetic).
    dedup_threshold=0.95,
    dedup_pixel_check=True,
    dedup_pixel_mean_max=4.5,
    dedup_pixel_blob_max=23.0,
    dedup_pixel_channel_mean_max=7.0,
    dedup_pixel_channel_blob_max=34.0,
    sources=(
        "clip_score 0.407: bench/calibrate_model_defaults.py, world 5151 (mismatch recall 0.952, "
        "2.8 % of matched dropped); world 6262: recall 0.922, 1.2 %",
        "dedup candidates at cos>=0.95 (near copies 0.957-1.0, different scenes up to 0.999) "
        "confirmed by 32x32 thumbnails: bench/calibrate_model_defaults.py",
        "no moderation: the neutral-prompt margin separates hazard scenes at AUC 0.86 only "
        "(plain cosine 0.98, threshold 0.426 in the card)",
    ),
)


def _openai(arch: str, digest: str, filename: str, image_size: int = 224) -> PretrainedEntry:
    # OpenAI publishes each file under a directory named after its sha256, so the URL and the
    # pinned hash come from the same fact.
    return PretrainedEntry(
        arch=arch,
        tag="openai",
        url=f"https://openaipublic.azureedge.net/clip/models/{digest}/{filename}",
        sha256=digest,
        preprocess=PreprocessConfig(image_size=image_size, mean=OPENAI_MEAN, std=OPENAI_STD),
        quick_gelu=True,
        file_format="openai-torchscript",
        notes="OpenAI CLIP release (QuickGELU)",
    )


def _laion_hf(
    arch: str,
    tag: str,
    repo: str,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> PretrainedEntry:
    # The hub serves the same path from moving branch heads and we have no offline record of
    # these files' hashes, so they stay unpinned rather than carrying a guessed digest.
    return PretrainedEntry(
        arch=arch,
        tag=tag,
        url=f"https://huggingface.co/{repo}/resolve/main/open_clip_model.safetensors",
        sha256=None,
        preprocess=PreprocessConfig(image_size=224, mean=mean, std=std),
        quick_gelu=False,
        file_format="safetensors",
        notes=f"LAION OpenCLIP weights from Hugging Face repo {repo}; unpinned: sha256 not recorded",
    )


_ENTRIES: tuple[PretrainedEntry, ...] = (
    _openai("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    _openai(
        "RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"
    ),
    _openai(
        "RN50x4",
        "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
        "RN50x4.pt",
        image_size=288,
    ),
    replace(
        _openai(
            "ViT-B-32",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            "ViT-B-32.pt",
        ),
        defaults=_LAION_B32,
    ),
    _openai(
        "ViT-B-16",
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        "ViT-B-16.pt",
    ),
    _openai(
        "ViT-L-14",
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        "ViT-L-14.pt",
    ),
    _openai(
        "ViT-L-14-336",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        "ViT-L-14-336px.pt",
        image_size=336,
    ),
    _laion_hf("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    _laion_hf("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    # open_clip records Inception normalisation (0.5, 0.5) for this run, not OpenAI's.
    _laion_hf(
        "ViT-L-14",
        "laion2b_s32b_b82k",
        "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
    ),
    PretrainedEntry(
        arch="tiny-synthetic",
        tag="synthetic",
        url="package://clip_model/weights/tiny-synthetic.safetensors",
        sha256=TINY_SYNTHETIC_SHA256,
        preprocess=PreprocessConfig(image_size=64, mean=OPENAI_MEAN, std=OPENAI_STD),
        quick_gelu=False,
        file_format="safetensors",
        notes="tiny model trained on the synthetic world; bundled with the package",
        defaults=_TINY_SYNTHETIC,
    ),
    PretrainedEntry(
        arch="multilingual-synthetic",
        tag="synthetic",
        url="package://clip_model/weights/multilingual-synthetic.safetensors",
        sha256=MULTILINGUAL_SYNTHETIC_SHA256,
        preprocess=PreprocessConfig(image_size=64, mean=OPENAI_MEAN, std=OPENAI_STD),
        quick_gelu=False,
        file_format="safetensors",
        notes="ResNet18-shaped (width 32) + 4-layer BERT towers trained on the synthetic world "
        "with captions in English, Chinese, Russian and Hindi; bundled with the package "
        "(needs clipcurate[hf])",
        defaults=_MULTILINGUAL_SYNTHETIC,
    ),
)

_REGISTRY: dict[tuple[str, str], PretrainedEntry] = {(e.arch, e.tag): e for e in _ENTRIES}
_QUICKGELU_SUFFIX = "-quickgelu"


def _clean_tag(tag: str) -> str:
    # open_clip's convention: tags are matched case-insensitively with '-' and '_' equivalent.
    return tag.strip().lower().replace("-", "_")


def list_pretrained() -> list[tuple[str, str]]:
    """All registered (architecture, tag) pairs, in registry order.

    Architectures are listed by their base name; for entries with ``quick_gelu=True`` the
    ``<arch>-quickgelu`` alias is also accepted by :func:`get_pretrained_entry`.
    """
    return list(_REGISTRY)


def get_pretrained_entry(model_name: str, tag: str) -> PretrainedEntry | None:
    """Look up the weights ``tag`` for architecture ``model_name``; None when not registered.

    ``model_name`` may carry the ``-quickgelu`` suffix (open_clip's naming); it then matches
    only weights trained with QuickGELU, and the returned entry's ``arch`` is the base name.
    ``tag`` is matched case-insensitively with '-' and '_' treated alike.
    """
    clean = _clean_tag(tag)
    entry = _REGISTRY.get((model_name, clean))
    if entry is not None:
        return entry
    if model_name.endswith(_QUICKGELU_SUFFIX):
        base = _REGISTRY.get((model_name[: -len(_QUICKGELU_SUFFIX)], clean))
        if base is not None and base.quick_gelu:
            return base
    return None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Lowercase hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> pathlib.Path:
    """``$CLIPCURATE_CACHE`` if set, else ``~/.cache/clipcurate``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/clipcurate").expanduser()


def cache_path_for(uri: str, cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Where :func:`fetch` keeps the download of ``uri``.

    The name is ``<first 16 hex of sha256(uri)>-<sanitised basename>``: readable, yet two URLs
    with the same basename (every Hugging Face repo's ``open_clip_model.safetensors``) never
    share a cache file.
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    basename = pathlib.PurePosixPath(urllib.parse.urlsplit(uri).path).name
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", basename).lstrip(".") or "download"
    url_hash = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    return root / f"{url_hash}-{basename}"


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.match(value):
        raise ValueError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    return value


def _verify_file(path: pathlib.Path, uri: str, expected: str | None) -> None:
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumError(uri, expected, actual)


def _resolve_package(uri: str) -> pathlib.Path | Traversable:
    parts = uri[len("package://") :].split("/", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(f"package URI must look like package://<package>/<path>, got {uri!r}")
    package, resource = parts
    segments = resource.split("/")
    if any(seg in ("", ".", "..") for seg in segments):
        raise ValueError(f"package URI path must be a plain relative path, got {uri!r}")
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        raise FileNotFoundError(f"{uri}: package {package!r} is not installed")
    # Packages on disk (regular, editable or namespace) are searched directly: this works
    # before the package is importable and gives a real path without copying.
    for location in spec.submodule_search_locations or ():
        candidate = pathlib.Path(location).joinpath(*segments)
        if candidate.is_file():
            return candidate
    if spec.origin is not None and spec.submodule_search_locations is None:
        raise ValueError(f"{uri}: {package!r} is a module, not a package")
    # Anything else (a zipped install) goes through importlib.resources.
    try:
        node = importlib.resources.files(package)
        for seg in segments:
            node = node.joinpath(seg)
        if node.is_file():
            return node
    except (OSError, TypeError):
        pass
    raise FileNotFoundError(f"{uri}: no such file inside package {package!r}")


def fetch(
    uri: str,
    sha256: str | None = None,
    cache_dir: str | None = None,
    s3_endpoint_url: str | None = None,
    timeout: float = 60.0,
) -> pathlib.Path:
    """Return a local path holding the file at ``uri``, verified against ``sha256`` when given.

    uri: a local path or ``file://`` URI (returned as is, never copied), ``package://<pkg>/<path>``
        (a file shipped inside an installed package), or ``http(s)://`` / ``s3://bucket/key``
        (downloaded once into ``cache_dir``).
    sha256: expected lowercase hex digest. When None, nothing is verified and downloads log a
        warning that the file is unpinned.
    cache_dir: download directory; default ``$CLIPCURATE_CACHE`` or ``~/.cache/clipcurate``.
    s3_endpoint_url: S3 endpoint; default ``$AWS_ENDPOINT_URL_S3``, then ``$AWS_ENDPOINT_URL``,
        then AWS.
    timeout: seconds allowed for each network operation (connect, each read), not a total.

    A download streams into a temporary file in the cache directory while hashing, is verified,
    and only then renamed to its final name, so an interrupted or corrupt download never appears
    under the final name. A cached file is reused without any network request (re-verified
    when ``sha256`` is given; a cached file that fails verification is discarded and fetched
    again).

    Raises ChecksumError on a hash mismatch (the downloaded file is deleted; a local file given
    by path is left alone), FileNotFoundError for a missing local/package file, DownloadError
    naming the URI for HTTP errors, missing S3 objects and truncated bodies.
    """
    expected = _normalise_sha256(sha256)
    scheme = urllib.parse.urlsplit(uri).scheme.lower()

    if scheme in ("http", "https", "s3"):
        return _fetch_remote(uri, scheme, expected, cache_dir, s3_endpoint_url, timeout)

    if scheme == "package":
        node = _resolve_package(uri)
        if isinstance(node, pathlib.Path):
            _verify_file(node, uri, expected)
            return node
        # Zipped installs have no real path: materialise a verified copy in the cache.
        src = node.open("rb")
        source = _Source(_read_chunks(src.read, uri, (OSError,)), None, src.close)
        return _store_stream(uri, source, expected, cache_path_for(uri, cache_dir))

    if scheme == "file":
        parsed = urllib.parse.urlsplit(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host is not supported: {uri!r}")
        path = pathlib.Path(urllib.request.url2pathname(parsed.path))
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, i.e. a plain path
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {uri!r} "
            "(expected a path, file://, package://, http(s):// or s3://)"
        )
    else:
        path = pathlib.Path(uri).expanduser()

    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {uri}")
    _verify_file(path, uri, expected)
    return path


def _fetch_remote(
    uri: str,
    scheme: str,
    expected: str | None,
    cache_dir: str | None,
    s3_endpoint_url: str | None,
    timeout: float,
) -> pathlib.Path:
    target = cache_path_for(uri, cache_dir)
    if target.is_file():
        try:
            _verify_file(target, uri, expected)
            return target
        except ChecksumError as exc:
            logger.warning("discarding cached %s: %s; downloading again", target, exc)
            target.unlink(missing_ok=True)

    if expected is None:
        logger.warning(
            "downloading %s without a pinned sha256: the file's integrity is not verified", uri
        )
    if scheme == "s3":
        source = _open_s3(uri, s3_endpoint_url, timeout)
    else:
        source = _open_http(uri, timeout)
    return _store_stream(uri, source, expected, target)


@dataclass
class _Source:
    """An open byte stream: chunks to write, the announced length if any, and its closer."""

    chunks: Iterator[bytes]
    length: int | None
    close: Callable[[], None]


def _read_chunks(
    read: Callable[[int], bytes], uri: str, errors: tuple[type[BaseException], ...]
) -> Iterator[bytes]:
    try:
        yield from iter(lambda: read(CHUNK_SIZE), b"")
    except errors as exc:
        raise DownloadError(f"connection lost while fetching {uri}: {exc}") from exc


def _store_stream(
    uri: str, source: _Source, expected: str | None, target: pathlib.Path
) -> pathlib.Path:
    """Write ``source`` to ``target`` atomically, hashing on the way; verify before renaming.

    Whatever happens, the source is closed and no temporary file is left behind.
    """
    tmp: pathlib.Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
        tmp = pathlib.Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in source.chunks:
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        if source.length is not None and size != source.length:
            raise DownloadError(
                f"truncated download of {uri}: got {size} bytes, expected {source.length}"
            )
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise ChecksumError(uri, expected, actual)
        os.replace(tmp, target)
        tmp = None
        logger.info("fetched %s -> %s (%d bytes, sha256 %s)", uri, target, size, actual)
    finally:
        source.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return target


def _open_http(uri: str, timeout: float) -> _Source:
    request = urllib.request.Request(uri, headers={"User-Agent": _USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadError(f"HTTP {exc.code} {exc.reason} fetching {uri}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"could not fetch {uri}: {reason}") from exc
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    # IncompleteRead and friends are HTTPException, not OSError.
    errors = (OSError, http.client.HTTPException)
    return _Source(_read_chunks(response.read, uri, errors), length, response.close)


def _s3_endpoint(explicit: str | None) -> str | None:
    return (
        explicit
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def _open_s3(uri: str, endpoint_url: str | None, timeout: float) -> _Source:
    parsed = urllib.parse.urlsplit(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise ValueError(f"s3 URI must look like s3://bucket/key, got {uri!r}")

    import boto3  # lazy: only s3:// needs it
    import botocore.config
    import botocore.exceptions

    client = boto3.client(
        "s3",
        endpoint_url=_s3_endpoint(endpoint_url),
        config=botocore.config.Config(
            connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 3}
        ),
    )
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        err = exc.response.get("Error", {})
        raise DownloadError(
            f"S3 error {err.get('Code', '?')} fetching {uri}: {err.get('Message', exc)}"
        ) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise DownloadError(f"could not fetch {uri}: {exc}") from exc
    body = response["Body"]
    chunks = _read_chunks(body.read, uri, (botocore.exceptions.BotoCoreError, OSError))
    return _Source(chunks, response.get("ContentLength"), body.close)
