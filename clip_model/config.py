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
    crop_rounding: how the centre crop's offset ``(side - image_size) / 2`` becomes a pixel:
        "round" (Python's round, as torchvision's CenterCrop and so OpenAI / open_clip) or
        "floor" (as transformers' image processors, e.g. Chinese-CLIP folders). They differ by
        one pixel when the excess is odd.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    crop_rounding: str = "round"

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
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(
                f"PreprocessConfig.crop_rounding must be 'round' or 'floor', "
                f"got {self.crop_rounding!r}"
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


# ---------------------------------------------------------------- towers of other families

VISION_PROJECTIONS = ("builtin", "linear", "head")
TEXT_POOLERS = ("cls", "mean")
TEXT_PROJECTIONS = ("linear", "mlp", "head", "none")


@dataclass(frozen=True)
class ResNetConfig:
    """A torchvision-layout ResNet trunk (clip_model/resnet.py).

    image_size: side of the square input, pixels (any multiple of 32).
    block: "basic" (ResNet18/34 shapes) or "bottleneck" (ResNet50/101).
    layers: blocks per stage; width: channels of the stem and first stage (64 published).
    downsample: "stride" (torchvision's, the published weights) or "maxpool" (stages 2-4 enter
        through a 2x2 max pool; for small inputs, see clip_model.resnet.ResNet).
    """

    image_size: int = 224
    block: str = "basic"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64
    downsample: str = "stride"

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got {self.block!r}")
        if len(self.layers) != 4 or any(int(n) < 1 for n in self.layers):
            raise ValueError(f"ResNet layers must be four positive ints, got {self.layers}")
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(f"ResNet image_size must be a positive multiple of 32, got {self.image_size}")
        if self.width <= 0:
            raise ValueError(f"ResNet width must be positive, got {self.width}")
        from .resnet_shapes import DOWNSAMPLING

        if self.downsample not in DOWNSAMPLING:
            raise ValueError(
                f"ResNet downsample must be {' or '.join(map(repr, DOWNSAMPLING))}, "
                f"got {self.downsample!r}"
            )

    @property
    def out_dim(self) -> int:
        """Channels of the pooled feature (width * 8, times 4 for bottlenecks)."""
        return self.width * 8 * (4 if self.block == "bottleneck" else 1)

    @classmethod
    def from_dict(cls, d: dict) -> ResNetConfig:
        """From ``{"name": "resnet18", "image_size": 64, "width": 32}`` (name sets block and
        layers) or explicit ``block`` / ``layers``."""
        d = dict(d)
        name = d.pop("name", None)
        if name is not None:
            from .resnet_shapes import RESNET_SHAPES

            if name not in RESNET_SHAPES:
                raise ValueError(f"unknown ResNet {name!r}; known: {sorted(RESNET_SHAPES)}")
            block, layers = RESNET_SHAPES[name]
            d.setdefault("block", block)
            d.setdefault("layers", layers)
        unknown = set(d) - {"image_size", "block", "layers", "width", "downsample"}
        if unknown:
            raise ValueError(f"unsupported ResNet config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {"image_size": self.image_size, "block": self.block, "layers": list(self.layers),
             "width": self.width}  # fmt: skip
        # Written only when set, so headers of torchvision-layout files stay as they were.
        if self.downsample != "stride":
            d["downsample"] = self.downsample
        return d


@dataclass(frozen=True)
class HFTextConfig:
    """A Hugging Face transformers text encoder used as a CLIP text tower.

    hf_config: the transformers config as a dict (``model_type`` and the values that differ
        from that type's defaults, as ``config.json`` holds them).
    context_length: most token ids per caption (special tokens included).
    pooler: "cls" (the first token's last hidden state) or "mean" (masked mean over tokens).
    proj: "linear", "mlp" (open_clip's Linear-GELU-Linear), "head" (Linear, GELU, Linear,
        dropout, residual, LayerNorm: the projection head of the classic Flickr30k CLIP
        recipe) or "none" (the pooled feature is the embedding).
    proj_bias: whether a "linear" projection has a bias.
    clean / lowercase: caption cleaning before tokenizing (see clip_model.hf_tokenizer).
    tokenizer: where the tokenizer lives when the weights do not carry it: a folder, a
        tokenizer.json path or a ``package://`` URI.
    """

    hf_config: dict
    context_length: int
    pooler: str = "cls"
    proj: str = "linear"
    proj_bias: bool = False
    clean: str = "none"
    lowercase: bool = False
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hf_config, dict) or "model_type" not in self.hf_config:
            raise ValueError("HFTextConfig.hf_config must be a dict with a 'model_type'")
        if self.context_length < 2:
            raise ValueError(f"HFTextConfig.context_length must be >= 2, got {self.context_length}")
        if self.pooler not in TEXT_POOLERS:
            raise ValueError(f"HFTextConfig.pooler must be one of {TEXT_POOLERS}, got {self.pooler!r}")
        if self.proj not in TEXT_PROJECTIONS:
            raise ValueError(f"HFTextConfig.proj must be one of {TEXT_PROJECTIONS}, got {self.proj!r}")

    @property
    def width(self) -> int:
        """Hidden size of the encoder (BERT's hidden_size, DistilBERT's dim)."""
        c = self.hf_config
        for key in ("hidden_size", "dim", "d_model"):
            if key in c:
                return int(c[key])
        raise ValueError(f"hf_config of type {c['model_type']!r} states no hidden size")

    def to_dict(self) -> dict:
        return {
            "hf_config": self.hf_config, "context_length": self.context_length,
            "pooler": self.pooler, "proj": self.proj, "proj_bias": self.proj_bias,
            "clean": self.clean, "lowercase": self.lowercase, "tokenizer": self.tokenizer,
        }  # fmt: skip


@dataclass(frozen=True)
class TowersConfig:
    """An image tower (our ViT, or a ResNet trunk) beside a transformers text tower.

    vision_proj: "builtin" (the ViT's own ``proj`` matrix, OpenAI layout), "linear" (a bias-free
        Linear, for ResNet trunks) or "head" (the Flickr30k projection head).
    head_dropout: dropout inside "head" projections (training only).
    family: where the layout comes from ("custom", "chinese_clip", "open_clip", "mclip"), kept
        for names and messages.
    """

    embed_dim: int
    vision: VisionConfig | ResNetConfig
    text: HFTextConfig
    vision_proj: str = "builtin"
    head_dropout: float = 0.1
    quick_gelu: bool = False
    family: str = "custom"

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ValueError(f"TowersConfig.embed_dim must be positive, got {self.embed_dim}")
        if self.vision_proj not in VISION_PROJECTIONS:
            raise ValueError(
                f"TowersConfig.vision_proj must be one of {VISION_PROJECTIONS}, got {self.vision_proj!r}"
            )
        if isinstance(self.vision, ResNetConfig) and self.vision_proj == "builtin":
            raise ValueError("a ResNet image tower needs vision_proj 'linear' or 'head'")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"TowersConfig.head_dropout must be in [0, 1), got {self.head_dropout}")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def to_dict(self) -> dict:
        if isinstance(self.vision, ResNetConfig):
            vision = {"resnet": self.vision.to_dict()}
        else:
            v = self.vision
            vision = {"vit": {"image_size": v.image_size, "layers": v.layers, "width": v.width,
                              "patch_size": v.patch_size, "head_width": v.head_width,
                              "mlp_ratio": v.mlp_ratio}}  # fmt: skip
        return {
            "type": "towers", "family": self.family, "embed_dim": self.embed_dim,
            "vision": vision, "vision_proj": self.vision_proj, "text": self.text.to_dict(),
            "head_dropout": self.head_dropout, "quick_gelu": self.quick_gelu,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> TowersConfig:
        """The inverse of to_dict; unknown keys are an error naming them."""
        d = dict(d)
        if d.pop("type", "towers") != "towers":
            raise ValueError("not a towers config")
        unknown = set(d) - {"family", "embed_dim", "vision", "vision_proj", "text",
                            "head_dropout", "quick_gelu"}  # fmt: skip
        if unknown:
            raise ValueError(f"unsupported towers config keys: {sorted(unknown)}")
        vision_d = d.get("vision") or {}
        if set(vision_d) == {"resnet"}:
            vision: VisionConfig | ResNetConfig = ResNetConfig.from_dict(vision_d["resnet"])
        elif set(vision_d) == {"vit"}:
            vision = VisionConfig(**vision_d["vit"])
        else:
            raise ValueError("towers config 'vision' needs exactly one of 'resnet' or 'vit'")
        text_d = dict(d.get("text") or {})
        unknown = set(text_d) - {"hf_config", "context_length", "pooler", "proj", "proj_bias",
                                 "clean", "lowercase", "tokenizer"}  # fmt: skip
        if unknown:
            raise ValueError(f"unsupported towers text config keys: {sorted(unknown)}")
        if "embed_dim" not in d:
            raise ValueError("towers config needs 'embed_dim'")
        return cls(
            embed_dim=int(d["embed_dim"]),
            vision=vision,
            text=HFTextConfig(**text_d),
            vision_proj=d.get("vision_proj", "builtin" if isinstance(vision, VisionConfig) else "head"),
            head_dropout=float(d.get("head_dropout", 0.1)),
            quick_gelu=bool(d.get("quick_gelu", False)),
            family=str(d.get("family", "custom")),
        )
