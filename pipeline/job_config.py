"""Load a :class:`~pipeline.config.JobConfig` from YAML, command-line flags and ``--set``.

Precedence, lowest first: the dataclass defaults, ``--config job.yaml``, the named flags
(``--model``, ``--image-size``, ...), then every ``--set section.field=value`` in order.

Values are typed by the dataclass field they land in (``typing.get_type_hints``): ints,
floats (``inf`` works), bools (``true/false/yes/no/on/off/1/0``), ``X | None`` (``null``,
``none`` or an empty value unset it), tuples (a YAML list or ``a,b,c``; a fixed-size tuple
such as ``embed.concurrency`` also takes one value for all slots: ``2`` means ``(2, 2)``)
and dicts (a YAML mapping, e.g. ``--set 'moderate.concepts={hazard: [a hazard sign]}'``).
A value that does not fit, an unknown section or an unknown field raises
:class:`~pipeline.config.ConfigError` naming it, before any work starts.

Top-level fields (``input``, ``output``) are set as ``--set output=s3://...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, JobConfig

log = logging.getLogger("clipcurate.config")

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}
_NONE = {"", "none", "null", "~"}
_YAML_SPECIAL_FLOATS = {".inf": "inf", "+.inf": "inf", "-.inf": "-inf", ".nan": "nan"}


# ------------------------------------------------------------------------------- coercion


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` (YAML-native, or a string from the command line) converted to type ``tp``;
    ``ConfigError`` naming ``name`` when it does not fit."""
    args = _union_args(tp)
    if args is not None:
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # "X | None": X's own message says what is wrong
            return coerce(value, real[0], name)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, name)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(tp), name)
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if isinstance(value, str):
            value = _yaml_value(value, name)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {coerce(k, key_t, f"{name}.<key>"): coerce(v, val_t, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            text = value.strip().lower()
            text = _YAML_SPECIAL_FLOATS.get(text, text)  # YAML spells infinity ".inf"
            try:
                return float(text)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML reads `pretrained: 2023` or `url_col: 1` as numbers; the user meant text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {_type_name(tp)}")


def _coerce_tuple(value: Any, args: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    variadic = len(args) == 2 and args[1] is Ellipsis
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _yaml_value(text, name)
        else:
            value = [x.strip() for x in text.split(",") if x.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    items = list(value)
    if variadic:
        return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(items))
    if len(items) == 1 and len(args) > 1 and len(set(args)) == 1:
        items = items * len(args)  # "2" for (min, max) means a fixed size of 2
    if len(items) != len(args):
        raise ConfigError(f"{name}: expected {len(args)} values, got {len(items)} ({value!r})")
    return tuple(coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(items, args, strict=True)))


def _yaml_value(text: str, name: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: {text!r} is not valid YAML ({e})") from e


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Fields earlier versions had, dropped with a warning when a config (an output's recorded
# config.yaml, or a user's file) still names them: field -> why it is gone.
RETIRED = {
    "embed.rows_per_call": "each embedding call now receives one whole shard",
    "embed.preprocess_num_cpus": "the decode task makes the model input (no preprocess stage)",
    "execution.download_concurrency": "downloads run inside each shard's task",
}


def _build(cls: type, doc: Mapping[str, Any], prefix: str, base: Any = None) -> Any:
    """``cls`` from a mapping of its fields over ``base`` (or the defaults); nested dataclass
    fields merge field by field, every other field is replaced."""
    types_ = _field_types(cls)
    retired = [k for k in doc if f"{prefix}.{k}" in RETIRED]
    if retired:
        doc = {k: v for k, v in doc.items() if k not in retired}
        for k in retired:
            log.warning("%s.%s is ignored: %s", prefix, k, RETIRED[f"{prefix}.{k}"])
    unknown = [k for k in doc if k not in types_]
    if unknown:
        where = f"{prefix}." if prefix else ""
        what = "section" if not prefix else "field"
        raise ConfigError(
            f"{where}{unknown[0]}: unknown {what} (known: {', '.join(types_)})"
        )
    current = base if base is not None else cls()
    changes: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue  # an empty section in YAML: keep what is there
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}: expected a mapping of {tp.__name__} fields, got {value!r}")
            changes[key] = _build(tp, value, name, getattr(current, key))
        else:
            changes[key] = coerce(value, tp, name)
    return dataclasses.replace(current, **changes)


# ----------------------------------------------------------------------------------- API


def from_dict(doc: Mapping[str, Any], base: Any = None, root: type = JobConfig) -> Any:
    """A ``root`` config (JobConfig, DownloadJobConfig) from a nested mapping (sections ->
    fields) over ``base`` or the defaults. Not validated (see :func:`validate`)."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(doc).__name__}")
    return _build(root if base is None else type(base), doc, "", base)


def from_yaml(path: str | Path, base: Any = None, root: type = JobConfig) -> Any:
    """A ``root`` config from a YAML file over ``base`` (or the defaults). Not validated."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e}") from e
    return from_yaml_text(text, base, root)


def from_yaml_text(text: str, base: Any = None, root: type = JobConfig) -> Any:
    """A ``root`` config from YAML text; an empty document gives ``base`` (or the defaults)."""
    doc = _yaml_value(text, "config")
    if doc is None:
        return base if base is not None else root()
    return from_dict(doc, base, root)


def set_value(cfg: Any, path: str, raw: Any) -> Any:
    """``cfg`` with the field at dotted ``path`` (``"embed.model"``, ``"output"``) set from
    ``raw`` (a command-line string or a YAML-native value), typed by the field."""
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{path}: expected section.field")
    chain: list[Any] = [cfg]
    for depth, part in enumerate(parts[:-1]):
        obj = chain[-1]
        known = _field_types(type(obj))
        name = ".".join(parts[: depth + 1])
        if part not in known:
            what = "section" if depth == 0 else "field"
            raise ConfigError(f"{name}: unknown {what} (known: {', '.join(known)})")
        if not dataclasses.is_dataclass(known[part]):
            raise ConfigError(f"{name}: is a value, not a section")
        chain.append(getattr(obj, part))
    leaf = chain[-1]
    known = _field_types(type(leaf))
    field_name = parts[-1]
    if field_name not in known:
        what = "field" if len(parts) > 1 else "section or field"
        raise ConfigError(f"{path}: unknown {what} (known: {', '.join(known)})")
    tp = known[field_name]
    if dataclasses.is_dataclass(tp):
        value = raw if not isinstance(raw, str) else _yaml_value(raw, path)
        new = _build(tp, value or {}, path, getattr(leaf, field_name))
    elif isinstance(raw, str) and not _is_text(tp):
        # Non-text fields read the value as YAML, so "[1, 2]", "{a: [b]}", "null" and ".inf"
        # all work; a plain "1,2" string is handled by the tuple coercion.
        parsed = _yaml_value(raw, path) if raw.strip() else raw
        new = coerce(parsed if not isinstance(parsed, str) else raw, tp, path)
    else:
        new = coerce(raw, tp, path)
    for obj, name in zip(reversed(chain), reversed(parts), strict=False):
        new = dataclasses.replace(obj, **{name: new})
    return new


def _is_text(tp: Any) -> bool:
    """str or ``str | None``: the raw text is the value (never YAML-parsed)."""
    args = _union_args(tp)
    if args is not None:
        return all(a in (str, type(None)) for a in args)
    return tp is str


def apply_set(cfg: Any, assignment: str) -> Any:
    """Apply one ``section.field=value`` override (see the module docstring for typing)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.field=value")
    return set_value(cfg, path, raw)


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that :func:`from_dict` reads back to ``cfg``."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def to_yaml(cfg: JobConfig) -> str:
    """YAML of every field, sections in declaration order; :func:`from_yaml` reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def validate(cfg: JobConfig) -> JobConfig:
    """Validate every section and return the resolved config (derived output folders filled
    in, model-owned settings taken from the model unless set: pipeline/model_defaults.py).
    Raises ``ConfigError`` naming the first bad field."""
    from pipeline.model_defaults import apply_model_defaults

    cfg = apply_model_defaults(cfg.resolved())
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------ flags

@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field.

    ``path``: the dotted field; ``repeatable``: may be given several times (values joined as a
    list); ``values``: flag value -> field value, for flags whose words differ from the field's
    (img2dataset's ``--distributor multiprocessing`` sets ``execution.scheduler: local``);
    ``const``: the value of the bare flag (``--resize_only_if_bigger`` with no value)."""

    path: str
    help: str = ""
    repeatable: bool = False
    values: Mapping[str, Any] | None = None
    const: Any = None


def _as_flag(spec: Flag | tuple[str, str]) -> Flag:
    return spec if isinstance(spec, Flag) else Flag(*spec)


def add_flags(parser: argparse.ArgumentParser | Any, flags: Mapping[str, Flag | tuple[str, str]]) -> None:
    """Add ``flags`` (flag -> :class:`Flag`) to an argparse parser or argument group; a flag
    that is not given leaves its field alone."""
    for name, spec in flags.items():
        f = _as_flag(spec)
        kwargs: dict[str, Any] = {
            "dest": f.path.replace(".", "__"),
            "default": argparse.SUPPRESS,
            "metavar": "{" + ",".join(f.values) + "}" if f.values else f.path.rsplit(".", 1)[-1].upper(),
            "help": f.help,
        }
        if f.repeatable:
            kwargs["action"] = "append"
        if f.const is not None:
            kwargs.update(nargs="?", const=f.const)
        parser.add_argument(name, **kwargs)


def add_common_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """``--config FILE`` and ``--set SECTION.FIELD=VALUE`` (repeatable)."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one field (repeatable)",
    )


def apply_flags(cfg: Any, ns: argparse.Namespace, flags: Mapping[str, Flag | tuple[str, str]]) -> Any:
    """``cfg`` with every given flag of ``ns`` applied, in ``flags`` order; a value that does
    not fit raises ConfigError naming the field and the flag."""
    for name, spec in flags.items():
        f = _as_flag(spec)
        dest = f.path.replace(".", "__")
        if not hasattr(ns, dest):
            continue
        value = getattr(ns, dest)
        if f.repeatable:
            value = ",".join(value)
        if f.values is not None:
            if value not in f.values:
                raise ConfigError(f"{f.path} ({name}): must be one of {', '.join(f.values)}, got {value!r}")
            value = f.values[value]
        try:
            cfg = set_value(cfg, f.path, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {name})") from e
    return cfg


def load(
    ns: argparse.Namespace,
    flags: Mapping[str, Flag | tuple[str, str]],
    root: type = JobConfig,
    base: Any = None,
) -> Any:
    """The one way every entry point builds its config: ``base`` (else ``--config``'s YAML,
    else the defaults of ``root``) < flags < every ``--set``, then validated. For a
    JobConfig the result is resolved (derived folders filled in)."""
    cfg = base
    if cfg is None:
        cfg = from_yaml(Path(ns.config), root=root) if getattr(ns, "config", None) else root()
    cfg = apply_flags(cfg, ns, flags)
    for assignment in getattr(ns, "overrides", []):
        cfg = apply_set(cfg, assignment)
    if isinstance(cfg, JobConfig):
        return validate(cfg)
    cfg.validate()
    return cfg


def load_output(ns: argparse.Namespace, flags: Mapping[str, Flag | tuple[str, str]], output: str) -> JobConfig:
    """The config an output recorded (``<output>/config.yaml``, written by the job), with
    ``flags`` and ``--set`` applied and validated: how jobs/dedup.py and jobs/takedown.py
    read theirs. Storage flags apply before the file is read (it may be on S3)."""
    from pipeline.job import CONFIG_NAME
    from pipeline.storage import Storage

    storage = apply_flags(JobConfig(), ns, {k: v for k, v in flags.items() if _as_flag(v).path.startswith("storage.")})
    try:
        text = Storage(output, storage.storage).read_bytes(CONFIG_NAME).decode("utf-8")
    except Exception as e:  # FileNotFoundError locally, NoSuchKey/ClientError on S3
        raise ConfigError(f"output: cannot read {output.rstrip('/')}/{CONFIG_NAME}: {e}") from e
    return load(ns, flags, base=from_yaml_text(text))


def load_sections(ns: argparse.Namespace, flags: Mapping[str, Flag | tuple[str, str]],
                  sections: Sequence[str], base: JobConfig | None = None) -> JobConfig:
    """Like :func:`load` for tools that use only some sections of a job's config
    (``clipcurate calibrate``: embed, moderate, storage): only those are validated."""
    cfg = base
    if cfg is None:
        cfg = from_yaml(Path(ns.config)) if getattr(ns, "config", None) else JobConfig()
    cfg = apply_flags(cfg, ns, flags)
    for assignment in getattr(ns, "overrides", []):
        cfg = apply_set(cfg, assignment)
    for name in sections:
        getattr(cfg, name).validate(name)
    return cfg


# flag -> (dotted field, help). Values are typed like --set values.
FLAGS: dict[str, Flag | tuple[str, str]] = {
    "--input": ("input", "URL list(s): file, folder, glob or s3:// URI (parquet/csv/tsv/jsonl)"),
    "--output": ("output", "output folder or s3:// URI (shards/, embeddings/, report)"),
    "--input-format": ("read.input_format", "parquet | csv | tsv | jsonl | txt | img2dataset (an img2dataset output: images from its tars)"),
    "--url-col": ("read.url_col", "column with the image URL (LAION's URL also works)"),
    "--caption-col": ("read.caption_col", "column with the caption (LAION's TEXT also works)"),
    "--save-additional-columns": ("read.save_additional_columns", "input columns to keep (a,b,c)"),
    "--model": ("embed.model", "CLIP architecture or weights path (default tiny-synthetic)"),
    "--pretrained": ("embed.pretrained", "weights tag, path, URL or s3:// URI (default synthetic)"),
    "--text-model": ("embed.text_model", "folder of a text tower to pair with the image tower (M-CLIP)"),
    "--precision": ("embed.precision", "auto | fp32 | fp16 | bf16"),
    "--stored-decode": ("embed.stored_decode", "cpu | device: where re-embedded shards' JPEGs are decoded"),
    "--s3-endpoint-url": ("storage.s3_endpoint_url", "S3-compatible endpoint (MinIO, local S3)"),
    "--allowed-networks": Flag(
        "download.allowed_networks",
        "CIDRs allowed despite the address guard, e.g. 127.0.0.1/32 (repeat or a,b)",
        repeatable=True,
    ),
    "--timeout": ("download.timeout", "seconds, total per request"),
    "--retries": ("download.retries", "extra attempts for transient failures"),
    "--image-size": ("decode.image_size", "stored image size in pixels"),
    "--resize-mode": ("decode.resize_mode", "no | border | center_crop | keep_ratio"),
    "--number-sample-per-shard": ("shard.number_sample_per_shard", "rows per shard"),
    "--batch-size": ("embed.inference_batch", "images (or captions) per forward pass"),
    "--concurrency": ("embed.concurrency", "embedding workers: N or MIN,MAX (default: one per GPU)"),
    "--num-gpus-per-actor": ("embed.num_gpus", "GPUs per embedding worker (0: CPU; default: 1 where there are GPUs)"),
    "--clip-score-threshold": ("filter.clip_score_threshold", "drop rows whose clip_score is below (default: the model's; null: off)"),
    "--unsafe-threshold": (
        "moderate.default_threshold",
        "concept margin above which a row is unsafe (concepts without their own threshold)",
    ),
    "--dedup-threshold": ("dedup.threshold", "cosine at or above which images are duplicates (default: the model's)"),
    "--unsafe-filter": ("filter.unsafe", "true/false: drop flagged rows (default auto: when calibrated for the model)"),
    "--head": ("moderate.head_path", "unsafe-classifier head (safetensors MLP over image embeddings)"),
    "--head-preset": ("moderate.head_preset", "published head threshold: re-laion-research-safe (0.45)"),
    "--blocklist-output": ("blocklist.outputs", "earlier outputs whose takedowns apply (a,b)"),
    "--dedup-against": ("dedup.against", "an earlier run's output to deduplicate against"),
    "--dedup-pixel-check": (
        "dedup.pixel_check",
        "true: confirm each pair by aligned thumbnails (3 KiB per row); the threshold picks candidates",
    ),
    "--scheduler": (
        "execution.scheduler",
        "auto (default: ray with a Ray address, else local) | local (worker processes, no Ray) | ray",
    ),
    "--processes": ("execution.processes", "local scheduler: CPU worker processes (default: one per CPU that a model worker on CPUs does not take)"),
    "--ray-address": ("execution.ray_address", "Ray cluster; default $RAY_ADDRESS (set by ray job submit)"),
}
def build_parser(prog: str = "embed_laion.py") -> argparse.ArgumentParser:
    """The job's argument parser: ``--config``, ``--set`` and the flags of :data:`FLAGS`."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Download, shard, embed, moderate and deduplicate LAION-style URL lists.",
        epilog="Precedence: defaults < --config < flags < --set. Example: "
        "--set decode.resize_mode=center_crop --set 'embed.concurrency=1,2'",
    )
    add_common_arguments(p, "YAML job config (sections as in the written config.yaml)")
    add_flags(p, FLAGS)
    p.add_argument(
        "--dry-run", action="store_true", help="validate, print the resolved config and exit"
    )
    return p


def from_namespace(ns: argparse.Namespace) -> JobConfig:
    """The validated, resolved JobConfig from parsed arguments (see the precedence above)."""
    return load(ns, FLAGS)


def from_args(argv: Sequence[str] | None = None) -> JobConfig:
    """Parse ``argv`` with :func:`build_parser` and return the validated JobConfig."""
    return from_namespace(build_parser().parse_args(argv))


__all__ = [
    "FLAGS",
    "Flag",
    "add_common_arguments",
    "add_flags",
    "apply_flags",
    "load",
    "load_output",
    "load_sections",
    "apply_set",
    "build_parser",
    "coerce",
    "from_args",
    "from_dict",
    "from_namespace",
    "from_yaml",
    "from_yaml_text",
    "set_value",
    "to_dict",
    "to_yaml",
    "validate",
]
