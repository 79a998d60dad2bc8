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


@dataclass(frozen=True)
class VisionConfig:
    """The image tower.

    image_size: side of the square input, pixels.
    layers: transformer depth (ViT) or blocks per stage, four ints (ModifiedResNet).
    width: ViT hidden size, or the ResNet stem width (stage widths are 4x, 8x, 16x, 32x it).
    patch_size: ViT patch side in pixels; None for ModifiedResNet.
    head_width: channels per attention head (ViT blocks and the ResNet attention pool).
    mlp_ratio: ViT MLP hidden size / width.
    """

    image_size: int = 224
    layers: int | tuple[int, ...] = 12
    width: int = 768
    patch_size: int | None = 32
    head_width: int = 64
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.is_resnet:
            # open_clip's schema writes "patch_size": null for ResNets or leaves it out.
            object.__setattr__(self, "patch_size", None)
            if len(self.layers) != 4 or any(n <= 0 for n in self.layers):
                raise ValueError(f"ResNet layers must be four positive ints, got {self.layers}")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
            if (self.width * 32) % self.head_width:
                raise ValueError("ResNet width * 32 must be divisible by head_width")
        else:
            if self.patch_size is None or self.patch_size <= 0:
                raise ValueError("a ViT vision config needs a positive patch_size")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.layers <= 0:
                raise ValueError(f"ViT layers must be positive, got {self.layers}")
            if self.width % self.head_width:
                raise ValueError(f"ViT width {self.width} not divisible by head_width {self.head_width}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        """Attention heads: of each ViT block, or of the ResNet attention pool."""
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass(frozen=True)
class TextConfig:
    """The causal text transformer (tokens -> EOT feature)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if min(self.context_length, self.vocab_size, self.width, self.heads, self.layers) <= 0:
            raise ValueError(f"TextConfig values must be positive: {self}")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} not divisible by heads {self.heads}")


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP architecture; embed_dim is the size of the shared embedding space."""

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    quick_gelu: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        """Build from open_clip's model_configs JSON schema (unknown keys are an error)."""
        vision_keys = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
        text_keys = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
        vcfg, tcfg = dict(d.get("vision_cfg", {})), dict(d.get("text_cfg", {}))
        extra = (set(vcfg) - vision_keys) | (set(tcfg) - text_keys)
        extra |= set(d) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
        if extra:
            raise ValueError(f"unsupported architecture config keys: {sorted(extra)}")
        if "embed_dim" not in d:
            raise ValueError("architecture config needs 'embed_dim'")
        return cls(
            embed_dim=int(d["embed_dim"]),
            vision=VisionConfig(**vcfg),
            text=TextConfig(**tcfg),
            quick_gelu=bool(d.get("quick_gelu", False)),
        )

    def to_dict(self) -> dict:
        """The inverse of from_dict (open_clip's schema)."""
        v, t = self.vision, self.text
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": {
                "image_size": v.image_size,
                "layers": list(v.layers) if v.is_resnet else v.layers,
                "width": v.width,
                "patch_size": v.patch_size,
                "head_width": v.head_width,
                "mlp_ratio": v.mlp_ratio,
            },
            "text_cfg": {
                "context_length": t.context_length,
                "vocab_size": t.vocab_size,
                "width": t.width,
                "heads": t.heads,
                "layers": t.layers,
                "mlp_ratio": t.mlp_ratio,
            },
        }
