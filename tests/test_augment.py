"""Tests of cl_lib.augment: equivalence with torchvision, parameter laws, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torchvision.transforms import InterpolationMode

from cl_lib.augment import (
    AugmentConfig,
    BatchAugment,
    make_augment,
    make_views,
    shapes_recipe,
    simclr_cifar,
)

BILINEAR = InterpolationMode.BILINEAR
# Every op switched on, so that `apply` runs all of them when the parameters ask for it.
ALL_ON = AugmentConfig(
    crop_scale=(0.1, 1.0),
    crop_ratio=(0.5, 2.0),
    rotation=180.0,
    flip_p=0.5,
    jitter_p=0.8,
    brightness=0.5,
    contrast=0.5,
    saturation=0.5,
    hue=0.3,
    channel_perm_p=0.5,
    invert_p=0.5,
    gain=0.5,
    grayscale_p=0.5,
    blur_p=0.5,
)
# float32 rounding of the sampling grid and of the colour arithmetic stays below this.
TOL = 1e-5


def images(b: int = 4, c: int = 3, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    """Random float images in [0, 1]."""
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Equivalence with torchvision for fixed parameters
# --------------------------------------------------------------------------------------------


def test_resized_crop_matches_torchvision_upscaling():
    """Integer crop boxes upscaled to 32x32 equal F.resized_crop (bilinear, antialias on)."""
    x = images()
    aug = BatchAugment(ALL_ON, size=32)
    boxes = [(2, 3, 10, 12), (0, 0, 20, 24), (5, 1, 15, 8), (7, 9, 3, 5)]
    params = aug.identity_params(4)
    params["crop"] = torch.tensor([[t / 20, lf / 24, h / 20, w / 24] for t, lf, h, w in boxes])
    out = aug.apply(x, params)
    for i, (t, lf, h, w) in enumerate(boxes):
        ref = TF.resized_crop(x[i], t, lf, h, w, [32, 32], interpolation=BILINEAR)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_resized_crop_matches_torchvision_downscaling_without_antialias():
    """Shrinking a crop is plain bilinear (no antialias): equals resized_crop(antialias=False)."""
    x = images(2, 3, 40, 40)
    aug = BatchAugment(ALL_ON, size=16)
    params = aug.identity_params(2)
    params["crop"] = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.75, 0.5]])
    out = aug.apply(x, params)
    for i, (t, lf, h, w) in enumerate([(0, 0, 40, 40), (4, 8, 30, 20)]):
        ref = TF.resized_crop(x[i], t, lf, h, w, [16, 16], interpolation=BILINEAR, antialias=False)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_flip_after_crop_matches_torchvision():
    """The flip mirrors the cropped output: hflip(resized_crop(x))."""
    x = images(2)
    aug = BatchAugment(ALL_ON, size=32)
    params = aug.identity_params(2)
    params["crop"] = torch.tensor([[0.1, 0.125, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]])
    params["flip"] = torch.tensor([True, True])
    out = aug.apply(x, params)
    torch.testing.assert_close(
        out[0], TF.hflip(TF.resized_crop(x[0], 2, 3, 10, 12, [32, 32])), atol=TOL, rtol=0
    )
    torch.testing.assert_close(out[1], TF.hflip(TF.resize(x[1], [32, 32])), atol=TOL, rtol=0)


def test_rotation_is_counter_clockwise_like_torchvision():
    """90 degrees is exactly rot90; 30 degrees equals F.rotate (bilinear) away from the corners."""
    x = images(2, 3, 16, 16)
    aug = BatchAugment(ALL_ON)
    params = aug.identity_params(2)
    params["angle"] = torch.tensor([90.0, -90.0])
    out = aug.apply(x, params)
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, (-2, -1)), atol=TOL, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, (-2, -1)), atol=TOL, rtol=0)
    params["angle"] = torch.tensor([30.0, -30.0])
    out = aug.apply(x, params)
    for i, angle in enumerate((30.0, -30.0)):
        ref = TF.rotate(x[i], angle, interpolation=BILINEAR)
        # inside the inscribed disc both sample the same points; corners differ by padding
        torch.testing.assert_close(out[i, :, 4:12, 4:12], ref[:, 4:12, 4:12], atol=TOL, rtol=0)


def _jitter_params(aug: BatchAugment, b: int, **values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Identity parameters with jitter on for every sample and the given factors."""
    params = aug.identity_params(b)
    params["jitter"] = torch.ones(b, dtype=torch.bool)
    params.update(values)
    return params


@pytest.mark.parametrize(
    ("key", "values", "reference"),
    [
        ("brightness", [0.6, 1.0, 1.4, 0.0], TF.adjust_brightness),
        ("contrast", [0.6, 1.0, 1.4, 0.0], TF.adjust_contrast),
        ("saturation", [0.6, 1.0, 1.4, 0.0], TF.adjust_saturation),
        ("hue", [-0.3, 0.0, 0.1, 0.5], TF.adjust_hue),
    ],
)
def test_colour_jitter_ops_match_torchvision(key, values, reference):
    """Each jitter op, one factor per sample, equals its torchvision function."""
    x = images()
    aug = BatchAugment(ALL_ON)
    out = aug.apply(x, _jitter_params(aug, 4, **{key: torch.tensor(values)}))
    for i, value in enumerate(values):
        torch.testing.assert_close(out[i], reference(x[i], value), atol=TOL, rtol=0)


def test_jitter_order_is_brightness_contrast_saturation_hue():
    """The documented fixed order, composed from torchvision functions."""
    x = images()
    aug = BatchAugment(ALL_ON)
    factors = {
        "brightness": torch.tensor([0.7, 1.3, 1.1, 0.9]),
        "contrast": torch.tensor([1.4, 0.6, 0.8, 1.2]),
        "saturation": torch.tensor([0.5, 1.5, 1.0, 0.2]),
        "hue": torch.tensor([0.25, -0.1, 0.05, -0.45]),
    }
    out = aug.apply(x, _jitter_params(aug, 4, **factors))
    for i in range(4):
        ref = TF.adjust_brightness(x[i], float(factors["brightness"][i]))
        ref = TF.adjust_contrast(ref, float(factors["contrast"][i]))
        ref = TF.adjust_saturation(ref, float(factors["saturation"][i]))
        ref = TF.adjust_hue(ref, float(factors["hue"][i]))
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)


def test_jitter_flag_off_leaves_image_unchanged():
    """Samples with jitter=False keep their pixels even when their factors are extreme."""
    x = images()
    aug = BatchAugment(ALL_ON)
    params = _jitter_params(aug, 4, brightness=torch.full((4,), 0.2), hue=torch.full((4,), 0.4))
    params["jitter"] = torch.tensor([True, False, True, False])
    out = aug.apply(x, params)
    torch.testing.assert_close(out[1], x[1], atol=TOL, rtol=0)
    torch.testing.assert_close(out[3], x[3], atol=TOL, rtol=0)
    assert (out[0] - x[0]).abs().max() > 0.1


def test_grayscale_matches_torchvision():
    """Grayscale keeps 3 channels of torchvision's luma."""
    x = images()
    aug = BatchAugment(ALL_ON)
    params = aug.identity_params(4)
    params["gray"] = torch.tensor([True, False, True, True])
    out = aug.apply(x, params)
    torch.testing.assert_close(out[0], TF.rgb_to_grayscale(x[0], 3), atol=TOL, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=TOL, rtol=0)


def test_gaussian_blur_matches_torchvision():
    """Per-sample sigma with the recipe's kernel equals F.gaussian_blur (reflect padding)."""
    x = images(3, 3, 24, 24)
    aug = BatchAugment(dataclass_replace(ALL_ON, blur_kernel=5))
    params = aug.identity_params(3)
    params["blur"] = torch.tensor([True, True, False])
    params["sigma"] = torch.tensor([0.3, 1.7, 1.0])
    out = aug.apply(x, params)
    for i in range(2):
        ref = TF.gaussian_blur(x[i], [5, 5], [float(params["sigma"][i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=TOL, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=TOL, rtol=0)
    assert aug.blur_kernel_size(96) == 5
    assert BatchAugment(ALL_ON).blur_kernel_size(96) == 9  # SimCLR: 10% of the image, odd


def dataclass_replace(config: AugmentConfig, **changes) -> AugmentConfig:
    """dataclasses.replace, named for readability."""
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_channel_permutation_inversion_gain_are_exact():
    """perm reorders channels; invert is 1 - x; gain multiplies per channel and clamps."""
    x = images(3)
    aug = BatchAugment(ALL_ON)
    params = aug.identity_params(3)
    params["perm"] = torch.tensor([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    out = aug.apply(x, params)
    for i in range(3):
        torch.testing.assert_close(out[i], x[i, params["perm"][i]], atol=TOL, rtol=0)
    params = aug.identity_params(3)
    params["invert"] = torch.tensor([True, False, True])
    params["gain"] = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 1.5], [1.0, 1.0, 1.0]])
    out = aug.apply(x, params)
    torch.testing.assert_close(out[0], 1 - x[0], atol=TOL, rtol=0)
    gain = torch.tensor([0.5, 1.0, 1.5]).view(3, 1, 1)
    torch.testing.assert_close(out[1], (x[1] * gain).clamp(0, 1), atol=TOL, rtol=0)


def test_single_channel_images():
    """1-channel images: colour-only ops are identities, geometry still works."""
    x = images(4, 1, 16, 16)
    aug = BatchAugment(ALL_ON)
    params = _jitter_params(aug, 4, saturation=torch.full((4,), 0.0), hue=torch.full((4,), 0.3))
    params["gray"] = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(aug.apply(x, params), x, atol=TOL, rtol=0)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


# --------------------------------------------------------------------------------------------
# Parameter distributions
# --------------------------------------------------------------------------------------------


def test_probabilities_match_config():
    """Empirical rates of every Bernoulli flag lie within 3 sigma of the requested p."""
    n = 4000
    params = BatchAugment(ALL_ON).sample_params(n, "cpu", torch.Generator().manual_seed(1))
    rates = {
        "flip": ALL_ON.flip_p,
        "jitter": ALL_ON.jitter_p,
        "invert": ALL_ON.invert_p,
        "gray": ALL_ON.grayscale_p,
        "blur": ALL_ON.blur_p,
    }
    for key, p in rates.items():
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(params[key].float().mean().item() - p) < 3 * sigma, key
    # a channel permutation is applied with p = 0.5; 1/6 of those draw the identity anyway
    moved = (params["perm"] != torch.arange(3)).any(1).float().mean().item()
    p = ALL_ON.channel_perm_p * 5 / 6
    assert abs(moved - p) < 3 * math.sqrt(p * (1 - p) / n)


def test_crop_area_and_log_ratio_are_uniform():
    """Without rejections the area fraction and the log aspect ratio are uniform (KS test)."""
    config = AugmentConfig(crop_scale=(0.08, 0.5), crop_ratio=(3 / 4, 4 / 3))
    params = BatchAugment(config).sample_params(4000, "cpu", torch.Generator().manual_seed(2))
    top, left, h, w = params["crop"].double().unbind(1)
    area = h * w
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 0.5 + 1e-6
    assert stats.kstest(area.numpy(), stats.uniform(0.08, 0.42).cdf).pvalue > 1e-3
    log_ratio = torch.log(w / h).numpy()
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert stats.kstest(log_ratio, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    # the position is uniform over the free space
    free = (1 - w).numpy()
    assert stats.kstest(left.numpy() / free, stats.uniform(0, 1).cdf).pvalue > 1e-3


def test_crops_stay_inside_the_image_with_rejections():
    """With scale up to 1 many draws do not fit; every box still lies inside the image."""
    for shape in ((32, 32), (20, 40)):
        config = AugmentConfig(crop_scale=(0.6, 1.0), crop_ratio=(0.3, 3.0))
        params = BatchAugment(config).sample_params(
            2000, "cpu", torch.Generator().manual_seed(3), image_shape=shape
        )
        top, left, h, w = params["crop"].unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
        assert (h * w >= 0.6 - 1e-5).all()


def test_crop_fallback_is_torchvisions_central_crop():
    """When no draw fits, the crop is central with the ratio clipped into the range."""
    config = AugmentConfig(crop_scale=(0.9, 1.0), crop_ratio=(2.5, 3.0))  # never fits a square
    params = BatchAugment(config).sample_params(5, "cpu", torch.Generator().manual_seed(0))
    expected = torch.tensor([0.3, 0.0, 0.4, 1.0]).expand(5, 4)  # width 1, height 1 / 2.5
    torch.testing.assert_close(params["crop"], expected)


def test_rotation_and_jitter_factors_uniform_in_range():
    """Angles in [-rot, rot] and brightness in [1 - b, 1 + b], uniform (KS)."""
    params = BatchAugment(ALL_ON).sample_params(3000, "cpu", torch.Generator().manual_seed(4))
    angle = params["angle"].numpy()
    assert stats.kstest(angle, stats.uniform(-180, 360).cdf).pvalue > 1e-3
    bright = params["brightness"].numpy()
    assert stats.kstest(bright, stats.uniform(0.5, 1.0).cdf).pvalue > 1e-3
    hue = params["hue"]
    assert hue.min() >= -0.3 and hue.max() <= 0.3


# --------------------------------------------------------------------------------------------
# Reproducibility, strength, shapes, dtypes
# --------------------------------------------------------------------------------------------


def test_same_generator_seed_same_output_and_independent_samples():
    """Seeded generators reproduce; one batch of identical images gets different views."""
    aug = shapes_recipe(32)
    x = images(1, 3, 32, 32).expand(16, -1, -1, -1).contiguous()
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    distinct = torch.cdist(a.flatten(1), a.flatten(1)) + torch.eye(16)
    assert distinct.min() > 1e-3
    params = aug.sample_params(16, "cpu", torch.Generator().manual_seed(5))
    assert len(set(map(tuple, params["crop"].tolist()))) == 16


def test_strength_zero_is_identity_and_strength_scales_ranges():
    """scaled(0) switches everything off; the mean change grows with strength."""
    base = shapes_recipe().config
    assert base.scaled(0.0).is_identity
    half = base.scaled(0.5)
    assert half.crop_scale[0] == pytest.approx(1 - 0.5 * (1 - base.crop_scale[0]))
    assert math.log(half.crop_ratio[1]) == pytest.approx(0.5 * math.log(base.crop_ratio[1]))
    assert half.jitter_p == pytest.approx(0.5 * base.jitter_p)
    assert half.rotation == pytest.approx(90.0)
    x = images(64, 3, 32, 32)
    identity = BatchAugment(base.scaled(0.0))
    params = identity.sample_params(64, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(identity.apply(x, params), x, atol=TOL, rtol=0)
    change = [
        (shapes_recipe(32, s)(x, torch.Generator().manual_seed(7)) - x).abs().mean().item()
        for s in (0.0, 0.25, 0.5, 1.0)
    ]
    assert change[0] == 0.0
    assert all(a < b for a, b in zip(change[:-1], change[1:], strict=True))


@pytest.mark.parametrize("name", ["simclr_cifar", "simclr_stl10", "shapes", "none"])
def test_recipes_keep_range_shape_and_dtype(name):
    """Outputs are in [0, 1] with the requested size and the input dtype."""
    aug = make_augment(name, 24)
    for dtype in (torch.float32, torch.float64):
        x = images(8, 3, 32, 32).to(dtype)
        out = aug(x, torch.Generator().manual_seed(0))
        assert out.shape == (8, 3, 24, 24) and out.dtype == dtype
        assert out.min() >= 0 and out.max() <= 1


def test_simclr_recipe_numbers():
    """The SimCLR CIFAR recipe of the literature (and no blur unless asked)."""
    cfg = simclr_cifar().config
    assert cfg.crop_scale == (0.08, 1.0) and cfg.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (cfg.flip_p, cfg.jitter_p, cfg.grayscale_p, cfg.blur_p) == (0.5, 0.8, 0.2, 0.0)
    assert make_augment("simclr_stl10", 96).config.blur_p == 0.5


def test_make_views_shape_and_independence():
    """(V, B, C, H, W) with different views of the same image."""
    x = images(5, 3, 32, 32)
    views = make_views(x, simclr_cifar(32), 3, torch.Generator().manual_seed(0))
    assert views.shape == (3, 5, 3, 32, 32)
    assert (views[0] - views[1]).abs().flatten(1).amax(1).min() > 0


def test_autocast_keeps_float32_and_values():
    """Under CPU autocast (bfloat16) the output is float32 and unchanged."""
    aug = BatchAugment(ALL_ON, 32)
    x = images(4, 3, 32, 32)
    ref = aug(x, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_bad_arguments_raise_value_error():
    """Messages name the argument."""
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="flip_p"):
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)
    with pytest.raises(ValueError, match="blur_kernel"):
        AugmentConfig(blur_kernel=4)
    with pytest.raises(ValueError, match="strength"):
        AugmentConfig().scaled(1.5)
    with pytest.raises(ValueError, match="name"):
        make_augment("autoaugment", 32)
    with pytest.raises(ValueError, match="x must"):
        simclr_cifar()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        simclr_cifar()(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="n_views"):
        make_views(images(), simclr_cifar(), 0)
    with pytest.raises(ValueError, match="params"):
        simclr_cifar().apply(images(), {"crop": torch.zeros(4, 4)})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters():
    """Parameters drawn on the CPU give the same images on the GPU."""
    aug = BatchAugment(ALL_ON, 32)
    x = images(8, 3, 32, 32)
    params = aug.sample_params(8, "cpu", torch.Generator().manual_seed(0), image_shape=(32, 32))
    cuda_params = {k: v.cuda() for k, v in params.items()}
    out = aug.apply(x.cuda(), cuda_params)
    torch.testing.assert_close(out.cpu(), aug.apply(x, params), atol=1e-4, rtol=0)
    with torch.autocast("cuda", dtype=torch.float16):
        assert aug(x.cuda(), torch.Generator("cuda").manual_seed(0)).dtype == torch.float32
