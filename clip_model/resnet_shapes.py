"""The published ResNet depths and the trunk's downsampling choices (torch-free, so configs
validate without importing torch)."""

RESNET_SHAPES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# How stages 2-4 halve the resolution (clip_model.resnet.ResNet): torchvision's strided
# convolutions, or a 2x2 max pool in front of stride-1 blocks.
DOWNSAMPLING: tuple[str, ...] = ("stride", "maxpool")
