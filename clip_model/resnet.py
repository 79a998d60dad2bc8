"""ResNet image trunks (He et al. 2015) in torchvision's state-dict layout: ResNet18/34/50 and
narrower or shallower variants of the same shapes.

Why not timm or torchvision (open_clip builds its timm towers with timm): both import
torchvision, which the runtime does not ship (a GPU image would carry a second CUDA-bound
package for four modules' worth of code), and timm adds ~1,000 model files for one family. The
layer names equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``
...), so a torchvision ResNet's weights load here unchanged; ``tests/clip_model`` checks the
outputs against torchvision's resnet18/34/50 to float precision.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet_shapes import DOWNSAMPLING, RESNET_SHAPES

__all__ = ["DOWNSAMPLING", "RESNET_SHAPES", "BasicBlock", "Bottleneck", "ResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages, global average pool.

    block: "basic" (ResNet18/34) or "bottleneck" (ResNet50/101).
    layers: blocks per stage.
    width: channels of the stem and the first stage (64 in the published nets); stage i has
        width * 2**i (times 4 at a bottleneck's output).
    downsample: how stages 2-4 halve the resolution. "stride": the first block's convolutions
        stride 2 (torchvision, the published weights). "maxpool": a 2x2 max pool before the
        stage and stride-1 blocks; the same parameters and state-dict names, so only the
        forward differs. Why offer it: at 64 px inputs, where objects are 9-23 px, the strided
        trunk needs about twice the steps to learn their outlines (bench/small_object_shape.py:
        shape 0.33 / 0.71 at 200 / 400 steps against 0.69 / 0.94), and 600 contrastive steps on
        a job's output left it at zero-shot colour 0.00-0.24 against 0.81-0.88 (towers-small in
        bench/RESULTS.md). The same multiply-adds: each stage runs at the resolution it had.
    forward: [N, 3, H, W] float -> [N, out_dim] pooled features (no classifier; ``out_dim`` is
    width * 8 for basic blocks, width * 32 for bottlenecks).
    """

    def __init__(
        self, block: str, layers: tuple[int, ...], width: int = 64, downsample: str = "stride"
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
        self.pool_stages = downsample == "maxpool"
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive ints, got {layers}")
        cls = BasicBlock if block == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = width
        for i, n in enumerate(layers):
            stage_width = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 0 and not self.pool_stages) else 1
                blocks.append(cls(in_ch, stage_width, stride))
                in_ch = stage_width * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_dim = in_ch
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        """torchvision's init with its ``zero_init_residual=True``: Kaiming-normal convs
        (fan_out), BN gain 1 / bias 0, and the last BN of every residual branch zeroed so each
        block starts as the identity (trains from scratch more stably, Goyal et al. 2017)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        for stage in (self.layer2, self.layer3, self.layer4):
            x = stage(nn.functional.max_pool2d(x, 2) if self.pool_stages else x)
        return x.mean(dim=(2, 3))
