"""Training data for the bundled models (``tiny-synthetic``, ``multilingual-synthetic``), drawn
from the synthetic world, and the entry point that trains them with clip_model.train's recipes:

    python -m testkit.train_tiny --recipe tiny-synthetic --out clip_model/weights/tiny-synthetic.safetensors --seed 0

(the same flags as ``python -m clip_model.train``; this module hands the recipe its synthetic
data, so clip_model never names the test rig). Images are rendered in memory at a small size,
pushed through the same kinds of damage the world's files carry (JPEG re-encoding, small crops,
rescaling) and preprocessed exactly as at inference, so that near duplicates embed close
together and the model sees what the pipeline will show it. Captions are tokenized with the
model's own tokenizer; the multilingual recipe draws each caption's language at random.
"""

from __future__ import annotations

import dataclasses
import io
import random
import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from clip_model.config import PreprocessConfig
from clip_model.tokenizer import tokenize
from clip_model.transform import normalize_uint8, resize_crop_uint8

from .languages import LANGUAGES, GroupPlan, group_text, hazard_short
from .synthetic import (
    COLORS,
    COUNTS,
    HAZARD_PHRASES,
    PLURALS,
    POSITIONS,
    QUADRANTS,
    SHAPES,
    SIZES,
    ObjectGroup,
    Scene,
    caption,
    render,
    sample_scenes,
)

# More hazard scenes than the world's default 5 %, so the concept is seen often enough.
TRAIN_UNSAFE_RATE = 0.25
TRAIN_SECOND_OBJECT_RATE = 0.5
# A matched caption names the hazard with this probability (the world's captions do so half
# the time; the model must still learn what the sign looks like).
TRAIN_HAZARD_MENTION = 0.9
# Share of captions that name just one thing (one object group, or the hazard), the kind of
# short text that zero-shot prompts and moderation concepts are.
SHORT_CAPTION_RATE = 0.4


# Share of each batch made of (scene, minimal variant) pairs. Random scenes differ in so many
# attributes (colours above all) that a model can match them to their captions while ignoring
# shape or the hazard sign; a twin that differs in exactly one attribute forces it to see that
# attribute. Weights: which attribute the twin changes.
PAIRED_SHARE = 0.66
# Shape is the attribute the image tower learns last (colour and layout come first), so most
# twins differ in shape.
VARIANT_WEIGHTS: dict[str, float] = {
    "shape": 0.7,
    "hazard": 0.125,
    "color": 0.05,
    "count": 0.04,
    "size": 0.035,
    "position": 0.05,
}


def variant(
    scene: Scene, rng: random.Random, weights: dict[str, float] | None = None
) -> tuple[Scene, str]:
    """A copy of ``scene`` that differs in one attribute (same layout seed, so every pixel not
    touched by that attribute stays the same), the attribute drawn with ``weights`` (default
    :data:`VARIANT_WEIGHTS`). Returns (scene, attribute changed)."""
    weights = weights or VARIANT_WEIGHTS
    kinds = list(weights)
    kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
    if kind == "hazard":
        if scene.hazard:
            return dataclasses.replace(scene, hazard=False, hazard_corner=""), kind
        used = {g.position for g in scene.groups}
        corner = rng.choice([q for q in QUADRANTS if q not in used])
        return dataclasses.replace(scene, hazard=True, hazard_corner=corner), kind
    i = rng.randrange(len(scene.groups))
    g = scene.groups[i]
    if kind == "shape":
        g = dataclasses.replace(g, shape=rng.choice([x for x in SHAPES if x != g.shape]))
    elif kind == "color":
        taken = {scene.background} | {h.color for h in scene.groups}
        g = dataclasses.replace(g, color=rng.choice([c for c in COLORS if c not in taken]))
    elif kind == "count":
        g = dataclasses.replace(g, count=rng.choice([c for c in COUNTS if c != g.count]))
    elif kind == "size":
        g = dataclasses.replace(g, size=rng.choice([x for x in SIZES if x != g.size]))
    else:
        others = {h.position for j, h in enumerate(scene.groups) if j != i}
        free = [
            p
            for p in (QUADRANTS if len(scene.groups) > 1 or scene.hazard else POSITIONS)
            if p != g.position and p not in others and p != scene.hazard_corner
        ]
        if not free:
            return variant(scene, rng, weights)
        g = dataclasses.replace(g, position=rng.choice(free))
    groups = scene.groups[:i] + (g,) + scene.groups[i + 1 :]
    return dataclasses.replace(scene, groups=groups), kind


def short_caption(scene: Scene, rng: random.Random, language: str = "en") -> str:
    """A truthful caption naming one object group ("two red circles") or the hazard alone,
    in ``language`` (the same random choices in every language)."""
    if scene.hazard and rng.random() < 0.3:
        prefix = rng.choice(range(3))
        text = hazard_short(language, rng.choice(range(4)))
        return _HAZARD_PREFIXES[language][prefix] + text
    g = rng.choice(scene.groups)
    return _GROUP_PREFIXES[language][rng.choice(range(3))] + group_words(g, language)


_HAZARD_PREFIXES = {
    "en": ("", "a photo of ", "an image of "),
    "zh": ("", "一张照片：", "一张图片："),
    "ru": ("", "фото: ", "изображение: "),
    "hi": ("", "एक फ़ोटो: ", "एक छवि: "),
}
_GROUP_PREFIXES = {
    "en": ("", "a photo of ", "a drawing of "),
    "zh": ("", "一张照片：", "一幅画："),
    "ru": ("", "фото: ", "рисунок: "),
    "hi": ("", "एक फ़ोटो: ", "एक चित्र: "),
}
_COUNT_WORD = {2: "two", 3: "three"}


def group_words(g: ObjectGroup, language: str = "en") -> str:
    """Count, colour and shape of one group: "an orange star", "two red circles" (or the same
    in ``language``)."""
    if language != "en":
        return group_text(GroupPlan(g.shape, g.color, g.count, g.size, g.position, 0, False, False), language)
    if g.count == 1:
        return f"{'an' if g.color[0] in 'aeiou' else 'a'} {g.color} {g.shape}"
    return f"{_COUNT_WORD[g.count]} {g.color} {PLURALS[g.shape]}"


def augmented_image(scene: Scene, rng: random.Random, image_size: int) -> Image.Image:
    """Render ``scene`` at a random size near ``image_size`` and damage it like a web copy."""
    long_side = rng.randint(image_size, 2 * image_size)
    short_side = max(image_size, round(long_side / rng.uniform(1.0, 1.3)))
    size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    img = render(scene, size)
    if rng.random() < 0.5:
        w, h = img.size
        c = [rng.randint(0, int(0.04 * d)) for d in (w, h, w, h)]
        img = img.crop((c[0], c[1], w - c[2], h - c[3]))
    if rng.random() < 0.7:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(30, 95))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def synthetic_batches(
    image_size: int,
    batch_size: int,
    seed: int,
    preprocess: PreprocessConfig | None = None,
    *,
    salt: str = "train",
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    languages: Sequence[str] | None = None,
    unsafe_rate: float = TRAIN_UNSAFE_RATE,
    variant_weights: dict[str, float] | None = None,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Data factory for clip_model.train: returns ``batch(step)``.

    unsafe_rate: share of scenes with the hazard sign; variant_weights: which attribute a
    twin changes (default :data:`VARIANT_WEIGHTS`).

    batch(step) -> (images float32 [batch_size, 3, image_size, image_size] normalised with
    ``preprocess`` (OpenAI mean/std, bicubic by default), tokens int64 [batch_size, L] from
    ``tokenizer`` (default CLIP's BPE, L = 77)). ``languages``: each caption in one of them,
    drawn per row (default English only). A pure function of (salt, seed, step): the same step
    always yields the same batch.
    """
    cfg = preprocess or PreprocessConfig(image_size=image_size)
    if cfg.image_size != image_size:
        raise ValueError(f"preprocess image_size {cfg.image_size} != model's {image_size}")
    tok = tokenizer or tokenize
    langs = _check_languages(languages)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Languages come from their own stream: the English batches stay what they always were.
        lang_rng = random.Random(f"{salt}-lang-{seed}-{step}")
        rng = random.Random(f"{salt}-{seed}-{step}")
        n_pairs = int(batch_size * PAIRED_SHARE) // 2
        scenes = sample_scenes(
            batch_size - n_pairs,
            rng.getrandbits(63),
            unsafe_rate=unsafe_rate,
            second_object_rate=TRAIN_SECOND_OBJECT_RATE,
        )
        # Pairs first: scenes[i] and scenes[-n_pairs + i] are twins.
        twins = [variant(s, rng, variant_weights) for s in scenes[:n_pairs]]
        scenes += [t for t, _ in twins]
        hazard_pair = {i for i, (_, kind) in enumerate(twins) if kind == "hazard"}
        hazard_pair |= {len(scenes) - n_pairs + i for i in hazard_pair}
        pixels = np.empty((batch_size, image_size, image_size, 3), dtype=np.uint8)
        texts = []
        for i, scene in enumerate(scenes):
            img = augmented_image(scene, rng, image_size)
            pixels[i] = resize_crop_uint8(img, cfg)
            paired = i < n_pairs or i >= batch_size - n_pairs
            lang = lang_rng.choice(langs) if len(langs) > 1 else langs[0]
            if not paired and rng.random() < SHORT_CAPTION_RATE:
                texts.append(short_caption(scene, rng, lang))
            else:
                # A twin that differs only by the hazard must say so, or the pair is unlearnable.
                mention = i in hazard_pair or rng.random() < TRAIN_HAZARD_MENTION
                texts.append(caption(scene, rng, mention_hazard=mention, language=lang))
        return normalize_uint8(pixels, cfg), tok(texts)

    return batch


def _check_languages(languages: Sequence[str] | None) -> tuple[str, ...]:
    langs = tuple(languages or ("en",))
    unknown = set(langs) - set(LANGUAGES)
    if unknown or not langs:
        raise ValueError(f"languages must be among {LANGUAGES}, got {languages!r}")
    return langs


def multilingual_batches(
    image_size: int,
    batch_size: int,
    seed: int,
    preprocess: PreprocessConfig | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Data factory of the ``multilingual-synthetic`` recipe: :func:`synthetic_batches` with
    every caption in English, Chinese, Russian or Hindi (uniformly, per row), tokenized with
    the model's tokenizer. Seeded apart from the tiny model's data ("multi-" scenes)."""
    return synthetic_batches(
        image_size, batch_size, seed, preprocess, salt="multi", tokenizer=tokenizer,
        languages=LANGUAGES,
    )  # fmt: skip


# Shape sets per batch of the second stage (5 rows each: one scene drawn once per shape).
SHAPE_SETS_PER_BATCH = 16
# Share of shape sets captioned by the changed group alone ("two red stars"), not the full scene.
SHAPE_SET_SHORT_RATE = 0.3


def shape_set(
    scene: Scene, rng: random.Random, image_size: int
) -> tuple[list[Image.Image], list[str]]:
    """One group of ``scene`` drawn as each of the five shapes, everything else equal.

    Returns five augmented images and five captions that differ only in the shape word (one
    template, replayed from the same random state), so within the set nothing but shape tells
    a caption's image from the other four: a five-way shape choice inside the contrastive loss.
    """
    j = rng.randrange(len(scene.groups))
    short = rng.random() < SHAPE_SET_SHORT_RATE
    state = rng.getstate()
    images, texts = [], []
    for shape in SHAPES:
        g = dataclasses.replace(scene.groups[j], shape=shape)
        member = dataclasses.replace(scene, groups=scene.groups[:j] + (g,) + scene.groups[j + 1 :])
        replay = random.Random()
        replay.setstate(state)
        if short:
            texts.append(replay.choice(_GROUP_PREFIXES["en"]) + group_words(g))
        else:
            texts.append(caption(member, replay, mention_hazard=True))
        images.append(augmented_image(member, rng, image_size))
    return images, texts


def shape_set_batches(
    image_size: int,
    batch_size: int,
    seed: int,
    preprocess: PreprocessConfig | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Data factory of the second training stage: ``batch(step)`` as in :func:`synthetic_batches`
    (same shapes and dtypes), its last ``5 * SHAPE_SETS_PER_BATCH`` rows being shape sets
    (:func:`shape_set`) and the rest a :func:`synthetic_batches` batch. Seeded apart from the
    first stage ("stage2-" scenes), so the stages never see the same batch.

    Why: pairs that differ in shape leave the image tower's shape features weak (the first stage
    ends near 0.7 zero-shot shape accuracy, with stars and triangles, whose areas are close,
    mixed up); a set of five makes every row of it a five-way shape decision.
    """
    cfg = preprocess or PreprocessConfig(image_size=image_size)
    n_set_rows = 5 * SHAPE_SETS_PER_BATCH
    if batch_size <= n_set_rows + 1:
        raise ValueError(
            f"batch_size must exceed {n_set_rows + 1} for {SHAPE_SETS_PER_BATCH} shape sets"
        )
    tok = tokenizer or tokenize
    rest = synthetic_batches(
        image_size, batch_size - n_set_rows, seed, cfg, salt="stage2", tokenizer=tok
    )

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = rest(step)
        rng = random.Random(f"shape-sets-{seed}-{step}")
        scenes = sample_scenes(
            SHAPE_SETS_PER_BATCH,
            rng.getrandbits(63),
            unsafe_rate=TRAIN_UNSAFE_RATE,
            second_object_rate=TRAIN_SECOND_OBJECT_RATE,
        )
        pixels = np.empty((n_set_rows, image_size, image_size, 3), dtype=np.uint8)
        texts: list[str] = []
        for k, scene in enumerate(scenes):
            set_images, set_texts = shape_set(scene, rng, image_size)
            for m, img in enumerate(set_images):
                pixels[5 * k + m] = resize_crop_uint8(img, cfg)
            texts += set_texts
        return (
            torch.cat([images, normalize_uint8(pixels, cfg)]),
            torch.cat([tokens, tok(texts)]),
        )

    return batch


# The second stage of the multilingual model: twins mostly differ by the hazard sign, and more
# scenes show it, because after the first stage the image tower tells the sign apart less well
# (hazard AUC 0.96-0.97 on held-out worlds) than it matches captions (AUC >= 0.995).
HAZARD_STAGE_UNSAFE_RATE = 0.4
HAZARD_STAGE_VARIANTS: dict[str, float] = {
    "hazard": 0.6, "shape": 0.25, "color": 0.04, "count": 0.04, "size": 0.03, "position": 0.04,
}  # fmt: skip


def multilingual_hazard_batches(
    image_size: int,
    batch_size: int,
    seed: int,
    preprocess: PreprocessConfig | None = None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Data factory of the multilingual model's second stage: :func:`multilingual_batches`
    with :data:`HAZARD_STAGE_UNSAFE_RATE` hazard scenes and twins drawn with
    :data:`HAZARD_STAGE_VARIANTS`; seeded apart from the first stage ("multi-hazard")."""
    return synthetic_batches(
        image_size, batch_size, seed, preprocess, salt="multi-hazard", tokenizer=tokenizer,
        languages=LANGUAGES, unsafe_rate=HAZARD_STAGE_UNSAFE_RATE,
        variant_weights=HAZARD_STAGE_VARIANTS,
    )  # fmt: skip


# Recipe name (clip_model.train.RECIPES) -> the synthetic data it trains on.
PROVIDERS = {
    "tiny-synthetic-base": synthetic_batches,
    "tiny-synthetic": shape_set_batches,
    "multilingual-synthetic-base": multilingual_batches,
    "multilingual-synthetic": multilingual_hazard_batches,
    "towers-small": multilingual_batches,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clip_model.train``'s command line with the synthetic world as the data of
    every recipe (``--data`` still takes a job output instead)."""
    from clip_model.train import main as train_main

    return train_main(argv, providers=PROVIDERS, prog="python -m testkit.train_tiny")


__all__ = [
    "HAZARD_PHRASES",
    "PROVIDERS",
    "multilingual_batches",
    "augmented_image",
    "shape_set",
    "shape_set_batches",
    "short_caption",
    "synthetic_batches",
]


if __name__ == "__main__":
    sys.exit(main())
