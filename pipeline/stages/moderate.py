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
``unsafe_source`` name what flagged the row (null when nothing did); pipeline/decisions.py
turns a flagged row into ``keep = false`` with a reason naming concept, side, threshold and
model. Thresholds come from the config or from the YAML that ``clipcurate calibrate`` writes.

Scoring runs inside the embed stage (:class:`Moderation`, prepared once in the driver), where
the embeddings are: no extra pass over the rows, no single scoring process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schema as S
from pipeline.config import ConfigError, ModerateConfig, StorageConfig

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
        # The model's own tokenizer (CLIP's BPE or an HF tower's), padded with its pad id.
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


@dataclass
class Moderation:
    """Moderation ready to score embeddings: the resolved rules, the concept and neutral
    prompt directions embedded by the model's text tower, and the head. Small and picklable:
    it is prepared once in the driver and travels inside the embed stage, which scores each
    row where its embeddings are computed.
    """

    rules: Rules
    directions: np.ndarray | None  # float32 [C, D] (None: no concept)
    neutral: np.ndarray  # float32 [K, D]
    head: Head | None
    model_id: str

    @classmethod
    def prepare(cls, cfg: ModerateConfig, storage: StorageConfig | None, model: Any) -> Moderation:
        """Resolve ``cfg`` (and its thresholds file), embed its prompts with ``model`` (a
        loaded clip_model model) and load its head; ``ConfigError`` names what does not fit."""
        from pipeline.stages.embed import model_id as id_of

        rules = resolve_rules(cfg, storage)
        mid = id_of(model)
        if rules.model is not None and rules.model != mid:
            raise ConfigError(
                f"moderate.thresholds_file: thresholds were calibrated for {rules.model}, "
                f"but the embedding model is {mid}; recalibrate for this model"
            )
        directions = concept_directions(model, rules.concepts) if rules.concepts else None
        neutral = embed_prompts(model, list(rules.neutral_prompts))
        head = None
        if rules.head_path:
            from pipeline.storage import filesystem_for

            fs, path = filesystem_for(rules.head_path, storage)
            with fs.open_input_stream(path) as f:
                try:
                    head = Head.from_bytes(f.read(), int(neutral.shape[1]))
                except ValueError as e:
                    raise ConfigError(f"moderate.head_path: {rules.head_path}: {e}") from e
        return cls(rules, directions, neutral, head, mid)

    def score(
        self, img: np.ndarray, img_ok: np.ndarray, txt: np.ndarray, txt_ok: np.ndarray
    ) -> tuple[np.ndarray, list[str | None], list[str | None]]:
        """Per row, from unit embeddings float32 [N, D] and their validity bool [N]:
        (unsafe_score float32 [N], NaN where nothing was scored; the concept that flagged
        the row; its source "image" / "caption" / "head"), the last two None when unflagged."""
        rules = self.rules
        n = img.shape[0]
        # candidates[k] = (score - threshold [N], concept, source)
        cands: list[tuple[np.ndarray, str, str]] = []
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
                    cands.append((np.where(ok, m[:, c], np.nan) - t, name, side))
        if self.head is not None and img_ok.any():
            p = np.where(img_ok, self.head(img), np.nan)
            cands.append((p - rules.head_threshold, rules.head_concept, "head"))
        best = np.full(n, np.nan, np.float32)
        concept: list[str | None] = [None] * n
        source: list[str | None] = [None] * n
        for above, name, side in cands:
            better = ~np.isnan(above) & (np.isnan(best) | (above > best))
            for i in np.flatnonzero(better):
                best[i] = above[i]
                concept[i], source[i] = (name, side) if above[i] > 0 else (None, None)
        return best, concept, source

    def annotate(self, table: pa.Table, img: np.ndarray, img_ok: np.ndarray, txt: np.ndarray,
                 txt_ok: np.ndarray) -> pa.Table:
        """``table`` with ``unsafe_score``, ``unsafe_concept`` and ``unsafe_source`` from
        :meth:`score` of its rows' embeddings (float32 [N, D] and validity, row order)."""
        score, concept, source = self.score(img, img_ok, txt, txt_ok)
        out = S.set_column(table, S.UNSAFE_SCORE, pa.array(score, pa.float32(), mask=np.isnan(score)))
        out = S.set_column(out, S.UNSAFE_CONCEPT, pa.array(concept, pa.string()))
        return S.set_column(out, S.UNSAFE_SOURCE, pa.array(source, pa.string()))
