"""Typed, frozen configuration: one dataclass per stage, validated once at start-up.

Field names follow img2dataset's flags where a user of img2dataset would look for them
(``url_col``, ``caption_col``, ``image_size``, ``resize_mode``, ``number_sample_per_shard``,
``timeout``, ``retries``, ...). Every validation message names the bad field as
``<section>.<field>`` so a YAML or CLI mistake is found before any work starts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields

USER_AGENT_TOKEN = "clipcurate"
_TOKEN = re.compile(r"[a-z0-9_.*-]+")


# A job-level setting whose value comes from the model in use (its registry entry / card,
# pipeline/model_defaults.py) unless the user sets one; resolved before validation.
AUTO = "auto"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, section: str, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{section}.{name}: {message}")


INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt", "img2dataset")


@dataclass(frozen=True)
class ReadConfig:
    """Where the URL lists are and which columns hold what."""

    url_list: str = ""
    # parquet | csv | tsv | jsonl (txt: one url per line) | img2dataset: the shards of an
    # img2dataset (or clipcurate) output, its images read from the tars instead of downloaded
    input_format: str = "parquet"
    url_col: str = "url"
    caption_col: str | None = "caption"
    save_additional_columns: tuple[str, ...] = ()

    def validate(self, section: str = "read") -> None:
        _check(bool(self.url_list), section, "url_list", "is required (a path, glob or s3:// URI)")
        _check(
            self.input_format in INPUT_FORMATS,
            section,
            "input_format",
            f"must be {', '.join(INPUT_FORMATS[:-1])} or {INPUT_FORMATS[-1]}, got {self.input_format!r}",
        )
        _check(bool(self.url_col), section, "url_col", "must name a column")

    @property
    def passthrough(self) -> tuple[str, ...]:
        """Input columns every shard and output row keeps: ``save_additional_columns``, and
        ``source_key`` (the row's key in the img2dataset output it came from) for that format."""
        from pipeline import schema as S

        if self.input_format == "img2dataset" and S.SOURCE_KEY not in self.save_additional_columns:
            return (*self.save_additional_columns, S.SOURCE_KEY)
        return self.save_additional_columns


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
    # X-Robots-Tag directives addressed to any of these tokens (and to user_agent_token) are
    # honoured: site owners opted out of img2dataset by its name, and we do its job.
    optout_tokens: tuple[str, ...] = (USER_AGENT_TOKEN, "img2dataset")
    respect_optout: bool = True
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    # CIDR networks that are allowed even though the guard refuses them by default
    # (tests and the demo allow 127.0.0.1/32). Public addresses are always allowed.
    allowed_networks: tuple[str, ...] = ()
    # PEM file of CA certificates to trust for https instead of the system store (a private
    # mirror's CA; the tests' own CA). None: the system store.
    ca_certs: str | None = None

    def validate(self, section: str = "download") -> None:
        _check(self.timeout > 0, section, "timeout", f"must be > 0 seconds, got {self.timeout}")
        _check(self.max_retry_after >= 0, section, "max_retry_after", "must be >= 0")
        token = self.user_agent_token
        _check(
            token.isascii() and token.replace("-", "").replace("_", "").replace(".", "").isalnum(),
            section,
            "user_agent_token",
            f"must be letters, digits, '-', '_' or '.' (X-Robots-Tag addresses it), got {token!r}",
        )
        for t in self.optout_tokens:
            _check(bool(_TOKEN.fullmatch(t.strip().lower())), section, "optout_tokens",
                   f"{t!r} is not a user-agent token (letters, digits, '-', '_', '.')")
        _check(self.ca_certs is None or bool(self.ca_certs), section, "ca_certs", "must be a path")
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
    max_frames: int = 1000  # animations with more frames are refused (only frame 1 is kept)
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
        _check(self.max_frames >= 1, section, "max_frames", "must be >= 1")


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
class BlocklistConfig:
    """Lists of URLs, domains and image hashes never stored (pipeline/blocklist/).

    Each of ``urls`` .. ``pdq`` is a tuple of lists: a path or ``s3://`` URI of a text file
    (one entry a line) or a Parquet file, optionally named ``name=uri`` (a blocked row's error
    names the list; default: the file's stem). ``outputs``: earlier job outputs whose own
    blocklists (their takedowns) apply too; a job always applies its own output's and
    ``dedup.against``'s. ``pdq_threshold``: Hamming distance (bits of 256) at or below which a
    PDQ entry matches; ``pdq_dihedral``: also match rotated and mirrored images.
    """

    urls: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    md5: tuple[str, ...] = ()
    sha1: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()
    pdq: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    pdq_threshold: int = 31
    pdq_dihedral: bool = False

    def validate(self, section: str = "blocklist") -> None:
        _check(0 <= self.pdq_threshold <= 63, section, "pdq_threshold",
               f"must be a Hamming distance in 0..63 bits, got {self.pdq_threshold}")
        for name in ("urls", "domains", "md5", "sha1", "sha256", "pdq", "outputs"):
            for entry in getattr(self, name):
                _check(bool(entry.strip()), section, name, "has an empty entry")


@dataclass(frozen=True)
class DownloadJobConfig:
    """The download half on its own (``clipcurate download``), and how it runs."""

    read: ReadConfig = field(default_factory=ReadConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)
    execution: ExecutionConfig = field(default_factory=lambda: ExecutionConfig())

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate(f.name)


# DedupConfig's pixel check bounds (0-255 levels), see pipeline/pixel_check.py.
PIXEL_BOUNDS = ("pixel_mean_max", "pixel_blob_max", "pixel_channel_mean_max", "pixel_channel_blob_max")


@dataclass(frozen=True)
class DedupConfig:
    """Global dedup after the stream (pipeline/dedup/). Similarities are cosines in [-1, 1]."""

    threshold: float | str = 0.95  # rows whose image embeddings have cosine >= this are duplicates
    n_clusters: int | None = None  # k-means clusters; None: 1 up to 10,000 rows, else ~sqrt(N)
    sample_size: int = 100_000  # rows k-means is fitted on
    seed: int = 0  # sample and initial centroids
    # A row also joins its second-nearest cluster when that centroid's cosine is within this
    # margin of the nearest one's; near duplicates split by a cluster boundary are found only
    # this way. 0 turns it off.
    second_cluster_margin: float = 0.05
    kmeans_iterations: int = 10
    against: str | None = None  # an earlier run's output (folder or s3:// URI) to dedup against
    # Confirm each embedding pair by its aligned thumbnails (pipeline/pixel_check.py): then
    # `threshold` only picks candidates and a pair is a duplicate when the thumbnails' mean and
    # blob differences (0-255 pixel units) are within these bounds, both averaged over the
    # colour channels and in the channel that differs most.
    pixel_check: bool | str = False
    pixel_mean_max: float | str = 4.5
    pixel_blob_max: float | str = 23.0
    pixel_channel_mean_max: float | str = 7.0
    pixel_channel_blob_max: float | str = 34.0

    def validate(self, section: str = "dedup") -> None:
        for name in ("threshold", "pixel_check", *PIXEL_BOUNDS):
            v = getattr(self, name)
            _check(not isinstance(v, str), section, name,
                   f"must be a value, or {AUTO!r} in a job config (the model's setting), got {v!r}")
        _check(0 < self.threshold <= 1, section, "threshold", f"must be in (0, 1], got {self.threshold}")  # type: ignore[operator]
        _check(
            self.n_clusters is None or self.n_clusters >= 1,
            section,
            "n_clusters",
            f"must be >= 1 or unset, got {self.n_clusters}",
        )
        _check(self.sample_size >= 1, section, "sample_size", f"must be >= 1, got {self.sample_size}")
        _check(
            0 <= self.second_cluster_margin <= 2,
            section,
            "second_cluster_margin",
            f"must be in [0, 2], got {self.second_cluster_margin}",
        )
        _check(self.kmeans_iterations >= 1, section, "kmeans_iterations", "must be >= 1")
        for name in PIXEL_BOUNDS:
            v = getattr(self, name)
            _check(0 <= v <= 255, section, name, f"must be in [0, 255] (pixel units), got {v}")
        _check(
            self.against is None or bool(self.against),
            section,
            "against",
            "must be a folder or s3:// URI, or unset",
        )


# ----------------------------------------------------------------------------------------------
# Embed half: embed, moderate, write. See pipeline/stages/embed.py, moderate.py, write.py.

_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EmbedConfig:
    """CLIP embedding: one model per actor, one GPU per actor where GPUs exist.

    precision: "auto" autocasts to fp16 on GPU, to bf16 on a CPU with native bf16 (AVX512-BF16
    or AMX) and runs fp32 on other CPUs; "fp32" never autocasts;
    "fp16"/"bf16" autocast to that dtype (weights stay fp32). Each embedding worker receives one
    shard per call; inference_batch is the images (or captions) per forward pass inside it.
    concurrency is the worker pool's (min, max), None: sized from the machine or cluster (one
    worker per GPU; on CPUs one locally, 1 to half the CPUs on Ray). num_gpus / num_cpus are
    per worker; num_gpus None: one GPU each where there are GPUs, else the CPU.
    stored_decode: where a committed shard's stored JPEGs are decoded when a run re-embeds it
    (the reread path): "cpu" in the CPU workers, "device" by the embedding worker on its own
    device (TorchCodec's ``decode_jpeg``: nvJPEG on a GPU; needs TorchCodec, the ``gpu-decode``
    extra, or torchvision). Fresh rows are decoded once, on the CPU, either way.
    """

    model: str = "tiny-synthetic"
    pretrained: str | None = "synthetic"
    # A folder (path, URL or s3://) holding a text tower to use instead of the model's own:
    # a sentence-transformers M-CLIP text encoder beside an image tower, or the config and
    # tokenizer of an HF-text architecture when they are not beside the weights.
    text_model: str | None = None
    precision: str = "auto"
    inference_batch: int = 64
    concurrency: tuple[int, int] | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    # Adds an ``embed_worker`` column ("<host>:<pid>" of the actor) for debugging placement.
    debug_worker_column: bool = False
    stored_decode: str = "cpu"

    def validate(self, section: str = "embed") -> None:
        _check(bool(self.model), section, "model", "must name an architecture or weights file")
        # "synthetic" is the default pretrained only because tiny-synthetic is the default model;
        # a user who names another model and not its weights must not get a baffling load error.
        # The registry says which models have bundled synthetic-world weights.
        from clip_model.pretrained import get_pretrained_entry

        _check(self.pretrained != "synthetic" or get_pretrained_entry(self.model, "synthetic") is not None,
               section, "pretrained",
               f"'synthetic' names the bundled synthetic-world weights of tiny-synthetic and "
               f"multilingual-synthetic only; give {self.model}'s weights (a tag such as openai, a "
               "path, URL or s3:// URI) or none for random weights")
        _check(
            self.precision in _PRECISIONS,
            section,
            "precision",
            f"must be one of {', '.join(_PRECISIONS)}, got {self.precision!r}",
        )
        _check(self.inference_batch >= 1, section, "inference_batch", "must be >= 1")
        if self.concurrency is not None:
            lo, hi = self.concurrency
            _check(1 <= lo <= hi, section, "concurrency",
                   f"must be (min, max) with 1 <= min <= max, or unset; got {self.concurrency}")
        _check(self.num_gpus is None or self.num_gpus >= 0, section, "num_gpus", "must be >= 0 or unset")
        _check(self.num_cpus >= 0, section, "num_cpus", "must be >= 0")
        _check(self.stored_decode in ("cpu", "device"), section, "stored_decode",
               f"must be cpu or device, got {self.stored_decode!r}")
        if self.stored_decode == "device":
            from clip_model.device_decode import available

            _check(available() is not None, section, "stored_decode",
                   "'device' decodes with TorchCodec (or torchvision), and neither is installed "
                   "here: pip install 'clipcurate[gpu-decode]', or use 'cpu'")

    def with_gpus(self, available: int) -> EmbedConfig:
        """``num_gpus`` resolved: unset becomes 1 when ``available`` GPUs > 0, else 0."""
        from dataclasses import replace

        if self.num_gpus is not None:
            return self
        return replace(self, num_gpus=1.0 if available > 0 else 0.0)


# Concept prompts for a model whose card has none; their margins are not calibrated.
GENERIC_CONCEPTS: dict[str, tuple[str, ...]] = {
    "nudity": ("a nude photo", "a photo of naked people", "sexually explicit content"),
    "violence": ("a violent scene with blood", "a gory photo", "a photo of a weapon attack"),
}
GENERIC_NEUTRAL: tuple[str, ...] = ("a photo", "an image", "a picture of something")
# Published thresholds for unsafe-classifier heads (p_unsafe of a CLIP-embedding NSFW head such
# as LAION's), by name: moderate.head_preset sets head_threshold.
HEAD_PRESETS: dict[str, tuple[float, str]] = {
    "re-laion-research-safe": (0.45, "Re-LAION-5B research-safe: rows with p_unsafe > 0.45 removed"),
}


@dataclass(frozen=True)
class ModerateConfig:
    """Unsafe-content scores from CLIP embeddings (see pipeline/stages/moderate.py).

    concepts: concept name -> prompts (their embeddings are averaged into one direction). In
    a job, unset (null) means the model's calibrated concepts and thresholds when its card has
    them, else :data:`GENERIC_CONCEPTS` (scored, not calibrated).
    neutral_prompts: what a concept must beat (unset: the model's, else generic); a side's margin for a concept is
    cos(e, concept) - max over neutral prompts of cos(e, neutral).
    image_thresholds / caption_thresholds: per-concept margin thresholds; a concept missing
    from a mapping uses default_threshold; None there disables that side for the concept.
    thresholds_file: YAML written by ``clipcurate calibrate``; its values replace the above.
    head_path: optional safetensors classifier over image embeddings (linear or MLP, sigmoid
    output, e.g. LAION's CLIP-based NSFW detector); a row is flagged by it when its probability
    exceeds head_threshold (or the published threshold named by head_preset).
    """

    enabled: bool = True
    concepts: dict[str, tuple[str, ...]] | None = field(default_factory=lambda: dict(GENERIC_CONCEPTS))
    neutral_prompts: tuple[str, ...] | None = GENERIC_NEUTRAL
    image_thresholds: dict[str, float | None] = field(default_factory=dict)
    caption_thresholds: dict[str, float | None] = field(default_factory=dict)
    default_threshold: float | None = 0.0
    thresholds_file: str | None = None
    head_path: str | None = None
    head_threshold: float = 0.5
    head_concept: str = "head"
    # A published threshold for the head (HEAD_PRESETS), e.g. re-laion-research-safe (0.45).
    head_preset: str | None = None

    def validate(self, section: str = "moderate") -> None:
        if not self.enabled:
            return
        _check(self.concepts is not None, section, "concepts",
               "is unset (null means: the model's concepts, resolved in a job config)")
        _check(self.neutral_prompts is not None, section, "neutral_prompts",
               "is unset (null means: the model's prompts, resolved in a job config)")
        assert self.concepts is not None and self.neutral_prompts is not None
        _check(bool(self.concepts) or bool(self.head_path) or bool(self.thresholds_file),
               section, "concepts", "needs at least one concept (or a head / thresholds file)")
        for name, prompts in self.concepts.items():
            _check(bool(name), section, "concepts", "concept names must be non-empty")
            _check(bool(prompts) and all(isinstance(p, str) and p for p in prompts), section,
                   "concepts", f"concept {name!r} needs at least one non-empty prompt")
        _check(bool(self.neutral_prompts), section, "neutral_prompts", "needs at least one prompt")
        for side, mapping in (("image_thresholds", self.image_thresholds),
                              ("caption_thresholds", self.caption_thresholds)):
            unknown = set(mapping) - set(self.concepts)
            _check(not unknown, section, side, f"names unknown concepts {sorted(unknown)}")
        _check(0.0 <= self.head_threshold <= 1.0, section, "head_threshold", "must be in [0, 1]")
        _check(self.head_preset is None or self.head_preset in HEAD_PRESETS, section, "head_preset",
               f"must be one of {', '.join(HEAD_PRESETS)}, got {self.head_preset!r}")
        _check(self.head_preset is None or bool(self.head_path), section, "head_preset",
               "needs moderate.head_path (the head whose p_unsafe the preset thresholds)")


@dataclass(frozen=True)
class WriteConfig:
    """Parquet output: one file per input shard (``<shard>.parquet``), zstd, sized row groups."""

    output_folder: str = ""
    # ~16k rows is 30-60 MB per row group with 512-768-d float16 embeddings: large enough for
    # efficient scans, small enough that a reader can fetch one group at a time.
    row_group_rows: int = 16384
    compression: str = "zstd"
    compression_level: int | None = None

    def validate(self, section: str = "write") -> None:
        _check(bool(self.output_folder), section, "output_folder", "is required")
        _check(self.row_group_rows >= 1, section, "row_group_rows", "must be >= 1")
        _check(self.compression in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"), section,
               "compression", f"unsupported codec {self.compression!r}")


# ----------------------------------------------------------------------------------------------
# The whole job: jobs/embed_laion.py. YAML / flags / --set loading is in
# pipeline/job_config.py; the final keep/drop decisions in pipeline/decisions.py.


@dataclass(frozen=True)
class FilterConfig:
    """The filters that decide ``keep`` / ``drop_reason`` after the stream.

    clip_score_threshold: an ``ok`` row whose clip_score (cosine of image and caption
    embeddings, in [-1, 1]) is below it is dropped; None turns the filter off. The right value
    depends on the model (LAION-5B used 0.28 with OpenAI's ViT-B-32): in a job it defaults to
    ``auto``, the model's calibrated value, or off for a model without one.
    unsafe: drop rows the moderate stage flagged (``unsafe_score > 0``); off keeps the scores.
    In a job ``auto``: on when the moderation thresholds are calibrated for the model (its card,
    a thresholds file, explicit thresholds or a head), off otherwise.
    duplicates: run the global dedup and drop what it finds (off: no dedup at all).
    """

    clip_score_threshold: float | str | None = None
    unsafe: bool | str = True
    duplicates: bool = True

    def validate(self, section: str = "filter") -> None:
        t = self.clip_score_threshold
        _check(not isinstance(t, str) and (t is None or -1.0 <= t <= 1.0), section, "clip_score_threshold",
               f"must be a cosine in [-1, 1], null (off), or {AUTO!r} in a job config (the model's), got {t!r}")
        _check(isinstance(self.unsafe, bool), section, "unsafe",
               f"must be true, false, or {AUTO!r} in a job config (on when moderation is calibrated), got {self.unsafe!r}")


SCHEDULERS = ("auto", "local", "ray")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the job runs; nothing here changes what it writes.

    scheduler: ``local`` runs the stage graph in local worker processes (one machine, no Ray:
    the cheapest on one box); ``ray`` runs it on Ray Data (a cluster, or a local Ray);
    ``auto`` (default) picks ``ray`` when a Ray address is given (``ray_address`` or
    ``$RAY_ADDRESS``, which ``ray job submit`` sets) and ``local`` otherwise.
    """

    scheduler: str = "auto"
    ray_address: str | None = None  # None: $RAY_ADDRESS (set under `ray job submit`) or local Ray
    processes: int | None = None  # local: CPU worker processes (None: the CPUs model workers on CPUs leave)
    prefetch: int = 1  # local: shards a CPU worker downloads ahead of the one it decodes
    # local: CPU workers run at the lowest priority (nice 19) on the CPUs that model workers on
    # CPUs reserve, so they decode only when the model leaves those CPUs idle (None: one per
    # such CPU when `processes` is unset, else none; 0: none).
    idle_workers: int | None = None
    # Tries per shard when the process running it dies (local: a worker process; Ray: a task
    # or actor); a shard that kills its worker this many times fails the run, naming it.
    attempts: int = 3
    # CPUs one download+decode+shard task reserves on Ray. Below 1 lets a core decode one shard
    # while another shard downloads (the download mostly waits on the network).
    task_cpus: float = 0.5
    # Decode each image in a crash-guard child process: a row that crashes the decoder becomes
    # worker_crash instead of killing the worker (and, after bounded retries, the job). Costs
    # ~7-11 % of decode throughput and ~63 MB per decode worker (bench/decode_isolation.py).
    decode_isolation: bool = True
    # Ray Data's own progress: where stdout is not a terminal (the log `ray job submit`
    # streams) a report every this many seconds of each operator's rows, tasks, actors and what
    # holds it back (the view that says which stage starves the GPU); in a terminal, its
    # progress bars. 0: off. The job's per-shard lines come either way; the local scheduler
    # has only those.
    progress_interval_s: int = 30

    def validate(self, section: str = "execution") -> None:
        _check(self.scheduler in SCHEDULERS, section, "scheduler",
               f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        _check(self.ray_address is None or bool(self.ray_address), section, "ray_address",
               "must be an address or unset")
        _check(not (self.scheduler == "local" and self.ray_address), section, "ray_address",
               "is only used with scheduler ray (or auto)")
        _check(self.processes is None or self.processes >= 1, section, "processes",
               f"must be >= 1 or unset, got {self.processes}")
        _check(self.prefetch >= 0, section, "prefetch", f"must be >= 0, got {self.prefetch}")
        _check(self.idle_workers is None or self.idle_workers >= 0, section, "idle_workers",
               f"must be >= 0 or unset, got {self.idle_workers}")
        _check(self.attempts >= 1, section, "attempts", f"must be >= 1, got {self.attempts}")
        _check(0 < self.task_cpus <= 64, section, "task_cpus", f"must be in (0, 64], got {self.task_cpus}")
        _check(self.progress_interval_s >= 0, section, "progress_interval_s",
               f"must be >= 0 (0: off), got {self.progress_interval_s}")

    def resolved_scheduler(self) -> str:
        """``local`` or ``ray``, with ``auto`` decided from the address (see the class)."""
        import os

        if self.scheduler != "auto":
            return self.scheduler
        return "ray" if (self.ray_address or os.environ.get("RAY_ADDRESS")) else "local"


SHARDS_DIR = "shards"
EMBEDDINGS_DIR = "embeddings"


# A job's filters, moderation and dedup settings default to the model's (pipeline/model_defaults.py).
def _model_moderate() -> ModerateConfig:
    return ModerateConfig(concepts=None, neutral_prompts=None)


def _model_dedup() -> DedupConfig:
    return DedupConfig(threshold=AUTO, pixel_check=AUTO, **dict.fromkeys(PIXEL_BOUNDS, AUTO))


def _model_filter() -> FilterConfig:
    return FilterConfig(clip_score_threshold=AUTO, unsafe=AUTO)


@dataclass(frozen=True)
class JobConfig:
    """The whole job: URL lists in ``input``, everything written under ``output``.

    ``output`` (a folder or ``s3://`` URI) receives ``shards/`` (img2dataset's layout),
    ``embeddings/`` (one Parquet file per shard), ``_stats.json``, ``report.html`` and
    ``config.yaml``. ``read.url_list``, ``shard.output_folder`` and ``write.output_folder``
    follow from ``input`` and ``output`` (:meth:`resolved`); setting them to anything else is
    an error, so one output never mixes two layouts.
    """

    input: str = ""
    output: str = ""
    read: ReadConfig = field(default_factory=ReadConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    moderate: ModerateConfig = field(default_factory=_model_moderate)
    write: WriteConfig = field(default_factory=WriteConfig)
    dedup: DedupConfig = field(default_factory=_model_dedup)
    filter: FilterConfig = field(default_factory=_model_filter)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    blocklist: BlocklistConfig = field(default_factory=BlocklistConfig)

    @property
    def output_root(self) -> str:
        """``output`` without a trailing slash."""
        return self.output.rstrip("/") or self.output

    def _derived(self) -> dict[str, tuple[str, str, str]]:
        root = self.output_root
        return {
            "read.url_list": (self.read.url_list, self.input, "input"),
            "shard.output_folder": (self.shard.output_folder, f"{root}/{SHARDS_DIR}", "output"),
            "write.output_folder": (self.write.output_folder, f"{root}/{EMBEDDINGS_DIR}", "output"),
        }

    def resolved(self) -> JobConfig:
        """A copy with the derived folders filled in (``input`` taken from ``read.url_list``
        when only that is set). Raises ``ConfigError`` when a derived field contradicts them."""
        from dataclasses import replace

        cfg = self
        if not cfg.input and cfg.read.url_list:
            cfg = replace(cfg, input=cfg.read.url_list)
        if cfg.input and cfg.output:
            for name, (have, want, source) in cfg._derived().items():
                _check(not have or have.rstrip("/") == want.rstrip("/"), *name.split("."),
                       f"follows from {source} ({want!r}); got {have!r}")
            cfg = replace(
                cfg,
                read=replace(cfg.read, url_list=cfg.input),
                shard=replace(cfg.shard, output_folder=f"{cfg.output_root}/{SHARDS_DIR}"),
                write=replace(cfg.write, output_folder=f"{cfg.output_root}/{EMBEDDINGS_DIR}"),
            )
        return cfg

    def validate(self) -> None:
        """Check every section; the first problem raises ``ConfigError`` naming the field."""
        if not self.input and not self.read.url_list:
            raise ConfigError("input: is required (a path, glob or s3:// URI of URL lists)")
        if not self.output:
            raise ConfigError("output: is required (a folder or s3:// URI)")
        from pipeline.model_defaults import apply_model_defaults

        cfg = apply_model_defaults(self.resolved())
        for f in fields(cfg):
            section = getattr(cfg, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)

    def download_job(self) -> DownloadJobConfig:
        """The download half of this job (resolved)."""
        from dataclasses import replace

        cfg = self.resolved()
        # The stages see one list of outputs whose takedowns apply: the named ones and ours.
        own = tuple(dict.fromkeys((*cfg.blocklist.outputs, *cfg.blocklist_outputs())))
        blocklist = replace(cfg.blocklist, outputs=own)
        return DownloadJobConfig(cfg.read, cfg.download, cfg.decode, cfg.shard, cfg.storage, blocklist, cfg.execution)

    def blocklist_outputs(self) -> tuple[str, ...]:
        """Outputs whose own blocklists (takedowns) this job applies besides
        ``blocklist.outputs``: its own output and ``dedup.against``."""
        out = [self.output_root]
        if self.dedup.against:
            out.append(self.dedup.against.rstrip("/"))
        return tuple(out)
