"""Encoders and projection heads for contrastive training.

* :class:`SmallCNN` - a four-block CNN that trains in about a minute on a laptop CPU;
* :func:`cifar_resnet18` - ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool);
* :class:`ProjectionHead` - the MLP between the representation ``h`` and the projection ``z``;
* :class:`ContrastiveModel` - backbone + optional head, ``forward(x) -> (h, z)``;
* :func:`build_model` - build one of the above by name.

Every backbone has an ``out_dim`` attribute: the dimension of its representation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

BACKBONES = ("small_cnn", "resnet18")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class SmallCNN(nn.Module):
    """Blocks of conv3x3-BN-ReLU-maxpool2, then global average pooling.

    The representation has ``out_dim = widths[-1]`` dimensions. Inputs need a
    spatial size of at least ``2 ** len(widths)`` (16 for the default widths).
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must be a non-empty sequence of ints >= 1, got ()")
        for w in widths:
            _check_int("widths[i]", w, 1)
        blocks: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            blocks += [
                nn.Conv2d(prev, w, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            prev = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, out_dim) representations."""
        return torch.flatten(self.pool(self.features(x)), 1)


def cifar_resnet18(in_channels: int = 3) -> nn.Module:
    """Torchvision ResNet-18 (random init) with the CIFAR stem and no classifier.

    ``conv1`` is a 3x3 stride-1 convolution, ``maxpool`` and ``fc`` are identities,
    so the output is the 512-d pooled representation (``out_dim = 512``).
    """
    _check_int("in_channels", in_channels, 1)
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.out_dim = 512
    return net


class ProjectionHead(nn.Module):
    """MLP ``Linear-BN-ReLU-...-Linear`` with ``num_layers`` linear layers.

    ``num_layers = 1`` is a single linear map. With ``batch_norm`` the hidden
    linear layers have no bias (the BN shift replaces it).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 256,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_int("in_dim", in_dim, 1)
        _check_int("hidden_dim", hidden_dim, 1)
        _check_int("out_dim", out_dim, 1)
        _check_int("num_layers", num_layers, 1)
        layers: list[nn.Module] = []
        prev = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(prev, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            prev = hidden_dim
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, h: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.net(h)


class ContrastiveModel(nn.Module):
    """A backbone followed by an optional projection head.

    ``forward(x)`` returns ``(h, z)``: ``h`` the representation (before the
    head, used for evaluation), ``z`` the projection (fed to the loss; ``z is h``
    when there is no head). ``rep_dim`` and ``proj_dim`` are their dimensions.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        rep_dim = getattr(backbone, "out_dim", None)
        if not isinstance(rep_dim, int):
            raise ValueError(
                "backbone must have an int attribute out_dim (its representation size)"
            )
        self.backbone = backbone
        self.head = head
        self.rep_dim = rep_dim
        if head is None:
            self.proj_dim = rep_dim
        else:
            proj_dim = getattr(head, "out_dim", None)
            if not isinstance(proj_dim, int):
                raise ValueError("head must be None or have an int attribute out_dim")
            self.proj_dim = proj_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images -> (representation h, projection z)."""
        h = self.backbone(x)
        z = h if self.head is None else self.head(h)
        return h, z


def build_backbone(name: str, *, in_channels: int = 3) -> nn.Module:
    """A backbone by name: ``"small_cnn"`` or ``"resnet18"``."""
    if name == "small_cnn":
        return SmallCNN(in_channels)
    if name == "resnet18":
        return cifar_resnet18(in_channels)
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {name!r}")


def build_model(
    backbone: str,
    *,
    in_channels: int = 3,
    head_hidden: int = 256,
    head_out: int = 128,
    head_layers: int = 2,
) -> ContrastiveModel:
    """Backbone by name plus a projection head (``head_layers = 0``: no head, ``z = h``)."""
    _check_int("head_layers", head_layers, 0)
    net = build_backbone(backbone, in_channels=in_channels)
    head = None
    if head_layers > 0:
        head = ProjectionHead(net.out_dim, head_hidden, head_out, num_layers=head_layers)
    return ContrastiveModel(net, head)
