"""Pick moderation thresholds from a labelled sample and write them as YAML the job reads.

    python -m pipeline.calibrate --input 'out/*.parquet' --model tiny-synthetic \\
        --pretrained synthetic --concept 'hazard=a hazard sign|a warning sign' \\
        --label_col _gt_unsafe --caption_label_col _gt_hazard_in_caption \\
        --target_recall 0.95 --out thresholds.yaml

The input is the output Parquet of a run over a labelled sample (labels travel as additional
columns), so the embeddings are exactly the ones the job computes. For each concept and side
the margin of :mod:`pipeline.stages.moderate` is computed from the stored embeddings and the
threshold chosen for the target (:func:`pipeline.metrics.threshold_for`):

- image side: rows with an image embedding, labelled by ``label_col``;
- caption side: rows with a text embedding, labelled by ``caption_label_col`` (what the
  caption says can differ from what the image shows); without it the caption side is off;
- the head, when configured: image rows, labelled by ``label_col``.

A label column is boolean (unsafe or not: every concept is calibrated against all unsafe rows,
which suits one concept or synonyms) or a string naming the concept (null or "" = safe; each
concept is calibrated on its own rows against the safe ones). The YAML records the model id
the thresholds belong to; the job refuses them for another model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.config import ConfigError, EmbedConfig, ModerateConfig, StorageConfig
from pipeline.metrics import ThresholdChoice, UnreachableTarget, threshold_for
from pipeline.schema import embedding_matrix
from pipeline.stages.moderate import Moderation, margins


def _labels(table: pa.Table, col: str, concept: str) -> np.ndarray:
    if col not in table.column_names:
        raise ConfigError(f"calibrate: label column {col!r} not in the input ({table.column_names})")
    values = table.column(col)
    if pa.types.is_boolean(values.type):
        if values.null_count:
            raise ConfigError(f"calibrate: label column {col!r} has {values.null_count} nulls")
        return values.to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return np.array([v == concept for v in values.to_pylist()], bool)
    raise ConfigError(f"calibrate: label column {col!r} must be boolean or string, got {values.type}")


def _safe_rows(table: pa.Table, col: str) -> np.ndarray:
    """Rows that count as negatives: False, or null/empty concept name."""
    values = table.column(col)
    if pa.types.is_boolean(values.type):
        return ~values.to_numpy(zero_copy_only=False).astype(bool)
    return np.array([not v for v in values.to_pylist()], bool)


def _pick(scores: np.ndarray, labels: np.ndarray, recall: float | None, precision: float | None) -> ThresholdChoice:
    return threshold_for(scores, labels, min_recall=recall, min_precision=precision)


def calibrate(
    table: pa.Table,
    moderate: ModerateConfig,
    embed: EmbedConfig,
    *,
    label_col: str,
    caption_label_col: str | None = None,
    target_recall: float | None = None,
    target_precision: float | None = None,
    storage: StorageConfig | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Thresholds for every concept (and the head) meeting one target on ``table``.

    ``table``: output rows with ``image_embedding``/``text_embedding`` and the label columns.
    ``model``: an already loaded clip_model CLIP for ``embed`` (else it is loaded on CPU).
    Returns the YAML document as a dict (see the module docstring). Raises ConfigError for
    missing columns, a model other than the one that made the embeddings, or a target that
    cannot be met.
    """
    if (target_recall is None) == (target_precision is None):
        raise ConfigError("calibrate: give exactly one of target_recall and target_precision")
    # The file's own thresholds are what is being replaced: calibrate from the prompts alone.
    if model is None:
        from pipeline.stages.embed import load_model

        model, _ = load_model(embed.model, embed.pretrained, text_model=embed.text_model)
    stage = Moderation.prepare(replace(moderate, thresholds_file=None), storage or StorageConfig(), model)
    rules = stage.rules
    if S.MODEL in table.column_names:
        ids = {m for m in table.column(S.MODEL).to_pylist() if m is not None}
        if ids and ids != {stage.model_id}:
            raise ConfigError(
                f"calibrate: the sample was embedded with {sorted(ids)}, not {stage.model_id}"
            )
    dim = stage.neutral.shape[1]
    img, img_ok = embedding_matrix(table.column(S.IMAGE_EMBEDDING), dim)
    txt, txt_ok = embedding_matrix(table.column(S.TEXT_EMBEDDING), dim)
    names = list(rules.concepts)
    m_img = margins(img, stage.directions, stage.neutral) if stage.directions is not None else None
    m_txt = margins(txt, stage.directions, stage.neutral) if stage.directions is not None else None

    # The thresholds file's YAML fields (what moderate.thresholds_file reads), not column names.
    doc: dict[str, Any] = {
        "model": stage.model_id,
        "target": {"recall": target_recall} if target_recall is not None else {"precision": target_precision},
        "neutral_prompts": list(rules.neutral_prompts),
        "concepts": {},
        "sample": {"rows": table.num_rows, "label_col": label_col, "caption_label_col": caption_label_col},
    }

    def choose(what: str, scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
        rows = pos | neg
        try:
            c = _pick(scores[rows], pos[rows], target_recall, target_precision)
        except UnreachableTarget as e:
            raise ConfigError(f"calibrate: {what}: {e}") from e
        except ValueError as e:
            raise ConfigError(f"calibrate: {what}: {e}") from e
        return c.to_dict()

    for c, name in enumerate(names):
        entry: dict[str, Any] = {"prompts": list(rules.concepts[name])}
        pos = _labels(table, label_col, name) & img_ok
        neg = _safe_rows(table, label_col) & img_ok
        got = choose(f"{name} (image)", m_img[:, c], pos, neg)  # type: ignore[index]
        entry["image_threshold"] = got["threshold"]
        entry["image_achieved"] = got
        if caption_label_col is not None:
            pos = _labels(table, caption_label_col, name) & txt_ok
            neg = _safe_rows(table, caption_label_col) & txt_ok
            got = choose(f"{name} (caption)", m_txt[:, c], pos, neg)  # type: ignore[index]
            entry["caption_threshold"] = got["threshold"]
            entry["caption_achieved"] = got
        else:
            entry["caption_threshold"] = None
        doc["concepts"][name] = entry
    if stage.head is not None:
        pos = _labels(table, label_col, rules.head_concept) & img_ok
        neg = _safe_rows(table, label_col) & img_ok
        got = choose("head", stage.head(img), pos, neg)
        doc["head_threshold"] = got["threshold"]
        doc["head_achieved"] = got
    return doc


def write_yaml(doc: dict[str, Any], uri: str, storage: StorageConfig | None = None) -> None:
    """Write the thresholds document to a local path or ``s3://`` URI."""
    import yaml

    from pipeline.storage import write_file

    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    write_file(uri, text.encode("utf-8"), storage)


def read_parquet(uri: str, storage: StorageConfig | None = None) -> pa.Table:
    """All rows of a Parquet file, folder or glob (local or ``s3://``)."""
    import pyarrow.dataset as ds

    from pipeline.stages.read import list_input_files
    from pipeline.storage import filesystem_for

    files = list_input_files(uri, "parquet", storage)
    fs, _ = filesystem_for(files[0], storage)
    paths = [filesystem_for(f, storage)[1] for f in files]
    return ds.dataset(paths, format="parquet", filesystem=fs).to_table()


# The job's flags that say which model and prompts are calibrated (pipeline/job_config.py).
FLAGS = {
    "--model": ("embed.model", "embedding model, as given to the job (default tiny-synthetic)"),
    "--pretrained": ("embed.pretrained", "weights tag or path, as given to the job"),
    "--text_model": ("embed.text_model", "text tower folder, as given to the job"),
    "--head": ("moderate.head_path", "safetensors head to calibrate as well"),
    "--s3_endpoint_url": ("storage.s3_endpoint_url", "S3-compatible endpoint"),
}


def _flags() -> dict[str, Any]:
    from pipeline.job_config import Flag

    return {**FLAGS, "--neutral": Flag("moderate.neutral_prompts", "a neutral prompt (repeatable)", repeatable=True)}


def _concept(text: str) -> tuple[str, tuple[str, ...]]:
    name, sep, prompts = text.partition("=")
    items = tuple(p.strip() for p in prompts.split("|") if p.strip())
    if not sep or not name.strip() or not items:
        raise argparse.ArgumentTypeError(f"--concept needs NAME=prompt|prompt..., got {text!r}")
    return name.strip(), items


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The calibrate flags (shared by ``python -m pipeline.calibrate`` and ``clipcurate calibrate``)."""
    p.add_argument("--input", required=True, help="labelled output Parquet: file, folder, glob or s3://")
    p.add_argument("--out", required=True, help="YAML to write (path or s3://)")
    from pipeline import job_config as J

    J.add_common_arguments(p, "a job's YAML config: its embed and moderate sections are calibrated")
    J.add_flags(p, _flags())
    p.add_argument("--concept", action="append", type=_concept, default=None,
                   help="NAME=prompt|prompt... (repeatable; default: the job's default concepts)")
    p.add_argument("--label_col", required=True, help="image-side label (bool, or concept name)")
    p.add_argument("--caption_label_col", default=None, help="caption-side label; omitted: caption side off")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target_recall", type=float)
    target.add_argument("--target_precision", type=float)


def _config(a: argparse.Namespace) -> Any:
    """The job config the flags, ``--config`` and ``--set`` describe (the job's loader), with
    the moderation prompts to calibrate filled in; only embed, moderate and storage are
    validated."""
    from pipeline import job_config as J

    cfg = J.load_sections(a, _flags(), ("embed", "storage"))
    base = ModerateConfig()
    mod = cfg.moderate
    moderate = replace(
        mod,
        concepts=dict(a.concept) if a.concept else (mod.concepts or base.concepts),
        neutral_prompts=mod.neutral_prompts or base.neutral_prompts,
    )
    moderate.validate("moderate")
    return replace(cfg, moderate=moderate)


def run(a: argparse.Namespace) -> int:
    """Run a parsed ``calibrate`` command; prints what each threshold achieves."""
    try:
        cfg = _config(a)
        storage, moderate = cfg.storage, cfg.moderate
        table = read_parquet(a.input, storage)
        doc = calibrate(
            table,
            moderate,
            cfg.embed,
            label_col=a.label_col,
            caption_label_col=a.caption_label_col,
            target_recall=a.target_recall,
            target_precision=a.target_precision,
            storage=storage,
        )
    except ConfigError as e:
        print(f"clipcurate calibrate: error: {e}", file=sys.stderr)
        return 2
    write_yaml(doc, a.out, storage)
    for name, entry in doc["concepts"].items():
        for side in ("image", "caption"):
            got = entry.get(f"{side}_achieved")
            if got:
                print(
                    f"{name} ({side}): threshold {got['threshold']:.4f}  precision "
                    f"{got['precision']:.3f}  recall {got['recall']:.3f}  fpr {got['false_positive_rate']:.3f}"
                )
    print(f"wrote {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.calibrate", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
