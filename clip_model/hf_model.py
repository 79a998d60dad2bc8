"""CLIPs whose text tower is a Hugging Face transformers encoder (BERT, RoBERTa / XLM-R,
DistilBERT, Chinese-CLIP's BERT), beside our ViT or a ResNet trunk.

One module, :class:`TowerCLIP`, serves every such family; the state-dict layout is open_clip's
``CustomTextCLIP`` (``visual.*``, ``text.transformer.*``, ``text.proj.*``, ``logit_scale``), so
open_clip's HF-text checkpoints load unchanged and the other layouts (Chinese-CLIP folders,
sentence-transformers folders) are renamed into it by clip_model.hf_formats.

``transformers`` is an optional extra (``pip install 'clipcurate[hf]'``), imported only when such
a model is built. Token ids come in right-padded with the tokenizer's pad id; the attention
mask and the mean pooling are derived from it, so callers pass ids only, as for CLIP.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import HFTextConfig, PreprocessConfig, ResNetConfig, TowersConfig
from .hf_tokenizer import HF_EXTRA_HINT, MissingExtraError

__all__ = ["HF_EXTRA_HINT", "MissingExtraError", "TowerCLIP", "require_transformers"]


def require_transformers() -> Any:
    """Import transformers, or raise one error naming the extra that brings it."""
    try:
        import transformers
    except ImportError as e:
        raise MissingExtraError(
            f"this model's text tower runs on Hugging Face transformers, which is not installed: "
            f"{HF_EXTRA_HINT}"
        ) from e
    return transformers


def hf_config_object(hf_config: dict) -> Any:
    """A transformers PretrainedConfig from its dict form (no hub access)."""
    transformers = require_transformers()
    d = dict(hf_config)
    model_type = d.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(key, None)
    try:
        return transformers.AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise ValueError(f"transformers does not know text model type {model_type!r}: {e}") from e


def build_hf_encoder(hf_config: dict) -> nn.Module:
    """The bare encoder (no pooler layer, no head) for a transformers config dict."""
    transformers = require_transformers()
    config = hf_config_object(hf_config)
    if config.model_type == "chinese_clip_text_model":
        # Chinese-CLIP's text tower is not in AutoModel's table (only the two-tower model is).
        cls = transformers.ChineseCLIPTextModel
    else:
        try:
            cls = transformers.AutoModel._model_mapping[type(config)]
        except KeyError as e:
            raise ValueError(f"no transformers encoder for model type {config.model_type!r}") from e
    kwargs = {}
    # BERT-family encoders carry a pooler layer CLIP towers never use (and checkpoints omit).
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return cls(config, **kwargs)


class ProjectionHead(nn.Module):
    """The projection head of the classic Flickr30k CLIP recipe: Linear to ``dim``, then
    GELU -> Linear -> dropout added back to the first projection, then LayerNorm."""

    def __init__(self, in_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, dim)
        self.fc = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(F.gelu(projected)))
        return self.layer_norm(x + projected)


def _projection(kind: str, in_dim: int, out_dim: int, *, bias: bool, dropout: float) -> nn.Module:
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"no projection, but width {in_dim} != embed_dim {out_dim}")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=bias)
    if kind == "mlp":
        hidden = (in_dim + out_dim) // 2  # open_clip's HFTextEncoder 'mlp'
        return nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False)
        )
    if kind == "head":
        return ProjectionHead(in_dim, out_dim, dropout)
    raise ValueError(f"unknown projection {kind!r}")


class HFTextTower(nn.Module):
    """ids [N, L] right-padded with ``pad_id`` -> [N, embed_dim] (not normalised)."""

    def __init__(self, cfg: HFTextConfig, embed_dim: int, pad_id: int, dropout: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.transformer = build_hf_encoder(cfg.hf_config)
        self.proj = _projection(
            cfg.proj, cfg.width, embed_dim, bias=cfg.proj_bias, dropout=dropout
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        # Columns that are padding in every row change nothing (absolute or pad-aware
        # positions, masked attention and pooling): cut them, as CLIP stops at the last EOT.
        used = mask.any(dim=0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1
        ids, mask = ids[:, :width], mask[:, :width]
        out = self.transformer(input_ids=ids, attention_mask=mask.long())
        hidden = out[0]
        if self.cfg.pooler == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return self.proj(pooled)


class ResNetTower(nn.Module):
    """ResNet trunk (torchvision layout, ``visual.trunk.*``) and its projection (``visual.head``)."""

    def __init__(self, cfg: ResNetConfig, embed_dim: int, proj: str, dropout: float) -> None:
        super().__init__()
        from .resnet import ResNet

        self.trunk = ResNet(cfg.block, cfg.layers, cfg.width, cfg.downsample)
        self.head = _projection(proj, self.trunk.out_dim, embed_dim, bias=False, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class TowerCLIP(nn.Module):
    """A CLIP made of an image tower and a transformers text tower (see the module docstring).

    Attributes the factory sets, as for :class:`clip_model.model.CLIP`: ``name``,
    ``weights_sha256``, ``preprocess_cfg``; ``tokenizer`` is given at construction (an
    :class:`clip_model.hf_tokenizer.HFTokenizer`, whose pad id drives the attention mask).
    """

    def __init__(self, cfg: TowersConfig, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.name: str = "custom"
        self.weights_sha256: str | None = None
        self.preprocess_cfg = PreprocessConfig(image_size=cfg.image_size)
        self._tokenizer = tokenizer
        if tokenizer.context_length != cfg.text.context_length:
            self._tokenizer = tokenizer.with_context_length(cfg.text.context_length)
        if isinstance(cfg.vision, ResNetConfig):
            self.visual: nn.Module = ResNetTower(
                cfg.vision, cfg.embed_dim, cfg.vision_proj, cfg.head_dropout
            )
        else:
            from .transformer import VisionTransformer

            if cfg.vision_proj != "builtin":
                raise ValueError("ViT image towers use their builtin projection")
            self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        self.text = HFTextTower(cfg.text, cfg.embed_dim, tokenizer.pad_id, cfg.head_dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if not any(p.is_meta for p in self.parameters()) and not isinstance(
            cfg.vision, ResNetConfig
        ):
            self._init_vit()

    @torch.no_grad()
    def _init_vit(self) -> None:
        v = self.visual
        scale = v.transformer.width**-0.5
        nn.init.normal_(v.class_embedding, std=scale)
        nn.init.normal_(v.positional_embedding, std=scale)
        nn.init.normal_(v.proj, std=scale)
        nn.init.normal_(v.conv1.weight, std=(3 * v.conv1.kernel_size[0] ** 2) ** -0.5)
        from .model import _init_transformer

        _init_transformer(v.transformer)

    # -- the contract every clip_model model keeps -------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """Torch-free, picklable: ``token_ids(texts)``, ``pad_id``, ``context_length``."""
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return self.cfg.text.context_length

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images: [N, 3, S, S] float, normalised as ``preprocess_cfg`` says.
        Returns [N, embed_dim]; unit L2 norm when normalize=True."""
        s = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (s, s):
            raise ValueError(f"encode_image expects [N, 3, {s}, {s}], got {tuple(images.shape)}")
        x = self.visual(images.to(self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens: [N, L] int ids (L <= context_length) right-padded with ``tokenizer.pad_id``.
        Returns [N, embed_dim]; unit L2 norm when normalize=True."""
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"encode_text expects [N, L<={self.context_length}] token ids, "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point:
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        if tokens.shape[0] == 0:
            return torch.zeros((0, self.embed_dim), dtype=self.dtype, device=tokens.device)
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [N_img, N_txt], logits_per_text): cosines times exp(logit_scale)."""
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()
