"""Typed, frozen configuration: one dataclass per stage, validated once at start-up.

Field names follow img2dataset's flags where a user of img2dataset would look for them
(``url_col``, ``caption_col``, ``image_size``, ``resize_mode``, ``number_sample_per_shard``,
``timeout``, ``retries``, ...). Every validation message names the bad field as
``<section>.<field>`` so a YAML or CLI mistake is found before any work starts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields

USER_AGENT_TOKEN = "clipcurate"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, section: str, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{section}.{name}: {message}")


@dataclass(frozen=True)
class ReadConfig:
    """Where the URL lists are and which columns hold what."""

    url_list: str = ""
    input_format: str = "parquet"  # parquet | csv | tsv | jsonl (txt: one url per line)
    url_col: str = "url"
    caption_col: str | None = "caption"
    save_additional_columns: tuple[str, ...] = ()

    def validate(self, section: str = "read") -> None:
        _check(bool(self.url_list), section, "url_list", "is required (a path, glob or s3:// URI)")
        _check(
            self.input_format in ("parquet", "csv", "tsv", "jsonl", "txt"),
            section,
            "input_format",
            f"must be parquet, csv, tsv, jsonl or txt, got {self.input_format!r}",
        )
        _check(bool(self.url_col), section, "url_col", "must name a column")


@dataclass(frozen=True)
class DownloadConfig:
    """HTTP fetching. Times in seconds, sizes in bytes."""

    timeout: float = 10.0  # total deadline per request (connect + headers + body)
    retries: int = 2  # extra attempts for transient failures only (connection, 429, 5xx)
    max_bytes: int = 32 * 1024 * 1024  # byte cap, checked while streaming
    thread_count: int = 32  # threads per batch task
    per_host_concurrency: int = 8  # simultaneous requests to one host, per task
    max_redirects: int = 5
    backoff_base: float = 0.5  # first retry waits ~backoff_base s (jittered, doubling)
    max_retry_after: float = 30.0  # cap on an honoured Retry-After
    user_agent_token: str = USER_AGENT_TOKEN
    respect_optout: bool = True
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # CIDR networks that are allowed even though the guard refuses them by default
    # (tests and the demo allow 127.0.0.1/32). Public addresses are always allowed.
    allowed_networks: tuple[str, ...] = ()

    def validate(self, section: str = "download") -> None:
        _check(self.timeout > 0, section, "timeout", f"must be > 0 seconds, got {self.timeout}")
        _check(self.retries >= 0, section, "retries", f"must be >= 0, got {self.retries}")
        _check(self.max_bytes > 0, section, "max_bytes", f"must be > 0, got {self.max_bytes}")
        _check(self.thread_count >= 1, section, "thread_count", "must be >= 1")
        _check(self.per_host_concurrency >= 1, section, "per_host_concurrency", "must be >= 1")
        _check(self.max_redirects >= 0, section, "max_redirects", "must be >= 0")
        _check(self.backoff_base >= 0, section, "backoff_base", "must be >= 0")
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ConfigError(f"{section}.allowed_networks: {net!r} is not a CIDR ({e})") from e


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding, resizing and re-encoding, with img2dataset's meanings."""

    image_size: int = 256
    resize_mode: str = "border"  # no | border | center_crop | keep_ratio
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"  # jpg | png | webp
    encode_quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: float = float("inf")
    max_image_pixels: int = 64_000_000  # checked from the header, before decoding
    allowed_formats: tuple[str, ...] = ("jpeg", "png", "webp", "gif", "bmp", "tiff")

    def validate(self, section: str = "decode") -> None:
        _check(self.image_size > 0, section, "image_size", f"must be > 0, got {self.image_size}")
        _check(
            self.resize_mode in ("no", "border", "center_crop", "keep_ratio"),
            section,
            "resize_mode",
            f"must be no, border, center_crop or keep_ratio, got {self.resize_mode!r}",
        )
        _check(
            self.encode_format in ("jpg", "png", "webp"),
            section,
            "encode_format",
            f"must be jpg, png or webp, got {self.encode_format!r}",
        )
        _check(1 <= self.encode_quality <= 100, section, "encode_quality", "must be in 1..100")
        _check(self.min_image_size >= 0, section, "min_image_size", "must be >= 0")
        _check(self.max_aspect_ratio >= 1, section, "max_aspect_ratio", "must be >= 1")
        _check(self.max_image_pixels > 0, section, "max_image_pixels", "must be > 0")


@dataclass(frozen=True)
class ShardConfig:
    """WebDataset shards in img2dataset's layout."""

    output_folder: str = ""
    number_sample_per_shard: int = 1000

    def validate(self, section: str = "shard") -> None:
        _check(bool(self.output_folder), section, "output_folder", "is required")
        _check(self.number_sample_per_shard >= 1, section, "number_sample_per_shard", "must be >= 1")


@dataclass(frozen=True)
class StorageConfig:
    """Object-store access. Unset values fall back to the standard AWS variables."""

    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_retries: int = 10

    def validate(self, section: str = "storage") -> None:
        _check(self.s3_retries >= 0, section, "s3_retries", "must be >= 0")


@dataclass(frozen=True)
class DownloadJobConfig:
    """The download half on its own (``clipcurate download``)."""

    read: ReadConfig = field(default_factory=ReadConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
