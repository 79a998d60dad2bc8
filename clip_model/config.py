"""Configuration dataclasses for CLIP architectures and their preprocessing.

Architecture configs (VisionConfig, TextConfig, CLIPConfig) are filled from
``clip_model/configs/<name>.json``; PreprocessConfig travels with each set of weights
(the registry in ``pretrained.py`` records one per weight).
"""

from __future__ import annotations

from dataclasses import dataclass

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into model input.

    image_size: side of the square model input, pixels.
    mean, std: per-channel normalisation applied to RGB values scaled to [0, 1].
    interpolation: "bicubic" or "bilinear" (the resize of the shortest side).
    resize_mode: "shortest" (resize shortest side then center crop, OpenAI/open_clip
        default) or "squash" (resize both sides to image_size).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"PreprocessConfig.image_size must be > 0, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("PreprocessConfig.mean and .std need three values (RGB)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"PreprocessConfig.std must be positive, got {self.std}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(
                f"PreprocessConfig.interpolation must be 'bicubic' or 'bilinear', "
                f"got {self.interpolation!r}"
            )
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(
                f"PreprocessConfig.resize_mode must be 'shortest' or 'squash', "
                f"got {self.resize_mode!r}"
            )
