"""Higher derivatives and torch.func transforms through the fused view losses.

The balanced family without ``negative_weights`` (NT-Xent, decoupled, balanced, the
components) runs a fused autograd function; with ``negative_weights`` of ones the same losses
run plain differentiable operations (the reference). Second derivatives (gradient penalties,
Hessian-vector products) and torch.func transforms must agree with the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from cl_lib import losses as L

V, N, D = 2, 6, 5


def _ones(x: Tensor) -> Tensor:
    return torch.ones(x.shape[0] * x.shape[1], dtype=x.dtype)


# name -> (fused loss, reference through the non-fused path with unit weights)
LOSSES: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    "nt_xent": (
        lambda x, **kw: L.nt_xent_loss(x, **kw),
        lambda x, **kw: L.balanced_contrastive_loss(
            x, include_positive=True, negative_weights=_ones(x), **kw
        ),
    ),
    "decoupled": (
        lambda x, **kw: L.decoupled_contrastive_loss(x, lam=0.7, **kw),
        lambda x, **kw: L.balanced_contrastive_loss(x, lam=0.7, negative_weights=_ones(x), **kw),
    ),
    "balanced": (
        lambda x, **kw: L.balanced_contrastive_loss(x, alpha=1.3, lam=0.6, **kw),
        lambda x, **kw: L.balanced_contrastive_loss(
            x, alpha=1.3, lam=0.6, negative_weights=_ones(x), **kw
        ),
    ),
}
SETTINGS = [
    {"temperature": 0.5},
    {"temperature": 0.01},  # the shifted (small temperature) branch
    {"temperature": 0.5, "normalize": False},
]


def _views(seed: int = 0, views: int = V) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(views, N, D, generator=gen, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kw", SETTINGS)
def test_hessian_vector_product_matches_the_non_fused_path(name: str, kw: dict) -> None:
    fused, reference = LOSSES[name]
    x = _views(1)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    hvps = []
    for loss in (fused, reference):
        (g,) = torch.autograd.grad(loss(x, **kw), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), x)
        hvps.append(hv)
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-9, atol=1e-12)
    assert hvps[1].abs().max() > 1e-3  # a real second-order term, not zero on both sides


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_penalty_backward_matches_the_non_fused_path(name: str) -> None:
    """loss + |dloss/dz|^2 back-propagated into a linear encoder's weights."""
    fused, reference = LOSSES[name]
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(V, N, 7, generator=gen, dtype=torch.float64)
    grads = []
    for loss in (fused, reference):
        w = torch.randn(7, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        w.requires_grad_()
        z = inputs @ w
        value = loss(z, temperature=0.3)
        (gz,) = torch.autograd.grad(value, z, create_graph=True)
        (value + gz.pow(2).sum()).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kw", SETTINGS)
def test_gradgradcheck(name: str, kw: dict) -> None:
    fused, _ = LOSSES[name]
    x = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fused(t, **kw), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fused(t, **kw), (x,), fast_mode=True)


def test_components_second_derivatives_match_the_reference() -> None:
    x = _views(6)
    (g,) = torch.autograd.grad(
        L.contrastive_components(x, temperature=0.4).negative_lse.sum(), x, create_graph=True
    )
    (h,) = torch.autograd.grad(g.pow(2).sum(), x)
    z = torch.nn.functional.normalize(x, dim=-1).reshape(V * N, D)
    logits = z @ z.T / 0.4
    same = torch.arange(V * N) % N
    masked = logits.masked_fill(same[:, None] == same[None, :], float("-inf"))
    (g_ref,) = torch.autograd.grad(torch.logsumexp(masked, 1).sum(), x, create_graph=True)
    (h_ref,) = torch.autograd.grad(g_ref.pow(2).sum(), x)
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_torch_func_grad_and_vmap(name: str) -> None:
    fused, reference = LOSSES[name]
    x = _views(7).detach()
    (expected,) = torch.autograd.grad(reference(x.requires_grad_(), temperature=0.5), x)
    x = x.detach()
    torch.testing.assert_close(torch.func.grad(lambda t: fused(t, temperature=0.5))(x), expected)
    batch = torch.stack([x, _views(8).detach()])
    values = torch.func.vmap(lambda t: fused(t, temperature=0.5))(batch)
    torch.testing.assert_close(values, torch.stack([fused(b, temperature=0.5) for b in batch]))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: fused(t, temperature=0.5)))(batch)
    assert per_sample.shape == batch.shape
    torch.testing.assert_close(per_sample[0], expected)


def test_first_order_gradients_are_unchanged() -> None:
    """The fused first-order backward (no create_graph) still equals the reference."""
    for fused, reference in LOSSES.values():
        x = _views(9)
        (a,) = torch.autograd.grad(fused(x, temperature=0.2), x)
        (b,) = torch.autograd.grad(reference(x, temperature=0.2), x)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
