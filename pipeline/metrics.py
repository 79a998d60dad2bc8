"""Choosing a decision threshold on a labelled sample (used by ``clipcurate calibrate``).

ROC AUC lives in :func:`testkit.evaluate_model.roc_auc`; this module only picks
thresholds. The decision rule everywhere is ``flagged = score > threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and what it achieves on the sample it was chosen on (counts are rows)."""

    threshold: float
    precision: float
    recall: float
    false_positive_rate: float
    tp: int
    fp: int
    fn: int
    tn: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnreachableTarget(ValueError):
    """No threshold on this sample meets the requested precision or recall."""


def confusion_at(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, threshold: float
) -> ThresholdChoice:
    """Counts and rates of ``score > threshold`` against boolean ``labels`` (float64 math)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    flag = s > threshold
    tp, fp = int((flag & y).sum()), int((flag & ~y).sum())
    fn, tn = int((~flag & y).sum()), int((~flag & ~y).sum())
    return ThresholdChoice(
        threshold=float(threshold),
        precision=tp / (tp + fp) if tp + fp else 1.0,
        recall=tp / (tp + fn) if tp + fn else 1.0,
        false_positive_rate=fp / (fp + tn) if fp + tn else 0.0,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=tn,
    )


def threshold_for(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    *,
    min_recall: float | None = None,
    min_precision: float | None = None,
) -> ThresholdChoice:
    """The threshold (for ``score > threshold``) that meets one target on this sample.

    min_recall: the highest threshold whose recall is >= the target (fewest false positives).
    min_precision: the lowest threshold whose precision is >= the target (most recall).
    Exactly one target must be given. Thresholds sit halfway between adjacent distinct scores,
    so the choice does not hinge on float ties. Raises ValueError without positives and
    negatives, UnreachableTarget when no threshold meets the target.
    """
    if (min_recall is None) == (min_precision is None):
        raise ValueError("give exactly one of min_recall and min_precision")
    target = min_recall if min_recall is not None else min_precision
    if not 0.0 < float(target) <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"target must be in (0, 1], got {target}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(f"need positives and negatives, got {n_pos} of {y.size} positive")
    values = np.unique(s)[::-1]  # distinct scores, high to low
    # Flagging every score >= values[k]: cumulative positives/negatives at each cut.
    pos_at = np.array([np.sum(y & (s == v)) for v in values], dtype=np.int64).cumsum()
    all_at = np.array([np.sum(s == v) for v in values], dtype=np.int64).cumsum()
    recall = pos_at / n_pos
    precision = pos_at / all_at
    if min_recall is not None:
        ok = np.flatnonzero(recall >= min_recall - 1e-12)
        k = int(ok[0])  # highest cut that still reaches the recall
    else:
        ok = np.flatnonzero(precision >= min_precision - 1e-12)  # type: ignore[operator]
        if len(ok) == 0:
            raise UnreachableTarget(
                f"no threshold reaches precision {min_precision} (best {precision.max():.3f})"
            )
        k = int(ok[-1])  # lowest cut that keeps the precision
    lower = values[k + 1] if k + 1 < len(values) else values[k] - 1.0
    return confusion_at(s, y, float((values[k] + lower) / 2))


__all__ = ["ThresholdChoice", "UnreachableTarget", "confusion_at", "threshold_for"]
