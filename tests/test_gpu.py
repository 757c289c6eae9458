"""GPU readiness: losses under autocast, augmentations on the device, mixed-precision training.

Tests marked ``cuda`` run on a CUDA GPU only (``scripts/gpu_check.sh`` runs them with
``pytest -m cuda``). The loss and augmentation checks are written once for any device and
also run on the CPU (bfloat16 / float16 autocast exist there too), so the GPU versions are
exercised wherever the suite runs; the training checks on the CPU cover the same
checkpoint / resume path without autocast or channels-last, which the trainer enables on
CUDA only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from cl_lib import train as T
from cl_lib.augment import make_augment, make_views
from cl_lib.losses import LOSS_NAMES, make_loss

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
    ],
)
DEVICES = ["cpu", CUDA]
LOW_PRECISION = [torch.float16, torch.bfloat16]

# tau = 0.07: exp(1 / tau) ~ 1.6e6 overflows float16 (max 65504), so a loss that let
# autocast compute its logits or exponentials in half precision would return inf / nan.
# The debiased loss runs at its paper's tau = 0.5: at 0.07 its negative-term estimate sits on
# the e^(-1/tau) floor for these correlated views and the loss saturates (zero gradient).
LOSS_KWARGS: dict[str, dict[str, float]] = {
    "nt_xent": {"temperature": 0.07},
    "decoupled": {"temperature": 0.07, "lam": 0.8},
    "balanced": {"temperature": 0.07, "alpha": 1.5, "lam": 0.5},
    "supcon": {"temperature": 0.07},
    "debiased": {"temperature": 0.5, "tau_plus": 0.1},
}


@contextlib.contextmanager
def no_host_sync(device: str) -> Iterator[None]:
    """On CUDA, make any host-device synchronisation inside the block an error."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


# =========================================================================== losses


def test_every_registered_loss_is_covered() -> None:
    assert set(LOSS_KWARGS) == set(LOSS_NAMES)


def _features(device: str, n: int = 24, d_in: int = 32) -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer and inputs whose two views of each instance are correlated."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, n, d_in, generator=gen)
    x = base + 0.5 * torch.randn(2, n, d_in, generator=gen)
    torch.manual_seed(0)
    return nn.Linear(d_in, 16).to(device), x.to(device)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_loss_under_autocast(device: str, name: str, dtype: torch.dtype) -> None:
    """float32 result from half-precision inputs, equal to the float32 loss of those inputs,
    within a first-order bound of the full float32 loss, and finite gradients.

    The bound: the autocast loss is the float32 loss ``L`` at the rounded features
    ``z + dz`` (checked to 1e-5), so ``|L(z + dz) - L(z)| <= |<grad L(z), dz>| + O(|dz|^2)
    <= ||grad L(z)|| ||dz|| + O(|dz|^2)`` by Cauchy-Schwarz; the factor 2 absorbs the
    second-order term (``|dz| / |z|`` is at most the unit roundoff, 2^-8 for bfloat16, 2^-11
    for float16). A loss that rounded its logits to half precision breaks the 1e-5 equality.
    """
    layer, x = _features(device)
    labels = torch.arange(x.shape[1], device=device) % 4
    loss_fn = make_loss(name, **LOSS_KWARGS[name]).to(device)
    with no_host_sync(device):
        with torch.autocast(device, dtype=dtype):
            z = layer(x)
            loss = loss_fn(z, labels)
        loss.backward()
    assert z.dtype == dtype
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    assert bool(torch.isfinite(layer.weight.grad).all()) and layer.weight.grad.abs().sum() > 0

    same_inputs = loss_fn(z.detach().float(), labels)
    torch.testing.assert_close(loss.detach(), same_inputs, rtol=1e-5, atol=1e-5)

    z32 = layer(x).detach().requires_grad_(True)
    full = loss_fn(z32, labels)
    (grad,) = torch.autograd.grad(full, z32)
    dz = z.detach().float() - z32.detach()
    bound = 2 * grad.norm() * dz.norm() + 1e-5
    assert (loss.detach() - full.detach()).abs() <= bound, (float(loss), float(full), float(bound))


# =========================================================================== augmentations


@pytest.mark.parametrize("recipe", ["simclr_cifar", "shapes"])
@pytest.mark.parametrize("device", DEVICES)
def test_augment_on_device(device: str, recipe: str) -> None:
    """uint8 -> float batch augmented where it lives: shape, dtype, range, determinism."""
    gen = torch.Generator(device=device).manual_seed(0)
    raw = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device=device, generator=gen)
    aug = make_augment(recipe, 32)

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    with no_host_sync(device):
        x = raw.float().div_(255.0)
        a = aug(x, generator=seeded(1))
        b = aug(x, generator=seeded(1))
        c = aug(x, generator=seeded(2))
        views = make_views(x, aug, 2, generator=seeded(3))
        with torch.autocast(device, dtype=torch.bfloat16):
            in_autocast = aug(x, generator=seeded(1))
    for out in (a, c, in_autocast):
        assert out.device == x.device and out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
    assert views.shape == (2, *x.shape) and views.device == x.device
    assert torch.equal(a, b)  # the generator fixes everything
    assert not torch.equal(a, c) and not torch.equal(views[0], views[1])
    assert not torch.equal(a, x)
    torch.testing.assert_close(in_autocast, a)  # autocast does not change the result
    if device == "cuda":  # the same parameters give the same images on the CPU
        params = aug.sample_params(32, device, seeded(4), image_shape=(32, 32))
        on_gpu = aug.apply(x, params)
        on_cpu = aug.apply(x.cpu(), {k: v.cpu() for k, v in params.items()})
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)


# =========================================================================== training

TINY = {
    "seed": 0,
    "checkpoint_every": 1,
    "eval_every": 0,
    "knn_k": 5,
    "geometry_size": 16,
    "amp": True,
    "channels_last": True,
    "data": {"name": "shapes", "size": 96, "test_size": 32},
    "augment": {"name": "shapes"},
    "model": {"head_hidden": 64, "head_out": 32},
    "loss": {"name": "nt_xent", "temperature": 0.2},
    "optim": {"name": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 2, "max_steps": 3},
}


def tiny_config(out_dir: Path, device: str, backbone: str) -> T.TrainConfig:
    """96 shapes, batch 32 (3 steps per epoch), 2 epochs, stopped after 3 steps."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    raw["model"]["backbone"] = backbone
    return T.config_from_dict({**raw, "device": device, "out_dir": str(out_dir)})


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def _check_model(model: nn.Module, device: str) -> None:
    """float32 master weights, finite, on ``device``, conv weights channels-last on CUDA."""
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.device.type == device
        assert bool(torch.isfinite(p).all())
    convs = _conv_weights(model)
    assert convs
    if device == "cuda":
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def _expected_amp_dtype() -> torch.dtype:
    """bfloat16 where the GPU has it natively (compute capability >= 8), else float16.

    ``torch.cuda.is_bf16_supported()`` also says True for *emulated* bfloat16 (e.g. a T4,
    Colab's GPU), which has no bfloat16 tensor cores: float16 with a GradScaler is the fast
    path there.
    """
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no emulation switch (and reports native support)
        native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


@pytest.fixture
def no_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the GPU lacks bfloat16: the trainer falls back to float16 + GradScaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)


TRAIN_CASES = [
    pytest.param("cpu", "small_cnn", False, id="cpu-small_cnn"),
    pytest.param("cuda", "small_cnn", False, id="cuda-small_cnn", marks=CUDA.marks),
    pytest.param("cuda", "resnet18", False, id="cuda-resnet18", marks=CUDA.marks),
    pytest.param("cuda", "small_cnn", True, id="cuda-small_cnn-fp16", marks=CUDA.marks),
]


@pytest.mark.parametrize(("device", "backbone", "fp16"), TRAIN_CASES)
def test_train_steps_mixed_precision_channels_last(
    device: str, backbone: str, fp16: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Three train_step calls: autocast dtype, channels-last inputs, float32 weights."""
    if fp16:
        request.getfixturevalue("no_bf16")
    cfg = tiny_config(tmp_path, device, backbone)
    trainer = T._Trainer(cfg, T._Dist(), torch.device(device))
    if device == "cuda":
        expected = _expected_amp_dtype()
        assert trainer.amp_dtype == expected and trainer.channels_last
        assert trainer.scaler.is_enabled() == (expected == torch.float16)
    else:
        assert trainer.amp_dtype is None and not trainer.channels_last
    seen: dict[str, object] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["channels_last"] = inputs[0].is_contiguous(memory_format=torch.channels_last)
        seen["dtype"] = output.dtype

    first_conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    handle = first_conv.register_forward_hook(hook)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    gens = trainer.epoch_generators(0, None)
    order = trainer.epoch_order(0)
    losses = [trainer.train_step(order[i * 32 : (i + 1) * 32], gens)[0] for i in range(3)]
    handle.remove()
    assert all(loss.dtype == torch.float32 and bool(torch.isfinite(loss)) for loss in losses)
    assert seen["dtype"] == (trainer.amp_dtype or torch.float32)
    assert seen["channels_last"] == (device == "cuda")
    _check_model(trainer.model, device)
    changed = any(
        not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True)
    )
    if trainer.scaler.is_enabled():  # float16: overflowing steps are skipped, the scale drops
        scale = trainer.scaler.get_scale()
        assert 0 < scale < float("inf") and (changed or scale < 2.0**16)
    else:
        assert changed


# on the CPU (two short runs with evaluation, several seconds) it keeps this test's own logic
# checked where no GPU exists
PRETRAIN_CASES = [
    pytest.param(*TRAIN_CASES[0].values, id="cpu-small_cnn", marks=pytest.mark.slow),
    *TRAIN_CASES[1:],
]


@pytest.mark.parametrize(("device", "backbone", "fp16"), PRETRAIN_CASES)
def test_pretrain_checkpoints_and_resumes(
    device: str, backbone: str, fp16: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """pretrain stops after max_steps with a checkpoint, then resumes to the end."""
    if fp16:
        request.getfixturevalue("no_bf16")
    cfg = tiny_config(tmp_path, device, backbone)
    first = T.pretrain(cfg, progress=False)
    assert first.summary["stopped_by_max_steps"] and first.summary["steps"] == 3
    assert first.checkpoint_path.is_file()
    assert [r["epoch"] for r in first.history] == [1]
    assert torch.isfinite(torch.tensor(first.history[0]["loss"]))
    _check_model(first.model, device)
    state = torch.load(first.checkpoint_path, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    scaler = state["scaler"]
    if device == "cuda" and _expected_amp_dtype() == torch.float16:
        assert 0 < scaler["scale"] < float("inf")  # float16 keeps its GradScaler state
    else:
        assert scaler == {}  # bfloat16 / CPU: no loss scaling

    uncapped = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_steps=None))
    resumed = T.pretrain(uncapped, progress=False)
    assert not resumed.summary["stopped_by_max_steps"] and resumed.summary["steps"] == 6
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # restored, not recomputed
    assert torch.isfinite(torch.tensor([r["loss"] for r in resumed.history])).all()
    _check_model(resumed.model, device)
