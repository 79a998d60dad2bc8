"""Unsafe-content scores from CLIP embeddings: concept prompts, and an optional trained head.

Concepts (the approach of Stable Diffusion's safety checker, which compares CLIP image
embeddings with fixed concept embeddings under per-concept thresholds). Each concept is a set
of prompts whose unit text embeddings are averaged into one direction ``c``; neutral prompts
give directions ``n_1..n_K``. For a unit embedding ``e`` the concept's margin is

    margin(e, c) = cos(e, c) - max_k cos(e, n_k)

Subtracting the best neutral prompt removes what every caption-like prompt shares (a model's
cosines to any text sit at a model-specific level), so one threshold scale fits all concepts.
The image embedding and, separately, the caption's text embedding are scored, each side with
its own per-concept thresholds (``None`` switches a side off for a concept).

Head (the approach of LAION's NSFW detector): a small classifier over image embeddings stored as
safetensors: ``layers.0.weight`` [H1, D], ``layers.0.bias`` [H1], ... ``layers.{L-1}.weight``
[1, H], with ReLU between layers and a sigmoid at the end (one layer = logistic regression).

Outputs: ``unsafe_score`` = the largest ``score - threshold`` over every concept and side (and
the head), so ``> 0`` means flagged and the value says by how much; ``unsafe_concept`` and
``unsafe_source`` name what flagged the row (null when nothing did). A flagged row gets
``keep = false`` and a ``drop_reason`` naming concept, side, score, threshold and model.
Thresholds come from the config or from the YAML that ``clipcurate calibrate`` writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import schema as S
from pipeline.config import ConfigError, EmbedConfig, ModerateConfig, StorageConfig
from pipeline.stages.base import Stage

log = logging.getLogger("clipcurate.moderate")

SIDES = ("image", "caption")


# --------------------------------------------------------------------------- thresholds YAML


def read_text(uri: str, storage: StorageConfig | None = None) -> str:
    """A small text file from a local path or ``s3://`` URI."""
    from pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


@dataclass(frozen=True)
class Rules:
    """Everything scoring needs: concepts, neutral prompts, thresholds (per concept, per side).

    ``model``: the model id the thresholds were calibrated for (None: not calibrated).
    """

    concepts: dict[str, tuple[str, ...]]
    neutral_prompts: tuple[str, ...]
    image_thresholds: dict[str, float | None]
    caption_thresholds: dict[str, float | None]
    head_path: str | None
    head_threshold: float
    head_concept: str
    model: str | None = None


def resolve_rules(cfg: ModerateConfig, storage: StorageConfig | None = None) -> Rules:
    """Merge the config with its thresholds file (the file wins: its thresholds only make
    sense for the prompts they were calibrated with, so it also brings those prompts)."""
    concepts = {k: tuple(v) for k, v in cfg.concepts.items()}
    neutral = tuple(cfg.neutral_prompts)
    image_thr = {c: cfg.image_thresholds.get(c, cfg.default_threshold) for c in concepts}
    caption_thr = {c: cfg.caption_thresholds.get(c, cfg.default_threshold) for c in concepts}
    head_threshold, model = cfg.head_threshold, None
    if cfg.thresholds_file:
        import yaml

        try:
            doc = yaml.safe_load(read_text(cfg.thresholds_file, storage))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"moderate.thresholds_file: cannot read {cfg.thresholds_file}: {e}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("concepts"), dict):
            raise ConfigError(
                f"moderate.thresholds_file: {cfg.thresholds_file} has no 'concepts' mapping"
            )
        concepts, image_thr, caption_thr = {}, {}, {}
        for name, spec in doc["concepts"].items():
            if not isinstance(spec, dict) or not spec.get("prompts"):
                raise ConfigError(f"moderate.thresholds_file: concept {name!r} has no prompts")
            concepts[str(name)] = tuple(str(p) for p in spec["prompts"])
            image_thr[str(name)] = _opt_float(spec.get("image_threshold"))
            caption_thr[str(name)] = _opt_float(spec.get("caption_threshold"))
        neutral = tuple(str(p) for p in doc.get("neutral_prompts") or neutral)
        if doc.get("head_threshold") is not None:
            head_threshold = float(doc["head_threshold"])
        model = doc.get("model")
    return Rules(
        concepts, neutral, image_thr, caption_thr, cfg.head_path, head_threshold, cfg.head_concept, model
    )


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


# ------------------------------------------------------------------------------ scoring math


def embed_prompts(model: Any, prompts: list[str]) -> np.ndarray:
    """float32 [len(prompts), D] unit text embeddings (fp32, on the model's device)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    with torch.inference_mode():
        x = model.encode_text(model.tokenizer(prompts).to(device))
        return F.normalize(x.float(), dim=-1).cpu().numpy()


def concept_directions(model: Any, concepts: dict[str, tuple[str, ...]]) -> np.ndarray:
    """float32 [C, D]: per concept, the renormalised mean of its prompts' unit embeddings."""
    dirs = []
    for prompts in concepts.values():
        mean = embed_prompts(model, list(prompts)).astype(np.float64).mean(axis=0)
        dirs.append(mean / np.linalg.norm(mean))
    return np.asarray(dirs, dtype=np.float32)


def margins(emb: np.ndarray, directions: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """[N, C] margins ``cos(e, c) - max_k cos(e, n_k)`` for unit embeddings ``emb`` [N, D]."""
    e = emb.astype(np.float32, copy=False)
    return e @ directions.T - (e @ neutral.T).max(axis=1, keepdims=True)


@dataclass(frozen=True)
class Head:
    """An MLP over image embeddings: ReLU between layers, sigmoid output (probability)."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    @classmethod
    def from_bytes(cls, data: bytes, dim: int | None = None) -> Head:
        """Parse safetensors bytes with ``layers.{i}.weight`` [out, in] and ``layers.{i}.bias``."""
        from safetensors.numpy import load

        tensors = load(data)
        weights, biases = [], []
        i = 0
        while f"layers.{i}.weight" in tensors:
            w = tensors[f"layers.{i}.weight"].astype(np.float32)
            b = tensors.get(f"layers.{i}.bias")
            b = np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32)
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"head layer {i}: weight {w.shape} and bias {b.shape} do not fit")
            if weights and w.shape[1] != weights[-1].shape[0]:
                raise ValueError(f"head layer {i} takes {w.shape[1]} inputs, previous gives {weights[-1].shape[0]}")
            weights.append(w)
            biases.append(b)
            i += 1
        if not weights:
            raise ValueError("head file has no 'layers.0.weight'")
        if weights[-1].shape[0] != 1:
            raise ValueError(f"head must end in one output, got {weights[-1].shape[0]}")
        unknown = set(tensors) - {f"layers.{j}.{k}" for j in range(i) for k in ("weight", "bias")}
        if unknown:
            raise ValueError(f"head file has unexpected tensors {sorted(unknown)[:5]}")
        if dim is not None and weights[0].shape[1] != dim:
            raise ValueError(f"head expects {weights[0].shape[1]}-d embeddings, the model gives {dim}")
        return cls(tuple(weights), tuple(biases))

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        """[N, D] embeddings -> [N] probabilities (float32)."""
        x = emb.astype(np.float32, copy=False)
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x @ w.T + b
            if k < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
        z = x[:, 0].astype(np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid without overflow


def embedding_matrix(col: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, D], valid bool [N]) from a nullable fixed_size_list<float> column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    out = np.zeros((n, dim), np.float32)
    if n and valid.any():
        if arr.type.list_size != dim:
            raise ValueError(f"embeddings have dimension {arr.type.list_size}, expected {dim}")
        # Null rows still occupy their slots in a fixed-size list's values.
        flat = arr.values.to_numpy(zero_copy_only=False)
        flat = flat[arr.offset * dim : (arr.offset + n) * dim].reshape(n, dim)
        out[valid] = flat[valid]
    return out, valid


@dataclass
class ModerateStage(Stage):
    """Scores rows for unsafe content (see the module docstring).

    Prompt embeddings need the text tower of the embedding model: :meth:`prepare` computes
    them once (the runner calls it in the driver, so actors only receive small arrays); a stage
    that was not prepared does it in ``setup``.
    """

    cfg: ModerateConfig = field(default_factory=ModerateConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        self.rules: Rules | None = None
        self.directions: np.ndarray | None = None  # [C, D]
        self.neutral: np.ndarray | None = None  # [K, D]
        self.head: Head | None = None
        self.model_id: str | None = None

    def prepare(self, model: Any = None) -> None:
        """Resolve the rules, embed the prompts and load the head; ``model`` (a clip_model
        CLIP already loaded with the embed config's weights) avoids loading it again."""
        from pipeline.stages.embed import load_model
        from pipeline.stages.embed import model_id as id_of

        rules = resolve_rules(self.cfg, self.storage)
        if model is None:
            model, _ = load_model(self.embed.model, self.embed.pretrained)
        mid = id_of(model)
        if rules.model is not None and rules.model != mid:
            raise ConfigError(
                f"moderate.thresholds_file: thresholds were calibrated for {rules.model}, "
                f"but the embedding model is {mid}; recalibrate for this model"
            )
        self.directions = concept_directions(model, rules.concepts) if rules.concepts else None
        self.neutral = embed_prompts(model, list(rules.neutral_prompts))
        dim = int(model.embed_dim)
        if rules.head_path:
            from pipeline.storage import filesystem_for

            fs, path = filesystem_for(rules.head_path, self.storage)
            with fs.open_input_stream(path) as f:
                self.head = Head.from_bytes(f.read(), dim)
        self.rules, self.model_id = rules, mid

    def setup(self) -> None:
        if self.rules is None:
            self.prepare()

    def score(
        self, img: np.ndarray, img_ok: np.ndarray, txt: np.ndarray, txt_ok: np.ndarray
    ) -> tuple[np.ndarray, list[str | None], list[str | None], list[str | None]]:
        """Per row: (unsafe_score float32 with NaN where nothing was scored, concept, source,
        a human-readable reason for flagged rows)."""
        rules = self.rules
        assert rules is not None
        n = img.shape[0]
        # candidates[k] = (score - threshold [N], raw score [N], threshold, concept, source, rows)
        cands: list[tuple[np.ndarray, np.ndarray, float, str, str]] = []
        names = list(rules.concepts)
        if self.directions is not None and self.neutral is not None:
            for side, emb, ok, thr in (
                ("image", img, img_ok, rules.image_thresholds),
                ("caption", txt, txt_ok, rules.caption_thresholds),
            ):
                if not ok.any():
                    continue
                m = margins(emb, self.directions, self.neutral)
                for c, name in enumerate(names):
                    t = thr.get(name)
                    if t is None:
                        continue
                    raw = np.where(ok, m[:, c], np.nan)
                    cands.append((raw - t, raw, t, name, side))
        if self.head is not None and img_ok.any():
            p = np.where(img_ok, self.head(img), np.nan)
            cands.append((p - rules.head_threshold, p, rules.head_threshold, rules.head_concept, "head"))
        best = np.full(n, np.nan, np.float32)
        concept: list[str | None] = [None] * n
        source: list[str | None] = [None] * n
        reason: list[str | None] = [None] * n
        for above, raw, t, name, side in cands:
            better = ~np.isnan(above) & (np.isnan(best) | (above > best))
            for i in np.flatnonzero(better):
                best[i] = above[i]
                if above[i] > 0:
                    concept[i], source[i] = name, side
                    kind = "probability" if side == "head" else "margin"
                    reason[i] = (
                        f"moderation:{name}({side} {kind} {raw[i]:.4f} > {t:.4f}; {self.model_id})"
                    )
                else:
                    concept[i] = source[i] = reason[i] = None
        return best, concept, source, reason

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if self.rules is None:
            self.setup()
        n = batch.num_rows
        dim = self.neutral.shape[1]  # type: ignore[union-attr]
        img, img_ok = embedding_matrix(batch.column(S.IMAGE_EMBEDDING), dim)
        txt, txt_ok = embedding_matrix(batch.column(S.TEXT_EMBEDDING), dim)
        score, concept, source, reason = self.score(img, img_ok, txt, txt_ok)
        statuses = batch.column(S.STATUS).to_pylist()
        keep, drop = initial_keep(batch, statuses)
        for i in range(n):
            if reason[i] is not None and keep[i]:
                keep[i], drop[i] = False, reason[i]
        from pipeline.stages.embed import _set

        out = _set(batch, S.UNSAFE_SCORE, pa.array(score, pa.float32(), mask=np.isnan(score)))
        out = _set(out, S.UNSAFE_CONCEPT, pa.array(concept, pa.string()))
        out = _set(out, S.UNSAFE_SOURCE, pa.array(source, pa.string()))
        out = _set(out, S.KEEP, pa.array(keep, pa.bool_()))
        return _set(out, S.DROP_REASON, pa.array(drop, pa.string()))


def initial_keep(batch: pa.Table, statuses: list[Any]) -> tuple[list[bool], list[str | None]]:
    """``keep``/``drop_reason`` before this filter: the batch's own columns when present,
    otherwise kept when ``ok`` and dropped with ``status:<status>`` when not."""
    if S.KEEP in batch.column_names and S.DROP_REASON in batch.column_names:
        keep = [bool(k) if k is not None else s == S.OK for k, s in zip(batch.column(S.KEEP).to_pylist(), statuses, strict=True)]
        return keep, batch.column(S.DROP_REASON).to_pylist()
    keep = [s == S.OK for s in statuses]
    return keep, [None if k else f"status:{s}" for k, s in zip(keep, statuses, strict=True)]
