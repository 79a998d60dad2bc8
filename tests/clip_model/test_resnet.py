"""clip_model.resnet equals torchvision's ResNet18/34/50 (same weights, same outputs): the
runtime carries its own ResNet because it ships without torchvision."""

from __future__ import annotations

import pytest
import torch

from clip_model.config import ResNetConfig
from clip_model.resnet import RESNET_SHAPES, ResNet


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_matches_torchvision_features(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    # Non-trivial BatchNorm statistics and gains, so eval-mode BN is really exercised.
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    block, layers = RESNET_SHAPES[name]
    ours = ResNet(block, layers).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(sd, strict=True)  # the same keys and shapes, torchvision's layout
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(ref.children())[:-1])  # everything but fc
        want = trunk(x).flatten(1)
        got = ours(x)
    assert got.shape == (2, ours.out_dim) == (2, ref.fc.in_features)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_narrow_resnet_shapes_and_config_errors():
    cfg = ResNetConfig.from_dict({"name": "resnet18", "image_size": 64, "width": 32})
    assert (cfg.block, cfg.layers, cfg.out_dim) == ("basic", (2, 2, 2, 2), 256)
    net = ResNet(cfg.block, cfg.layers, cfg.width)
    assert net(torch.randn(3, 3, 64, 64)).shape == (3, 256)
    assert ResNetConfig.from_dict({"name": "resnet50", "width": 16}).out_dim == 512
    with pytest.raises(ValueError, match="unknown ResNet"):
        ResNetConfig.from_dict({"name": "resnet19"})
    with pytest.raises(ValueError, match="multiple of 32"):
        ResNetConfig(image_size=70)
    with pytest.raises(ValueError, match="unsupported ResNet config keys"):
        ResNetConfig.from_dict({"name": "resnet18", "depth": 3})
    with pytest.raises(ValueError, match="downsample must be 'stride' or 'maxpool'"):
        ResNetConfig.from_dict({"name": "resnet18", "downsample": "avgpool"})


def test_maxpool_downsampling_matches_torchvision_with_pooled_stage_entries():
    """downsample="maxpool": torchvision's ResNet18 with the stage-entry strides set to 1 and a
    2x2 max pool in front of stages 2-4 is the reference; same state dict, same outputs."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    for stage in (ref.layer2, ref.layer3, ref.layer4):
        stage[0].conv1.stride = (1, 1)
        stage[0].downsample[0].stride = (1, 1)
        stage.register_forward_pre_hook(lambda _m, args: (torch.nn.functional.max_pool2d(args[0], 2),))
    cfg = ResNetConfig.from_dict({"name": "resnet18", "image_size": 64, "downsample": "maxpool"})
    assert ResNetConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["downsample"] == "maxpool"
    assert "downsample" not in ResNetConfig.from_dict({"name": "resnet18"}).to_dict()
    ours = ResNet(cfg.block, cfg.layers, cfg.width, cfg.downsample).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = torch.nn.Sequential(*list(ref.children())[:-1])(x).flatten(1)
        got = ours(x)
        strided = ResNet(cfg.block, cfg.layers, cfg.width).eval()
        strided.load_state_dict(ours.state_dict())
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(strided(x), got, atol=1e-2)  # the option really changes the net
