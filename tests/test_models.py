"""Tests for cl_lib.models: shapes, the CIFAR stem, heads, autocast and memory formats."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from cl_lib.models import (
    ContrastiveModel,
    ProjectionHead,
    SmallCNN,
    build_model,
    cifar_resnet18,
)


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [32, 96])
def test_small_cnn_shapes(size: int) -> None:
    net = SmallCNN()
    assert net.out_dim == 128
    assert net(_images(3, size)).shape == (3, 128)


def test_small_cnn_custom_widths_and_channels() -> None:
    net = SmallCNN(in_channels=1, widths=(8, 12))
    assert net.out_dim == 12
    assert net(_images(2, 32, channels=1)).shape == (2, 12)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == len(pools) == 2
    assert all(c.kernel_size == (3, 3) for c in convs)


@pytest.mark.parametrize("size", [32, 96])
def test_resnet18_shapes(size: int) -> None:
    net = cifar_resnet18().eval()
    assert net.out_dim == 512
    with torch.no_grad():
        assert net(_images(2, size)).shape == (2, 512)


def test_resnet18_cifar_stem_and_parameter_count() -> None:
    net = cifar_resnet18()
    ref = torchvision.models.resnet18(weights=None)
    assert net.conv1.kernel_size == (3, 3)
    assert net.conv1.stride == (1, 1)
    assert net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert isinstance(net.fc, nn.Identity)

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # everything but the stem conv (and the removed classifier) is the torchvision ResNet-18
    assert count(net) - count(net.conv1) == count(ref) - count(ref.conv1) - count(ref.fc)
    assert count(net.conv1) == 3 * 64 * 3 * 3
    # stride 1 and no max-pool: the first stage keeps the input resolution
    feats = {}
    net.layer1.register_forward_hook(lambda m, i, o: feats.setdefault("layer1", o))
    with torch.no_grad():
        net.eval()(_images(2, 32))
    assert feats["layer1"].shape[-2:] == (32, 32)


def test_projection_head_structure() -> None:
    head = ProjectionHead(128, hidden_dim=64, out_dim=32, num_layers=3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 64), (64, 64), (64, 32)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2
    assert head(torch.randn(5, 128)).shape == (5, 32)
    single = ProjectionHead(10, out_dim=4, num_layers=1, batch_norm=False)
    assert isinstance(single.net[0], nn.Linear) and len(single.net) == 1


def test_contrastive_model_outputs() -> None:
    model = build_model("small_cnn", head_hidden=64, head_out=16)
    h, z = model(_images(4, 32))
    assert h.shape == (4, 128) and z.shape == (4, 16)
    assert (model.rep_dim, model.proj_dim) == (128, 16)
    # h is the backbone output, z the head applied to it
    model.eval()
    with torch.no_grad():
        h, z = model(_images(4, 32))
        torch.testing.assert_close(h, model.backbone(_images(4, 32)))
        torch.testing.assert_close(z, model.head(h))


def test_contrastive_model_without_head() -> None:
    model = ContrastiveModel(SmallCNN(widths=(8, 16)), None)
    h, z = model(_images(2, 32))
    assert z is h and h.shape == (2, 16)
    assert build_model("small_cnn", head_layers=0).head is None


def test_gradients_reach_the_stem() -> None:
    model = build_model("small_cnn")
    _, z = model(_images(4, 32))
    z.square().sum().backward()
    grad = model.backbone.features[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_autocast_bfloat16(name: str) -> None:
    model = build_model(name).eval()
    x = _images(2, 32)
    with torch.no_grad():
        h32, z32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h16, z16 = model(x)
    assert h16.shape == h32.shape and z16.shape == z32.shape
    assert torch.isfinite(h16).all() and torch.isfinite(z16).all()
    rel = (h16.float() - h32).norm() / h32.norm()
    assert rel < 0.05


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_channels_last_matches_contiguous(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = _images(2, 32, seed=1)
    with torch.no_grad():
        h, z = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        h_cl, z_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(h_cl, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z_cl, z, rtol=1e-4, atol=1e-5)


def test_build_model_in_channels() -> None:
    model = build_model("resnet18", in_channels=1, head_layers=1, head_out=8)
    assert model.backbone.conv1.in_channels == 1
    assert model.proj_dim == 8 and model.rep_dim == 512


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="small_cnn, resnet18.*vgg"):
        build_model("vgg")
    with pytest.raises(ValueError, match="in_channels"):
        SmallCNN(in_channels=0)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(widths=())
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(8, num_layers=0)
    with pytest.raises(ValueError, match="head_layers"):
        build_model("small_cnn", head_layers=-1)
    with pytest.raises(ValueError, match="out_dim"):
        ContrastiveModel(nn.Linear(3, 3))
