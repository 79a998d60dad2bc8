"""Filter settings that belong to the model in use: a job's defaults come from its card.

A clip_score threshold, an unsafe-concept margin or a duplicate cosine means something only for
the weights it was measured with (LAION's 0.28 is OpenAI ViT-B/32's; the bundled tiny model
links different scenes at cosine 0.95). So in a :class:`~pipeline.config.JobConfig` these
settings default to ``auto`` / unset, and :func:`apply_model_defaults` fills them from the
registry entry of ``embed.model`` + ``embed.pretrained``
(:class:`clip_model.pretrained.ModelDefaults`) unless the user set them:

* ``filter.clip_score_threshold``: the model's calibrated value, else off (null);
* ``moderate.concepts`` / ``neutral_prompts`` / per-concept thresholds: the model's calibrated
  concepts, else the generic concepts (scored with the margin-0 rule, not calibrated);
* ``filter.unsafe``: on when moderation is calibrated for the model (the card's concepts, a
  ``thresholds_file``, explicit per-concept thresholds, or a head with a threshold or preset),
  else off: the scores are recorded and no row is dropped by moderation;
* ``dedup.threshold`` / ``pixel_check`` / pixel bounds: the model's, else 0.95, off, 4.5, 23, 7, 34.

:func:`notes` turns the resolved config into the lines the job logs once and the report shows
(what filters nothing, and why).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.config import (
    AUTO,
    GENERIC_CONCEPTS,
    GENERIC_NEUTRAL,
    HEAD_PRESETS,
    DedupConfig,
    JobConfig,
)

_GENERIC_DEDUP = DedupConfig()


def registry_defaults(model: str, pretrained: str | None) -> Any:
    """The :class:`clip_model.pretrained.ModelDefaults` of the registered weights, or None
    (unregistered weights, a path, random init)."""
    if not pretrained:
        return None
    from clip_model.pretrained import get_pretrained_entry

    entry = get_pretrained_entry(model, pretrained)
    return entry.defaults if entry is not None else None


def embedding_dim(model: str, pretrained: str | None) -> int:
    """The embedding size of ``model`` (from its architecture config; loads the weights only
    for a model the registry does not know)."""
    import clip_model

    arch = clip_model.get_model_config(model)
    if arch is not None:
        return int(arch.embed_dim)
    from pipeline.stages.embed import load_model

    loaded, _ = load_model(model, pretrained)
    return int(loaded.embed_dim)


def moderation_calibrated(cfg: JobConfig) -> bool:
    """True when the moderation rules of a resolved ``cfg`` were chosen for its model."""
    m = cfg.moderate
    if not m.enabled:
        return False
    if m.thresholds_file or m.head_path:
        return True
    if any(v is not None for v in (*m.image_thresholds.values(), *m.caption_thresholds.values())):
        return True
    d = registry_defaults(cfg.embed.model, cfg.embed.pretrained)
    return d is not None and d.moderation is not None and dict(d.moderation.concepts) == m.concepts


def apply_model_defaults(cfg: JobConfig) -> JobConfig:
    """``cfg`` with every ``auto`` / unset model-owned setting filled in (see the module
    docstring). Settings the user gave are kept; applying it twice changes nothing."""
    d = registry_defaults(cfg.embed.model, cfg.embed.pretrained)
    m = cfg.moderate
    if m.head_preset is not None and m.head_preset in HEAD_PRESETS:
        m = replace(m, head_threshold=HEAD_PRESETS[m.head_preset][0])
    if m.concepts is None:
        if d is not None and d.moderation is not None:
            mod = d.moderation
            m = replace(
                m,
                concepts={k: tuple(v) for k, v in mod.concepts},
                neutral_prompts=m.neutral_prompts if m.neutral_prompts is not None else tuple(mod.neutral_prompts),
                image_thresholds={**dict(mod.image_thresholds), **m.image_thresholds},
                caption_thresholds={**dict(mod.caption_thresholds), **m.caption_thresholds},
            )
        else:
            m = replace(m, concepts=dict(GENERIC_CONCEPTS))
    if m.neutral_prompts is None:
        m = replace(m, neutral_prompts=GENERIC_NEUTRAL)
    cfg = replace(cfg, moderate=m)

    f = cfg.filter
    if f.clip_score_threshold == AUTO:
        f = replace(f, clip_score_threshold=d.clip_score_threshold if d is not None else None)
    if f.unsafe == AUTO:
        f = replace(f, unsafe=moderation_calibrated(cfg))
    cfg = replace(cfg, filter=f)

    dd = cfg.dedup
    model_dedup = {
        "threshold": None if d is None else d.dedup_threshold,
        "pixel_check": None if d is None else d.dedup_pixel_check,
        "pixel_mean_max": None if d is None else d.dedup_pixel_mean_max,
        "pixel_blob_max": None if d is None else d.dedup_pixel_blob_max,
        "pixel_channel_mean_max": None if d is None else d.dedup_pixel_channel_mean_max,
        "pixel_channel_blob_max": None if d is None else d.dedup_pixel_channel_blob_max,
    }
    changes = {}
    for name, value in model_dedup.items():
        if getattr(dd, name) == AUTO:
            changes[name] = value if value is not None else getattr(_GENERIC_DEDUP, name)
    if changes:
        cfg = replace(cfg, dedup=replace(dd, **changes))
    return cfg


def notes(cfg: JobConfig) -> list[str]:
    """What the resolved ``cfg`` filters, and does not, because of where its settings came
    from: one line each, for the job's log and report."""
    model = cfg.embed.model + (f" ({cfg.embed.pretrained})" if cfg.embed.pretrained else "")
    d = registry_defaults(cfg.embed.model, cfg.embed.pretrained)
    out = []
    if cfg.moderate.enabled and not cfg.filter.unsafe:
        why = ("no moderation thresholds are calibrated for " + model) if not moderation_calibrated(cfg) else "filter.unsafe is off"
        out.append(f"moderation: {why}: unsafe scores are recorded, no row is dropped by moderation "
                   "(calibrate with `clipcurate calibrate`, or load a head with moderate.head_path)")
    if cfg.filter.clip_score_threshold is None:
        out.append(f"clip_score: no threshold set or calibrated for {model}: scores are recorded, "
                   "no row is dropped by clip_score")
    if d is not None:
        for source in d.sources:
            out.append(f"defaults of {model}: {source}")
    return out


__all__ = ["apply_model_defaults", "embedding_dim", "moderation_calibrated", "notes", "registry_defaults"]
