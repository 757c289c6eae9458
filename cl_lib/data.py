"""Labelled image sets held in memory, the synthetic shapes, and positive-view sampling.

Everything here returns an :class:`ImageData`: uint8 images ``(N, C, H, W)`` with int64
labels. Training moves the whole set to the device once and augments batches there
(:mod:`cl_lib.augment`), so no per-sample Python runs in the training loop.

Datasets (:func:`load_dataset`):

* ``"shapes"``: synthetic 32x32 shapes drawn by :class:`ShapesRenderer`, a class-conditional
  distribution we can sample from at will (the "label oracle" of the prototype-bias chapter);
* ``"digits"``: scikit-learn's 8x8 handwritten digits, upscaled (no download needed);
* ``"cifar10"``, ``"cifar100"``, ``"stl10"``: the torchvision datasets (download once).

Unlabelled images (STL-10's ``"unlabeled"`` split) carry the label :data:`UNLABELLED` (-1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

UNLABELLED = -1
"""Label of an image without a class (STL-10's unlabelled split)."""

SHAPE_CLASSES: tuple[str, ...] = (
    "disc",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "bar",
    "half-disc",
    "crescent",
    "ell",
)
"""The ten classes of the synthetic shapes. The tenth, an L-shape, replaces the diamond of
earlier prototypes (a diamond is a rotated square, hence nearly indistinguishable from it)."""

DATASETS: tuple[str, ...] = ("shapes", "digits", "cifar10", "cifar100", "stl10")
"""Names accepted by :func:`load_dataset`."""


# --------------------------------------------------------------------------------------------
# ImageData
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageData:
    """An in-memory labelled image set: uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``.

    Labels lie in ``[0, len(classes))``; :data:`UNLABELLED` (-1) marks an image without a class.
    Equality is identity (comparing tensors elementwise has no single truth value).
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        """Check dtypes, shapes and the label range (one host sync, at construction only)."""
        if not isinstance(self.images, Tensor) or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor, got {_describe(self.images)}")
        if self.images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if not isinstance(self.labels, Tensor) or self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor, got {_describe(self.labels)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},) to match images, "
                f"got {tuple(self.labels.shape)}"
            )
        if self.labels.device != self.images.device:
            raise ValueError(
                f"labels must be on the images' device {self.images.device}, "
                f"got {self.labels.device}"
            )
        if not isinstance(self.classes, tuple) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a tuple of str, got {self.classes!r}")
        if len(self.classes) == 0:
            raise ValueError("classes must not be empty")
        if self.labels.numel() > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < UNLABELLED or hi >= len(self.classes):
                raise ValueError(
                    f"labels must lie in [0, {len(self.classes)}) (or be {UNLABELLED} for "
                    f"unlabelled images), got values in [{lo}, {hi}]"
                )

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        """Device the images live on."""
        return self.images.device

    def subset(self, index: Tensor) -> ImageData:
        """The images at ``index`` (int64 indices or a boolean mask), classes unchanged."""
        if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.bool):
            raise ValueError(f"index must be an int64 or bool tensor, got {_describe(index)}")
        index = index.to(self.images.device)
        return ImageData(self.images[index], self.labels[index], self.classes)

    def to(self, device: torch.device | str) -> ImageData:
        """A copy on ``device`` (images stay uint8: 4x less memory than float)."""
        return ImageData(self.images.to(device), self.labels.to(device), self.classes)

    def to_float(self, device: torch.device | str | None = None) -> Tensor:
        """Images as float32 in ``[0, 1]``, optionally moved to ``device`` first."""
        images = self.images if device is None else self.images.to(device)
        return images.float().div_(255.0)

    def class_counts(self) -> Tensor:
        """Number of labelled images per class, int64 ``(len(classes),)``."""
        labelled = self.labels[self.labels >= 0]
        return torch.bincount(labelled, minlength=len(self.classes))


def _describe(x: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------
# Random-number helpers (device-agnostic, explicit generators)
# --------------------------------------------------------------------------------------------


def _rand(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform [0, 1) numbers drawn with ``generator`` on its own device, moved to ``device``."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Standard normal numbers drawn with ``generator`` on its own device, moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


# --------------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------------


def _box(u: Tensor, v: Tensor, half_u: float, half_v: float) -> Tensor:
    """Exact signed distance to an axis-aligned box centred at the origin."""
    du, dv = u.abs() - half_u, v.abs() - half_v
    outside = torch.sqrt(du.clamp(min=0) ** 2 + dv.clamp(min=0) ** 2)
    return outside + torch.maximum(du, dv).clamp(max=0)


def _disc(u: Tensor, v: Tensor, radius: float = 1.0, cu: float = 0.0, cv: float = 0.0) -> Tensor:
    """Signed distance to a disc."""
    return torch.sqrt((u - cu) ** 2 + (v - cv) ** 2) - radius


def _triangle(u: Tensor, v: Tensor) -> Tensor:
    """Equilateral triangle of circumradius 1 (max of its three edge half-planes)."""
    dist = None
    for k in range(3):
        angle = math.pi / 2 + k * 2 * math.pi / 3 + math.pi / 3  # edge normals, apex at +v
        d = u * math.cos(angle) + v * math.sin(angle) - 0.5
        dist = d if dist is None else torch.maximum(dist, d)
    return dist


def _star(u: Tensor, v: Tensor, radius: float = 1.0, inner: float = 0.45) -> Tensor:
    """Five-pointed star (I. Quilez's exact signed distance ``sdStar5``)."""
    k1u, k1v = 0.809016994375, -0.587785252292
    k2u, k2v = -k1u, k1v
    u = u.abs()
    d = (k1u * u + k1v * v).clamp(min=0)
    u, v = u - 2 * d * k1u, v - 2 * d * k1v
    d = (k2u * u + k2v * v).clamp(min=0)
    u, v = u - 2 * d * k2u, v - 2 * d * k2v
    u = u.abs()
    v = v - radius
    bau, bav = -inner * k1v, inner * k1u - 1.0
    h = ((u * bau + v * bav) / (bau * bau + bav * bav)).clamp(0.0, radius)
    dist = torch.sqrt((u - bau * h) ** 2 + (v - bav * h) ** 2)
    return dist * torch.sign(v * bau - u * bav)


def _shape_distance(class_id: int, u: Tensor, v: Tensor) -> Tensor:
    """Signed distance (negative inside) of shape ``class_id`` in its unit frame (radius ~1)."""
    name = SHAPE_CLASSES[class_id]
    if name == "disc":
        return _disc(u, v)
    if name == "square":
        return _box(u, v, 0.75, 0.75)
    if name == "triangle":
        return _triangle(u, v)
    if name == "star":
        return _star(u, v)
    if name == "cross":
        return torch.minimum(_box(u, v, 0.95, 0.28), _box(u, v, 0.28, 0.95))
    if name == "ring":
        return (torch.sqrt(u**2 + v**2) - 0.72).abs() - 0.26
    if name == "bar":
        return _box(u, v, 1.0, 0.3)
    if name == "half-disc":
        return torch.maximum(_disc(u, v, 1.0, 0.0, -0.45), -(v + 0.45))
    if name == "crescent":
        return torch.maximum(_disc(u, v), -_disc(u, v, 0.82, 0.5, 0.0))
    if name == "ell":
        return torch.minimum(_box(u + 0.5, v, 0.3, 0.85), _box(u, v + 0.55, 0.8, 0.3))
    raise AssertionError(f"no distance function for {name}")  # pragma: no cover


class ShapesRenderer:
    """Class-conditional distribution of the synthetic shapes (the "label oracle").

    One image: a shape of the given class, centred within ``position`` of the image centre,
    radius ``scale`` (fractions of the half-width), rotated uniformly at random, in a random
    foreground colour on a random background colour (at least ``min_color_distance`` apart in
    L1 over RGB in [0, 1]), plus Gaussian pixel noise of standard deviation ``noise``.
    Edges are anti-aliased (coverage = clamp of the signed distance in pixel units).

    ``background_texture=True`` adds a random per-image grating to the background. The
    augmentations cannot remove it and the two views of an image share it, so instance
    discrimination learns the texture instead of the shape: the "large prototype bias"
    demonstration. Off by default.
    """

    def __init__(
        self,
        image_size: int = 32,
        noise: float = 0.05,
        background_texture: bool = False,
        *,
        position: float = 0.15,
        scale: tuple[float, float] = (0.5, 0.8),
        min_color_distance: float = 0.6,
        texture_amplitude: float = 0.25,
    ) -> None:
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must lie in [0, 1], got {noise}")
        if not 0.0 <= position <= 0.5:
            raise ValueError(f"position must lie in [0, 0.5], got {position}")
        if not (len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if not 0.0 <= min_color_distance <= 1.5:
            raise ValueError(f"min_color_distance must lie in [0, 1.5], got {min_color_distance}")
        if not 0.0 <= texture_amplitude <= 1.0:
            raise ValueError(f"texture_amplitude must lie in [0, 1], got {texture_amplitude}")
        self.image_size = image_size
        self.noise = float(noise)
        self.background_texture = bool(background_texture)
        self.position = float(position)
        self.scale = (float(scale[0]), float(scale[1]))
        self.min_color_distance = float(min_color_distance)
        self.texture_amplitude = float(texture_amplitude)

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names (:data:`SHAPE_CLASSES`)."""
        return SHAPE_CLASSES

    def render(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 images ``(len(labels), 3, H, W)`` with fresh nuisances, on ``labels.device``.

        Random parameters are drawn with ``generator`` (on its device) in a fixed order, so a
        given generator state always yields the same images.
        """
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D int64 tensor, got {_describe(labels)}")
        n, device, size = labels.shape[0], labels.device, self.image_size
        if n > 0 and (int(labels.min()) < 0 or int(labels.max()) >= len(SHAPE_CLASSES)):
            raise ValueError(f"labels must lie in [0, {len(SHAPE_CLASSES)})")
        params = self._sample_nuisances(n, generator, device)
        # Pixel-centre coordinates in [-1, 1]; y grows upwards.
        coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * 2 / size - 1
        x = coords.view(1, 1, size)
        y = -coords.view(1, size, 1)
        radius = params["radius"].view(n, 1, 1)
        dx, dy = x - params["centre"][:, 0].view(n, 1, 1), y - params["centre"][:, 1].view(n, 1, 1)
        cos, sin = (
            torch.cos(params["angle"]).view(n, 1, 1),
            torch.sin(params["angle"]).view(n, 1, 1),
        )
        u, v = (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius
        distance = torch.empty(n, size, size, device=device)
        for class_id in range(len(SHAPE_CLASSES)):  # loop over classes, not images
            mask = labels == class_id
            distance[mask] = _shape_distance(class_id, u[mask], v[mask])
        pixel = (2.0 / size) / radius  # one pixel in the shape's unit frame
        coverage = (0.5 - distance / pixel).clamp(0.0, 1.0).unsqueeze(1)
        background = params["background"].view(n, 3, 1, 1).expand(n, 3, size, size)
        if self.background_texture:
            background = (background + self._texture(n, size, generator, device)).clamp(0, 1)
        image = coverage * params["foreground"].view(n, 3, 1, 1) + (1 - coverage) * background
        image = image + self.noise * _randn((n, 3, size, size), generator, device)
        return image.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)

    def sample_class(self, class_id: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` fresh images of class ``class_id`` (new nuisances), uint8 ``(n, 3, H, W)``."""
        if not isinstance(class_id, int) or not 0 <= class_id < len(SHAPE_CLASSES):
            raise ValueError(
                f"class_id must be an int in [0, {len(SHAPE_CLASSES)}), got {class_id}"
            )
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return self.render(torch.full((n,), class_id, dtype=torch.int64), generator)

    def _sample_nuisances(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> dict[str, Tensor]:
        """Position, radius, angle and colours of ``n`` images."""
        lo, hi = self.scale
        centre = (2 * _rand((n, 2), generator, device) - 1) * self.position
        radius = lo + (hi - lo) * _rand((n,), generator, device)
        angle = 2 * math.pi * _rand((n,), generator, device)
        background = _rand((n, 3), generator, device)
        foreground = self._foreground(background, generator, device)
        return {
            "centre": centre,
            "radius": radius,
            "angle": angle,
            "background": background,
            "foreground": foreground,
        }

    def _foreground(self, background: Tensor, generator: torch.Generator, device) -> Tensor:
        """Foreground colours at least ``min_color_distance`` (L1) from the background.

        Eight candidates per image, the first far enough wins (vectorised rejection sampling);
        if none is, the opposite corner of the colour cube (L1 distance >= 1.5) is used.
        """
        n, tries = background.shape[0], 8
        candidates = _rand((n, tries, 3), generator, device)
        far = (candidates - background.unsqueeze(1)).abs().sum(-1) >= self.min_color_distance
        first = far.to(torch.int8).argmax(dim=1)
        chosen = candidates[torch.arange(n, device=device), first]
        fallback = (background < 0.5).to(background.dtype)
        return torch.where(far.any(dim=1, keepdim=True), chosen, fallback)

    def _texture(self, n: int, size: int, generator: torch.Generator, device) -> Tensor:
        """Random per-image texture (sum of two gratings), amplitude ``texture_amplitude``."""
        params = _rand((n, 2, 4), generator, device)
        freq = 2 + 6 * params[..., 0]  # cycles per image
        theta = math.pi * params[..., 1]
        phase = 2 * math.pi * params[..., 2]
        colour = 2 * _rand((n, 3), generator, device) - 1
        coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        x, y = coords.view(1, 1, 1, size), coords.view(1, 1, size, 1)
        arg = (torch.cos(theta).view(n, 2, 1, 1) * x + torch.sin(theta).view(n, 2, 1, 1) * y) * (
            2 * math.pi * freq.view(n, 2, 1, 1)
        ) + phase.view(n, 2, 1, 1)
        pattern = torch.sin(arg).mean(dim=1, keepdim=True)  # (n, 1, H, W) in [-1, 1]
        return self.texture_amplitude * pattern * colour.view(n, 3, 1, 1)


def synthetic_shapes(
    n: int,
    seed: int,
    *,
    image_size: int = 32,
    balanced: bool = True,
    **renderer_kwargs,
) -> ImageData:
    """``n`` synthetic shapes, identical for the same ``seed`` (CPU generator).

    ``balanced=True`` gives each class ``n // 10`` or ``n // 10 + 1`` images in random order;
    otherwise labels are drawn uniformly. ``renderer_kwargs`` go to :class:`ShapesRenderer`.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    renderer = ShapesRenderer(image_size=image_size, **renderer_kwargs)
    generator = torch.Generator().manual_seed(seed)
    n_classes = len(SHAPE_CLASSES)
    if balanced:
        labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=generator)]
    else:
        labels = torch.randint(0, n_classes, (n,), generator=generator)
    return ImageData(renderer.render(labels, generator), labels, SHAPE_CLASSES)


# --------------------------------------------------------------------------------------------
# Real datasets
# --------------------------------------------------------------------------------------------


def load_digits_images(
    *,
    image_size: int = 32,
    channels: int = 3,
    split: str = "train",
    test_fraction: float = 0.3,
    seed: int = 0,
) -> ImageData:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled, in a stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    chosen = np.sort(train if split == "train" else test)
    pixels = torch.from_numpy(digits.images[chosen]).float().div(16.0).unsqueeze(1)
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear")
    images = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, channels, -1, -1)
    labels = torch.from_numpy(digits.target[chosen]).to(torch.int64)
    return ImageData(images.contiguous(), labels, tuple(str(d) for d in range(10)))


_TORCHVISION_FOLDERS = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "stl10": "stl10_binary",
}


def _torchvision_class(name: str, check_integrity: bool) -> type:
    """The torchvision dataset class, or a subclass that only checks that files exist."""
    from torchvision import datasets

    base = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}[
        name
    ]
    if check_integrity:
        return base
    attrs: dict[str, object] = {
        "train_list": [[f, None] for f, _ in base.train_list],
        "test_list": [[f, None] for f, _ in base.test_list],
    }
    if hasattr(base, "meta"):
        attrs["meta"] = {**base.meta, "md5": None}
    return type(f"Unchecked{base.__name__}", (base,), attrs)


class DownloadError(OSError):
    """A dataset download failed (no network, a server error, a full disk)."""


def load_torchvision(
    name: str,
    root: str | Path,
    *,
    split: str = "train",
    download: bool = False,
    check_integrity: bool = True,
) -> ImageData:
    """CIFAR-10, CIFAR-100 or STL-10 from torchvision's on-disk format under ``root``.

    ``split`` is ``"train"`` or ``"test"``; STL-10 also has ``"unlabeled"`` (100 000 images
    labelled :data:`UNLABELLED`; about 2.8 GB in memory) and ``"train+unlabeled"``.
    ``check_integrity=False`` skips torchvision's md5 checks (only for hand-made files, as in
    the tests); downloads always keep them.
    """
    if name not in _TORCHVISION_FOLDERS:
        raise ValueError(f"name must be one of {sorted(_TORCHVISION_FOLDERS)}, got {name!r}")
    splits = (
        ("train", "test", "unlabeled", "train+unlabeled") if name == "stl10" else ("train", "test")
    )
    if split not in splits:
        raise ValueError(f"split for {name} must be one of {splits}, got {split!r}")
    root = Path(root)
    folder = root / _TORCHVISION_FOLDERS[name]
    hint = (
        f"{name} was not found (or is incomplete) in {folder}. Download it once with "
        f"download=True (train config: the override data.download=true), or put the extracted "
        f"'{_TORCHVISION_FOLDERS[name]}' folder under {root}."
    )
    if not download and not folder.is_dir():
        raise FileNotFoundError(hint)
    cls = _torchvision_class(name, check_integrity or download)
    kwargs = {"split": split} if name == "stl10" else {"train": split == "train"}
    try:
        dataset = cls(str(root), download=download, **kwargs)
    except RuntimeError as error:
        raise FileNotFoundError(f"{hint} (torchvision: {error})") from error
    except OSError as error:  # URLError (no network), HTTPError, a full disk, ...
        if not download:
            raise FileNotFoundError(f"{hint} ({error})") from error
        raise DownloadError(
            f"could not download {name} into {root} ({type(error).__name__}: {error}). Check the "
            f"network and the free disk space, or download it elsewhere and put the extracted "
            f"'{_TORCHVISION_FOLDERS[name]}' folder under {root}, then set download=False "
            f"(data.download=false)."
        ) from None
    if name == "stl10":
        images = torch.from_numpy(np.ascontiguousarray(dataset.data))
        labels = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    else:
        images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
        labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return ImageData(images, labels, tuple(str(c) for c in dataset.classes))


# --------------------------------------------------------------------------------------------
# Long tail, subsets, registry
# --------------------------------------------------------------------------------------------


def long_tailed(data: ImageData, imbalance_ratio: float, seed: int = 0) -> ImageData:
    """Subsample to an exponential class profile ``n_c = n_max * ratio ** (-c / (C - 1))``.

    Class 0 keeps the most images, class C-1 the fewest (``n_max / ratio``, rounded down, at
    least 1). ``n_max`` is the largest value every class can supply. Kept images are chosen at
    random with ``seed`` and returned in their original order. ``ratio = 1`` keeps as
    many images of every class as the smallest class has.
    """
    if not isinstance(imbalance_ratio, (int, float)) or not imbalance_ratio >= 1.0:
        raise ValueError(f"imbalance_ratio must be a number >= 1, got {imbalance_ratio!r}")
    n_classes = data.num_classes
    if n_classes < 2:
        raise ValueError(f"data must have at least 2 classes, got {n_classes}")
    labels = data.labels.cpu()
    if bool((labels < 0).any()):
        raise ValueError("data must be fully labelled (no UNLABELLED images) for long_tailed")
    counts = torch.bincount(labels, minlength=n_classes).double()
    if bool((counts == 0).any()):
        raise ValueError("data must contain every class at least once for long_tailed")
    factors = float(imbalance_ratio) ** (
        -torch.arange(n_classes, dtype=torch.float64) / (n_classes - 1)
    )
    n_max = torch.floor((counts / factors).min() + 1e-9)
    targets = torch.floor(n_max * factors + 1e-9).clamp(min=1).long()
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(labels), generator=generator)
    order = shuffled[torch.argsort(labels[shuffled], stable=True)]  # by class, random within
    rank = torch.empty_like(order)
    starts = torch.cumsum(counts.long(), 0) - counts.long()
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    keep = rank < targets[labels]
    return data.subset(torch.nonzero(keep).squeeze(1))


def _random_subset(data: ImageData, size: int, seed: int) -> ImageData:
    """``size`` images drawn without replacement (original order kept)."""
    if size > len(data):
        raise ValueError(f"size must be at most {len(data)} for this dataset, got {size}")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data), generator=generator)[:size]
    return data.subset(torch.sort(index).values)


SHAPES_DEFAULT_SIZES = {"train": 4000, "test": 2000}
"""Default number of synthetic shapes per split."""

_TEST_SEED_OFFSET = 1_000_003  # the shapes test split uses seed + this: disjoint random streams


def load_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | Path = "data",
    download: bool = False,
    seed: int = 0,
    size: int | None = None,
    imbalance_ratio: float | None = None,
) -> ImageData:
    """Load a dataset of :data:`DATASETS` by name.

    * ``"shapes"``: rendered on the fly; ``size`` images (default 4000 train / 2000 test); the
      test split uses an independent seed (``seed + 1000003``).
    * ``"digits"``: stratified 70/30 split with ``seed``.
    * ``"cifar10"``, ``"cifar100"``, ``"stl10"``: from ``root`` (``download=True`` fetches).

    For the non-synthetic sets ``size`` draws a random subset (seeded). ``imbalance_ratio``
    then applies :func:`long_tailed` to the split you load (keep the test split balanced by
    leaving it ``None`` there).
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    if name == "shapes":
        if split not in SHAPES_DEFAULT_SIZES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n = SHAPES_DEFAULT_SIZES[split] if size is None else size
        data = synthetic_shapes(n, seed if split == "train" else seed + _TEST_SEED_OFFSET)
    else:
        if name == "digits":
            data = load_digits_images(split=split, seed=seed)
        else:
            data = load_torchvision(name, root, split=split, download=download)
        if size is not None:
            data = _random_subset(data, size, seed)
    if imbalance_ratio is not None:
        data = long_tailed(data, imbalance_ratio, seed=seed)
    return data


# --------------------------------------------------------------------------------------------
# Views and positives
# --------------------------------------------------------------------------------------------


def view_sources(
    labels: Tensor,
    index: Tensor,
    n_views: int,
    same_class_prob: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dataset indices ``(n_views, B)`` whose images give the views of the batch ``index``.

    View 0 is always the instance itself. Each other view is the instance itself or, with
    probability ``same_class_prob``, another random instance of the same class (a "debiased"
    positive drawn with the label oracle; ``1`` ~ supervised contrastive learning). A class
    with a single member, and unlabelled instances (label -1), always give the instance itself.
    Vectorised (sort by class, random offset within the class); runs on ``labels.device``.
    """
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {_describe(labels)}")
    if not isinstance(index, Tensor) or index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int64 tensor, got {_describe(index)}")
    if not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
    if not 0.0 <= same_class_prob <= 1.0:
        raise ValueError(f"same_class_prob must lie in [0, 1], got {same_class_prob}")
    device = labels.device
    index = index.to(device)
    sources = index.unsqueeze(0).repeat(n_views, 1)
    if n_views == 1 or same_class_prob == 0.0 or index.numel() == 0:
        return sources
    shifted = labels + 1  # unlabelled (-1) becomes group 0, never swapped below
    order = torch.argsort(shifted, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=device)
    grouped = shifted[order]
    group = shifted[index]
    start = torch.searchsorted(grouped, group)  # no bincount: it would sync with the host
    count = torch.searchsorted(grouped, group, right=True) - start
    own = position[index] - start  # rank of the instance inside its class
    batch = index.shape[0]
    offset = torch.floor(_rand((n_views - 1, batch), generator, device) * (count - 1)).long()
    offset = offset + (offset >= own).long()  # skip the instance itself
    other = order[(start + offset).clamp(max=len(order) - 1)]
    swap = _rand((n_views - 1, batch), generator, device) < same_class_prob
    swap = swap & (count > 1) & (group > 0)
    sources[1:] = torch.where(swap, other, sources[1:])
    return sources


class MultiViewDataset(torch.utils.data.Dataset):
    """Per-sample wrapper for torchvision-style pipelines: item -> ``(views (V, C, H, W), label)``.

    ``transform`` receives a uint8 ``(C, H, W)`` tensor (what ``torchvision.transforms.v2``
    takes) and may return uint8 (converted to float in [0, 1]) or float. Positives follow
    :func:`view_sources`. Each DataLoader worker reseeds from its own worker seed.
    """

    def __init__(
        self,
        data: ImageData,
        transform: Callable[[Tensor], Tensor] | None = None,
        n_views: int = 2,
        same_class_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not isinstance(data, ImageData):
            raise ValueError(f"data must be an ImageData, got {type(data).__name__}")
        if not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
        if not 0.0 <= same_class_prob <= 1.0:
            raise ValueError(f"same_class_prob must lie in [0, 1], got {same_class_prob}")
        self.data = data
        self.transform = transform
        self.n_views = n_views
        self.same_class_prob = float(same_class_prob)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._worker_id: int | None = None

    def __len__(self) -> int:
        """Number of instances."""
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """The ``n_views`` transformed views of instance ``i`` and its label."""
        self._reseed_in_worker()
        index = torch.tensor([int(i)], dtype=torch.int64, device=self.data.device)
        sources = view_sources(
            self.data.labels, index, self.n_views, self.same_class_prob, self._generator
        )[:, 0]
        views = [self._transform(self.data.images[j]) for j in sources.tolist()]
        return torch.stack(views), int(self.data.labels[i])

    def _transform(self, image: Tensor) -> Tensor:
        """Apply the transform; return float32 in [0, 1]."""
        out = image if self.transform is None else self.transform(image)
        if out.dtype == torch.uint8:
            return out.float().div(255.0)
        return out

    def _reseed_in_worker(self) -> None:
        """Give each DataLoader worker its own random stream."""
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_id != info.id:
            self._worker_id = info.id
            self._generator.manual_seed(info.seed)
