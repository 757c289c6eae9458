"""Batched data augmentation on the device, with independent random parameters per sample.

:class:`BatchAugment` draws one set of parameters per image (:meth:`~BatchAugment.sample_params`)
and applies them deterministically (:meth:`~BatchAugment.apply`):

1. geometry, one ``affine_grid``/``grid_sample`` call for the whole batch: random resized crop
   (bilinear, half-pixel centres, like ``torchvision``'s ``resized_crop``), then rotation, then
   horizontal flip. Rotated corners repeat the crop's border pixels;
2. colour jitter with probability ``jitter_p``, in the **fixed order** brightness, contrast,
   saturation, hue (torchvision draws a random order per image; we do not);
3. channel permutation, inversion, per-channel gain (the shapes recipe);
4. grayscale, then Gaussian blur.

For fixed parameters every step equals the matching ``torchvision.transforms.v2.functional``
op on float images (``resized_crop``, ``rotate``, ``hflip``, ``adjust_*``, ``rgb_to_grayscale``,
``gaussian_blur``); the tests check this. Crop boxes are continuous (sub-pixel) rather than
torchvision's integer boxes; an integer box reproduces ``resized_crop``.

Input range. Images are floats in ``[0, 1]`` (uint8 images divided by 255): the colour ops
clamp to ``[0, 1]``, so ``[0, 255]`` floats would saturate. On the CPU the range is checked
(one pass over the batch) and values outside it raise ``ValueError``; on other devices the
check would force a host sync per batch, so it runs only when asked with ``check_range=True``
(the training loop divides uint8 images by 255 itself).

Speed: on the CPU, batches above 128 images are processed in chunks of 128 (every operation
is per image, so results are unchanged) so that the elementwise colour passes stay in cache;
masks are applied with ``torch.lerp`` (0/1 weights, exact) rather than ``torch.where``, which
is not vectorised on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop also tries 10 times
_CPU_CHUNK = 128  # images per chunk on the CPU (3 x 32 x 32 float32 planes: 1.5 MiB)


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges and probabilities of :class:`BatchAugment` (defaults: the identity).

    ``crop_scale``: area fraction kept by the crop; ``crop_ratio``: its aspect ratio (w/h);
    ``rotation``: maximal angle in degrees (uniform in ``[-rotation, rotation]``);
    jitter factors are drawn as in ``ColorJitter`` (``[max(0, 1 - b), 1 + b]``, hue in
    ``[-hue, hue]``); ``gain``: per-channel multipliers in ``[1 - gain, 1 + gain]``;
    ``blur_kernel=None`` picks an odd kernel of about 10% of the output size.
    """

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    rotation: float = 0.0
    flip_p: float = 0.0
    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    channel_perm_p: float = 0.0
    invert_p: float = 0.0
    gain: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None

    def __post_init__(self) -> None:
        """Validate every field; messages name the field."""
        lo, hi = _pair(self.crop_scale, "crop_scale")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = _pair(self.crop_ratio, "crop_ratio")
        if not 0.0 < lo <= hi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(f"rotation must lie in [0, 180] degrees, got {self.rotation}")
        for name in ("flip_p", "jitter_p", "channel_perm_p", "invert_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"{name} must be a probability in [0, 1], got {getattr(self, name)}"
                )
        for name in ("brightness", "contrast", "saturation"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {self.hue}")
        if not 0.0 <= self.gain <= 1.0:
            raise ValueError(f"gain must lie in [0, 1], got {self.gain}")
        lo, hi = _pair(self.blur_sigma, "blur_sigma")
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        k = self.blur_kernel
        if k is not None and (not isinstance(k, int) or k < 1 or k % 2 == 0):
            raise ValueError(f"blur_kernel must be None or an odd positive int, got {k!r}")

    def scaled(self, strength: float) -> AugmentConfig:
        """A copy with every range and probability scaled by ``strength`` in [0, 1].

        Crop area bounds move from 1 towards the recipe's (``1 - s (1 - a)``), aspect-ratio
        bounds are raised to the power ``s`` (log-ratio range times ``s``); angles, jitter
        amplitudes, gain and all probabilities are multiplied by ``s``. The blur sigma range
        and kernel stay (only the blur probability scales). ``strength=0`` is the identity.
        """
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        s = float(strength)
        scale = tuple(a if s == 1.0 else 1.0 - s * (1.0 - a) for a in self.crop_scale)
        ratio = tuple(r**s for r in self.crop_ratio)
        times = (
            "rotation flip_p jitter_p brightness contrast saturation hue channel_perm_p "
            "invert_p gain grayscale_p blur_p"
        ).split()
        changes = {name: s * getattr(self, name) for name in times}
        return dataclasses.replace(self, crop_scale=scale, crop_ratio=ratio, **changes)

    @property
    def is_identity(self) -> bool:
        """True when every augmentation is switched off."""
        return self == AugmentConfig(blur_sigma=self.blur_sigma, blur_kernel=self.blur_kernel)


def _pair(value: object, name: str) -> tuple[float, float]:
    """Check a (min, max) pair of numbers."""
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ValueError(f"{name} must be a (min, max) tuple, got {value!r}")
    return float(value[0]), float(value[1])


def _uniform(
    shape: tuple[int, ...],
    low: float,
    high: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Uniform numbers in [low, high) from ``generator`` (drawn on its device), on ``device``."""
    if generator is None:
        u = torch.rand(shape, device=device)
    else:
        u = torch.rand(shape, generator=generator, device=generator.device).to(device)
    return low + (high - low) * u


def _grayscale(x: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` with torchvision's weights (a 1-channel image is returned as is)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: Tensor, y: Tensor, factor: Tensor) -> Tensor:
    """``factor * x + (1 - factor) * y`` clamped to [0, 1] (torchvision's ``_blend``)."""
    return torch.addcmul((1.0 - factor) * y, x, factor).clamp_(0.0, 1.0)


def _select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where the (broadcastable) bool ``mask`` is set, else ``b``; exact on both sides.

    ``torch.lerp`` with a 0/1 weight returns ``b`` or ``a`` bit for bit and, unlike
    ``torch.where``, runs vectorised on the CPU (several times faster on image batches).
    """
    return torch.lerp(b, a, mask.to(b.dtype))


def _adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate hues by ``hue`` (fractions of a turn, shape (B, 1, 1, 1)), torchvision's HSV rule.

    A hue rotation keeps ``v = max`` and ``v s = max - min`` of every pixel, so the output is
    ``f(n) = max - (max - min) clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6``,
    ``n = 5, 3, 1`` and ``6 h'`` the rotated hue in sextants. Written with arithmetic masks
    (no ``where``/``remainder``, which are slow on the CPU) and in-place updates.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    # sextant = (g - b) / delta, (b - r) / delta + 2 or (r - g) / delta + 4 by the max channel;
    # flat pixels (delta = 0) have numerator 0, and any finite hue gives f(n) = max there
    numerator = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b)
    sextant = numerator.div_(delta.clamp(min=torch.finfo(x.dtype).tiny))
    sextant.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0).add_(6.0 * hue.view(-1, 1, 1))
    sextant.sub_(torch.floor(sextant * (1.0 / 6.0)).mul_(6.0))  # in [0, 6)
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = sextant.unsqueeze(1) + n  # in [1, 11): one wrap at most
    k.sub_((k >= 6.0).to(x.dtype).mul_(6.0))
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return ramp.mul_(delta.unsqueeze(1)).neg_().add_(maxc.unsqueeze(1)).clamp_(0.0, 1.0)


def _gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels ``(B, size)`` for per-sample ``sigma`` ``(B,)``."""
    t = torch.arange(size, device=sigma.device, dtype=sigma.dtype) - (size - 1) / 2
    weights = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    return weights / weights.sum(1, keepdim=True)


def _gaussian_blur(x: Tensor, sigma: Tensor, size: int) -> Tensor:
    """Separable Gaussian blur with per-sample sigma and reflect padding (grouped conv)."""
    b, c, h, w = x.shape
    kernels = _gaussian_kernels(sigma, size).repeat_interleave(c, 0)  # (B*C, k)
    pad = size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels.view(b * c, 1, 1, size), groups=b * c)
    y = F.conv2d(y, kernels.view(b * c, 1, size, 1), groups=b * c)
    return y.view(b, c, h, w)


class BatchAugment(torch.nn.Module):
    """Augment a float batch ``(B, C, H, W)`` in [0, 1] on its device, per-sample parameters.

    ``size``: output side (square); ``None`` keeps the input's ``H x W``. C must be 1 or 3
    (saturation, hue, grayscale and channel permutation leave a 1-channel image unchanged).
    """

    def __init__(self, config: AugmentConfig, size: int | None = None) -> None:
        super().__init__()
        if not isinstance(config, AugmentConfig):
            raise ValueError(f"config must be an AugmentConfig, got {type(config).__name__}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int or None, got {size!r}")
        self.config = config
        self.size = size

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"size={self.size}, config={self.config}"

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        *,
        check_range: bool | None = None,
    ) -> Tensor:
        """Augmented copy of ``x``: same dtype, shape ``(B, C, size, size)``, values in [0, 1].

        ``x`` must lie in [0, 1]; ``check_range`` (default: on the CPU only) checks it.
        """
        _check_images(x)
        if self.config.is_identity and (self.size is None or x.shape[-2:] == (self.size,) * 2):
            _check_range(x, check_range)
            return x.clone()
        params = self.sample_params(x.shape[0], x.device, generator, image_shape=x.shape[-2:])
        return self.apply(x, params, check_range=check_range)

    # ---- parameters ---------------------------------------------------------------------

    def sample_params(
        self,
        batch: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        *,
        image_shape: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Independent random parameters for ``batch`` images (see :meth:`apply` for keys).

        ``image_shape`` (H, W) of the input defines pixel aspect ratios (default: square).
        Random numbers come from ``generator`` on its own device in a fixed order.
        """
        if not isinstance(batch, int) or batch < 0:
            raise ValueError(f"batch must be a non-negative int, got {batch!r}")
        device = torch.device(device)
        cfg, g, n = self.config, generator, batch
        h, w = (1, 1) if image_shape is None else (int(image_shape[0]), int(image_shape[1]))
        params = {"crop": self._sample_crop(n, h, w, g, device)}
        params["angle"] = _uniform((n,), -cfg.rotation, cfg.rotation, g, device)
        params["flip"] = _uniform((n,), 0, 1, g, device) < cfg.flip_p
        params["jitter"] = _uniform((n,), 0, 1, g, device) < cfg.jitter_p
        for name in ("brightness", "contrast", "saturation"):
            amp = getattr(cfg, name)
            params[name] = _uniform((n,), max(0.0, 1.0 - amp), 1.0 + amp, g, device)
        params["hue"] = _uniform((n,), -cfg.hue, cfg.hue, g, device)
        keys = _uniform((n, 3), 0, 1, g, device)
        permute = _uniform((n, 1), 0, 1, g, device) < cfg.channel_perm_p
        identity = torch.arange(3, device=device).expand(n, 3)
        params["perm"] = torch.where(permute, keys.argsort(1), identity)
        params["invert"] = _uniform((n,), 0, 1, g, device) < cfg.invert_p
        params["gain"] = _uniform((n, 3), 1.0 - cfg.gain, 1.0 + cfg.gain, g, device)
        params["gray"] = _uniform((n,), 0, 1, g, device) < cfg.grayscale_p
        params["blur"] = _uniform((n,), 0, 1, g, device) < cfg.blur_p
        params["sigma"] = _uniform((n,), *cfg.blur_sigma, g, device)
        return params

    def identity_params(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Parameters that leave every image unchanged (a base for hand-made parameters)."""
        device = torch.device(device)
        false = torch.zeros(batch, dtype=torch.bool, device=device)
        ones = torch.ones(batch, device=device)
        return {
            "crop": torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).repeat(batch, 1),
            "angle": torch.zeros(batch, device=device),
            "flip": false,
            "jitter": false.clone(),
            "brightness": ones,
            "contrast": ones.clone(),
            "saturation": ones.clone(),
            "hue": torch.zeros(batch, device=device),
            "perm": torch.arange(3, device=device).repeat(batch, 1),
            "invert": false.clone(),
            "gain": torch.ones(batch, 3, device=device),
            "gray": false.clone(),
            "blur": false.clone(),
            "sigma": ones.clone(),
        }

    def _sample_crop(
        self, n: int, h: int, w: int, g: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """Crop boxes ``(n, 4)`` = (top, left, height, width) as fractions of the input.

        torchvision's RandomResizedCrop rule, vectorised: up to 10 draws of (area, log-ratio),
        the first that fits wins, else a central crop with the ratio clipped to the range.
        """
        cfg, tries = self.config, _CROP_ATTEMPTS
        area = _uniform((n, tries), *cfg.crop_scale, g, device) * (h * w)
        log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        ratio = torch.exp(_uniform((n, tries), log_lo, log_hi, g, device))
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (cw <= w * (1 + 1e-6)) & (ch <= h * (1 + 1e-6))
        first = fits.to(torch.int8).argmax(1, keepdim=True)
        cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
        in_ratio = w / h
        if in_ratio < cfg.crop_ratio[0]:
            fw, fh = float(w), w / cfg.crop_ratio[0]
        elif in_ratio > cfg.crop_ratio[1]:
            fw, fh = h * cfg.crop_ratio[1], float(h)
        else:
            fw, fh = float(w), float(h)
        ok = fits.any(1)
        cw = torch.where(ok, cw.clamp(max=w), torch.full_like(cw, fw))
        ch = torch.where(ok, ch.clamp(max=h), torch.full_like(ch, fh))
        pos = _uniform((n, 2), 0, 1, g, device)
        top = torch.where(ok, pos[:, 0] * (h - ch), (h - ch) / 2)
        left = torch.where(ok, pos[:, 1] * (w - cw), (w - cw) / 2)
        return torch.stack((top / h, left / w, ch / h, cw / w), 1)

    # ---- application --------------------------------------------------------------------

    def apply(
        self, x: Tensor, params: dict[str, Tensor], *, check_range: bool | None = None
    ) -> Tensor:
        """Apply ``params`` (as from :meth:`sample_params`) to ``x`` (in [0, 1]); deterministic.

        Keys: ``crop`` (B, 4) top/left/height/width fractions, ``angle`` (B,) degrees
        (counter-clockwise), ``flip`` (B,) bool, ``jitter`` (B,) bool with ``brightness``,
        ``contrast``, ``saturation`` (B,) factors and ``hue`` (B,) shift, ``perm`` (B, 3)
        channel order, ``invert`` (B,) bool, ``gain`` (B, 3), ``gray`` (B,) bool, ``blur``
        (B,) bool with ``sigma`` (B,). Ops whose config range is zero are skipped.
        ``check_range``: see :meth:`forward`.
        """
        _check_images(x)
        _check_range(x, check_range)
        missing = set(self.identity_params(0)) - set(params)
        if missing:
            raise ValueError(f"params is missing keys {sorted(missing)}")
        dtype, b = x.dtype, x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            per_image = all(v.shape[:1] == (b,) for v in params.values())
            if x.device.type == "cpu" and b > _CPU_CHUNK and per_image:
                # cache-sized chunks: every op is per image, so this is exact, and the
                # ~25 elementwise passes of the colour ops then stay in the L2 cache
                y = torch.cat(
                    [
                        self._pipeline(x[i : i + _CPU_CHUNK], _chunk(params, i, _CPU_CHUNK))
                        for i in range(0, b, _CPU_CHUNK)
                    ]
                )
            else:
                y = self._pipeline(x, params)
        return y.to(dtype)

    def _pipeline(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Geometry, colour, blur of a float batch (autocast off)."""
        return self._blur(self._colour(self._geometry(x, params), params), params)

    def _geometry(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Resized crop, rotation and flip with one affine_grid/grid_sample call."""
        b, c, h, w = x.shape
        out_h, out_w = (h, w) if self.size is None else (self.size, self.size)
        top, left, ch, cw = (t.to(x.dtype) for t in params["crop"].unbind(1))
        top, left, ch, cw = top * h, left * w, ch * h, cw * w  # input pixels
        angle = torch.deg2rad(params["angle"].to(x.dtype))
        cos, sin = torch.cos(angle), torch.sin(angle)
        sign = 1.0 - 2.0 * params["flip"].to(x.dtype)
        # normalised output o -> output pixels q (flipped) -> rotated q' -> crop pixels p,
        # expressed as offsets from the crop centre in normalised input units (2 / w, 2 / h)
        sx, sy = cw / out_w * (2.0 / w), ch / out_h * (2.0 / h)
        qx, qy = sign * (out_w / 2), torch.full_like(sign, out_h / 2)
        zero = torch.zeros_like(sx)
        theta = torch.stack(
            (
                torch.stack((sx * cos * qx, -sx * sin * qy, zero), 1),
                torch.stack((sy * sin * qx, sy * cos * qy, zero), 1),
            ),
            1,
        )
        grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
        # stay between the centres of the crop's edge pixels (torchvision's resize clamps so)
        half_w = (cw / 2 - 0.5).clamp(min=0) * (2.0 / w)
        half_h = (ch / 2 - 0.5).clamp(min=0) * (2.0 / h)
        half = torch.stack((half_w, half_h), 1).view(b, 1, 1, 2)
        centre_x = (left + cw / 2) * (2.0 / w) - 1.0
        centre_y = (top + ch / 2) * (2.0 / h) - 1.0
        centre = torch.stack((centre_x, centre_y), 1).view(b, 1, 1, 2)
        grid = torch.clamp(grid, min=-half, max=half).add_(centre)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _colour(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Jitter (fixed order), channel permutation, inversion, gain, grayscale."""
        cfg, b, c = self.config, x.shape[0], x.shape[1]
        jitter = params["jitter"].view(b, 1, 1, 1)

        def factor(key: str) -> Tensor:
            """Per-sample jitter factor; exactly 1 (the identity) where jitter is off."""
            value = params[key].to(x.dtype).view(b, 1, 1, 1)
            return torch.where(jitter, value, torch.ones_like(value))

        if cfg.jitter_p > 0:
            if cfg.brightness > 0:
                x = (x * factor("brightness")).clamp_(0.0, 1.0)
            if cfg.contrast > 0:
                mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
                x = _blend(x, mean, factor("contrast"))
            if cfg.saturation > 0 and c == 3:
                x = _blend(x, _grayscale(x), factor("saturation"))
            if cfg.hue > 0 and c == 3:
                hue = params["hue"].to(x.dtype).view(b, 1, 1, 1)
                x = _select(jitter, _adjust_hue(x, hue), x)
        if cfg.channel_perm_p > 0 and c == 3:
            x = x.gather(1, params["perm"].view(b, 3, 1, 1).expand_as(x))
        if cfg.invert_p > 0 or cfg.gain > 0:
            # (1 - x) g where inverted, x g elsewhere: one fused multiply-add per pixel
            gain = params["gain"][:, :c].to(x.dtype).view(b, c, 1, 1)
            if cfg.gain == 0:
                gain = torch.ones_like(gain)
            invert = params["invert"].to(x.dtype).view(b, 1, 1, 1)
            if cfg.invert_p == 0:
                invert = torch.zeros_like(invert)
            x = torch.addcmul(invert * gain, x, gain * (1.0 - 2.0 * invert)).clamp_(0.0, 1.0)
        if cfg.grayscale_p > 0 and c == 3:
            x = _select(params["gray"].view(b, 1, 1, 1), _grayscale(x).expand_as(x), x)
        return x

    def _blur(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Gaussian blur of the flagged samples."""
        if self.config.blur_p == 0:
            return x
        size = self.blur_kernel_size(x.shape[-1])
        blurred = _gaussian_blur(x, params["sigma"].to(x.dtype), size)
        return _select(params["blur"].view(-1, 1, 1, 1), blurred, x).clamp_(0.0, 1.0)

    def blur_kernel_size(self, image_size: int) -> int:
        """The blur kernel: ``config.blur_kernel`` or the odd int nearest 10% of the size (>= 3)."""
        if self.config.blur_kernel is not None:
            return self.config.blur_kernel
        k = max(3, int(0.1 * image_size))
        return k if k % 2 == 1 else k + 1


def _chunk(params: dict[str, Tensor], start: int, size: int) -> dict[str, Tensor]:
    """Rows ``start:start + size`` of every per-image parameter."""
    return {key: value[start : start + size] for key, value in params.items()}


def _check_images(x: Tensor) -> None:
    """Validate a float image batch (no host sync)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError("x must be a float tensor of shape (B, C, H, W)")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels, got {x.shape[1]}")


def _check_range(x: Tensor, check_range: bool | None) -> None:
    """Raise unless ``x`` lies in [0, 1]; runs on the CPU, elsewhere only when asked (sync)."""
    if not (x.device.type == "cpu" if check_range is None else check_range) or x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0.0 and hi <= 1.0):  # NaN fails too
        scale = " (divide uint8-range images by 255)" if hi > 1.0 else ""
        raise ValueError(f"x must hold values in [0, 1]{scale}, got values in [{lo:.4g}, {hi:.4g}]")


def simclr_cifar(size: int = 32, strength: float = 1.0, *, blur_p: float = 0.0) -> BatchAugment:
    """SimCLR's CIFAR recipe: crop (0.08-1, ratio 3/4-4/3), flip 0.5, jitter (0.4, 0.4, 0.4,
    0.1) p 0.8, grayscale 0.2; no blur unless ``blur_p`` > 0 (e.g. 0.5 for STL-10 at 96x96)."""
    config = AugmentConfig(
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        grayscale_p=0.2,
        blur_p=blur_p,
    )
    return BatchAugment(config.scaled(strength), size)


def shapes_recipe(size: int = 32, strength: float = 1.0) -> BatchAugment:
    """The synthetic-shapes recipe: crop 50-100% of the area, log-aspect +-0.25, rotation
    +-180 degrees, flip 0.5, jitter (0.4, 0.4, 0.4) p 0.8, channel permutation p 0.8,
    inversion p 0.5, per-channel gain +-0.6, grayscale p 0.2."""
    config = AugmentConfig(
        crop_scale=(0.5, 1.0),
        crop_ratio=(math.exp(-0.25), math.exp(0.25)),
        rotation=180.0,
        flip_p=0.5,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        channel_perm_p=0.8,
        invert_p=0.5,
        gain=0.6,
        grayscale_p=0.2,
    )
    return BatchAugment(config.scaled(strength), size)


AUGMENTATIONS: tuple[str, ...] = ("simclr_cifar", "simclr_stl10", "shapes", "none")
"""Names accepted by :func:`make_augment`."""


def make_augment(name: str, size: int, strength: float = 1.0) -> BatchAugment:
    """A recipe by name: ``simclr_cifar``, ``simclr_stl10`` (blur p 0.5), ``shapes``, ``none``."""
    if name == "simclr_cifar":
        return simclr_cifar(size, strength)
    if name == "simclr_stl10":
        return simclr_cifar(size, strength, blur_p=0.5)
    if name == "shapes":
        return shapes_recipe(size, strength)
    if name == "none":
        return BatchAugment(AugmentConfig(), size)
    raise ValueError(f"name must be one of {AUGMENTATIONS}, got {name!r}")


def make_views(
    x: Tensor, augment: BatchAugment, n_views: int, generator: torch.Generator | None = None
) -> Tensor:
    """``n_views`` independent augmentations of ``x``: shape ``(V, B, C, H', W')``."""
    if not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views must be an int >= 1, got {n_views!r}")
    _check_images(x)
    b = x.shape[0]
    stacked = x.unsqueeze(0).expand(n_views, *x.shape).reshape(n_views * b, *x.shape[1:])
    out = augment(stacked, generator)
    return out.view(n_views, b, *out.shape[1:])
