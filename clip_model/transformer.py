"""CLIP's building blocks: pre-norm transformer blocks, the ViT image tower and ModifiedResNet.

Parameter names follow OpenAI's / open_clip's layout (``attn.in_proj_weight``, ``mlp.c_fc``,
``attnpool.q_proj`` ...), so their state dicts load without renaming. Attention goes through
``F.scaled_dot_product_attention``, which picks a fused kernel on every backend. Tensors are
batch-first throughout: [batch, tokens, channels].
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype (fp16/bf16 weights or autocast alike).

    The fused kernels of every backend accumulate mean and variance of fp16/bf16 inputs in
    fp32, so the statistics are as exact as OpenAI's upcast-then-normalise; upcasting the whole
    activation first would only add two casts per norm (about a fifth of a ViT's GPU time).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed q/k/v projection (nn.MultiheadAttention's keys)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x: [N, L, width] -> [N, L, width]; causal=True lets token i see tokens <= i only."""
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0's output alone (what ``forward(x)[:, :1]`` gives, without causal masking):
        x [N, L, width] -> [N, 1, width]. Its query is projected and attended; keys and
        values are every token's."""
        n, length, width = x.shape
        head = width // self.heads
        w_q, w_kv = self.in_proj_weight[:width], self.in_proj_weight[width:]
        b_q, b_kv = self.in_proj_bias[:width], self.in_proj_bias[width:]
        q = F.linear(x[:, :1], w_q, b_q).view(n, 1, self.heads, head).transpose(1, 2)
        kv = F.linear(x, w_kv, b_kv).view(n, length, 2, self.heads, head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.out_proj(out.transpose(1, 2).reshape(n, 1, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=QuickGELU() if quick_gelu else nn.GELU(),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def first_token(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[:, :1]`` (no causal mask) at a fraction of the cost: [N, L, w] -> [N, 1, w]."""
        y = x[:, :1] + self.attn.first_token(self.ln_1(x))
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    """A stack of ResidualAttentionBlocks (keys ``resblocks.<i>.*``)."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool
    ) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """ViT image tower: patches + class token -> transformer -> ln_post(class token) @ proj."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        assert cfg.patch_size is not None
        self.image_size = cfg.image_size
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, S, S] normalised pixels -> [N, output_dim] (not unit norm)."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        # Only the class token is pooled, and in the last block no other token reads from
        # it afterwards: that block computes the class token's output alone (a ~quarter of a
        # 4-layer tower's work skipped, the same values up to float summation order).
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        x = blocks[-1].first_token(x)[:, 0] if len(blocks) else x[:, 0]
        # LayerNorm acts per token, so normalising only the pooled class token is exact.
        return self.ln_post(x) @ self.proj


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an avgpool after conv2 (anti-aliased), not a conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Sequential | None = None
        if stride > 1 or inplanes != out:
            # Keys "-1"/"0"/"1" are OpenAI's; "-1" (the pool) has no parameters.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Pools a feature map with one attention query: the mean of all positions."""

    def __init__(self, spatial: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(spatial * spatial + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W] -> [N, output_dim]."""
        n, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        hd = c // self.heads
        # Only the mean token's output is used, so only it is projected as a query.
        q = self.q_proj(x[:, :1]).view(n, 1, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(n, -1, self.heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(n, -1, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, hd]
        return self.c_proj(out.reshape(n, c))


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with avgpool, anti-aliased strides, attention pooling."""

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        assert isinstance(cfg.layers, tuple)
        self.image_size = cfg.image_size
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for i, blocks in enumerate(cfg.layers):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, S, S] normalised pixels -> [N, output_dim] (not unit norm)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)
