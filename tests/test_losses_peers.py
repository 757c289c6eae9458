"""cl_lib.losses against peer implementations on identical random inputs.

Conventions compared like with like:

* lightly ``NTXentLoss(temperature)(out0, out1)``: cross-entropy over the 2N anchors of both
  views (mean), positive in the denominator; normalises inside. Same as ours.
* pytorch-metric-learning ``NTXentLoss``: one loss per *positive pair* (a, p) with denominator
  ``{p} U negatives(a)``, averaged over positive pairs (MeanReducer). Every anchor has exactly
  V - 1 positives, so the mean over pairs equals our mean over anchors of the per-anchor mean
  over positives, for V = 2 (``SelfSupervisedLoss``) and V > 2 (labels = instance ids). It adds
  ``finfo.tiny`` inside the log, far below the tolerance. It builds a pairs x pairs matrix
  (O(N^3) memory), hence N <= 64.
* pytorch-metric-learning ``SupConLoss``: per anchor ``-mean_p log softmax`` over all a != i
  ("L_out"), reduced by ``AvgNonZeroReducer``: the mean over anchors with a non-zero loss. An
  anchor without positive gets 0 there and is skipped by ours, so the means agree.
* lightly ``DCLLoss(temperature)`` (Yeh et al. 2022, no weight function): mean over the anchors
  of one view, symmetrised as 0.5 * (loss0 + loss1) = our mean over all 2N anchors (lam = 1).
* Chuang et al. (2020) debiased loss: re-typed in the test from the authors' published code
  (github.com/chingyaoc/DCL), which has no package to import.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_lib import losses as L

lightly_loss = pytest.importorskip("lightly.loss")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

F64 = torch.float64
CASES = [(4, 3, 0.1), (16, 32, 0.5), (64, 8, 1.0), (33, 128, 0.07)]


def _pair(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated float64 views of n instances."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=F64)
    b = a + 0.5 * torch.randn(n, d, generator=g, dtype=F64)
    return a, b


@pytest.mark.parametrize(("n", "d", "tau"), CASES)
def test_nt_xent_matches_lightly_values_and_gradients(n: int, d: int, tau: float) -> None:
    """Same loss and same gradients w.r.t. both views as lightly's NTXentLoss (float64)."""
    a, b = _pair(n, d, seed=n)
    ours_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    peer_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ours = L.nt_xent_loss(ours_in, temperature=tau)
    peer = lightly_loss.NTXentLoss(temperature=tau)(*peer_in)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-10, abs=1e-10)
    ours.backward()
    peer.backward()
    for x, y in zip(ours_in, peer_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("n", "d", "tau"), CASES)
def test_nt_xent_matches_pml_self_supervised(n: int, d: int, tau: float) -> None:
    """Same loss and gradients as PML SelfSupervisedLoss(NTXentLoss) (float64)."""
    a, b = _pair(n, d, seed=n + 1)
    ours_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    peer_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ours = L.nt_xent_loss(ours_in, temperature=tau)
    peer = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=tau))(*peer_in)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-9, abs=1e-9)
    ours.backward()
    peer.backward()
    for x, y in zip(ours_in, peer_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("num_views", [3, 4])
def test_multi_view_nt_xent_matches_pml(num_views: int) -> None:
    """V > 2 with instance labels: PML averages over positive pairs, we over anchors (equal)."""
    n, d, tau = 10, 6, 0.3
    views = torch.randn(num_views, n, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    peer = pml_losses.NTXentLoss(temperature=tau)(
        views.reshape(num_views * n, d), torch.arange(n).repeat(num_views)
    )
    ours = L.nt_xent_loss(views, temperature=tau)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-9)


@pytest.mark.parametrize(("m", "d", "classes", "tau"), [(12, 4, 3, 0.1), (40, 16, 10, 0.5)])
def test_supcon_matches_pml(m: int, d: int, classes: int, tau: float) -> None:
    """SupCon L_out equals PML SupConLoss (float64), singleton classes included."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, d, generator=g, dtype=F64)
    labels = torch.randint(0, classes, (m,), generator=g)
    labels[0] = classes  # a class with one sample: an anchor without positive
    ours_in, peer_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = L.supcon_loss(ours_in, labels, temperature=tau)
    peer = pml_losses.SupConLoss(temperature=tau)(peer_in, labels)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-9)
    ours.backward()
    peer.backward()
    torch.testing.assert_close(ours_in.grad, peer_in.grad, rtol=1e-7, atol=1e-10)


def test_supcon_matches_pml_float32() -> None:
    """float32 inputs agree to 1e-5 as well."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 8, generator=g)
    labels = torch.randint(0, 4, (32,), generator=g)
    ours = L.supcon_loss(x, labels, temperature=0.2)
    peer = pml_losses.SupConLoss(temperature=0.2)(x, labels)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-5, abs=1e-5)


def _chuang_debiased(out_1: torch.Tensor, out_2: torch.Tensor, tau: float, tau_plus: float):
    """Debiased loss as in the authors' code (chingyaoc/DCL, main.py), normalised inputs."""
    batch_size = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / tau)
    mask = torch.ones((batch_size, 2 * batch_size), dtype=torch.bool)
    for i in range(batch_size):
        mask[i, i] = 0
        mask[i, i + batch_size] = 0
    mask = torch.cat((mask, mask), 0)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / tau)
    pos = torch.cat([pos, pos], dim=0)
    big_n = batch_size * 2 - 2
    ng = (-tau_plus * big_n * pos + neg.sum(dim=-1)) / (1 - tau_plus)
    ng = torch.clamp(ng, min=big_n * np.e ** (-1 / tau))
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize(("tau", "tau_plus"), [(0.5, 0.1), (0.2, 0.0), (0.1, 0.3), (1.0, 0.9)])
def test_debiased_matches_chuang_reference(tau: float, tau_plus: float) -> None:
    """Values and gradients equal the authors' formulation (float64), clamp branch included."""
    a, b = _pair(24, 8, seed=7)
    ours_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ref_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ours = L.debiased_contrastive_loss(ours_in, temperature=tau, tau_plus=tau_plus)
    ref = _chuang_debiased(*(F.normalize(x, dim=1) for x in ref_in), tau, tau_plus)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    ours.backward()
    ref.backward()
    for x, y in zip(ours_in, ref_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-7, atol=1e-10)


def test_debiased_clamp_branch_is_exercised() -> None:
    """With a large prior the estimate hits its floor M e^{-1/tau} for some anchors."""
    a, b = _pair(24, 8, seed=7)
    z = F.normalize(torch.cat([a, b]), dim=1)
    s = z @ z.T
    pos = torch.cat([s.diagonal(24), s.diagonal(-24)]) / 1.0
    same = torch.eye(24, dtype=torch.bool).repeat(2, 2)
    neg = torch.where(same, 0.0, s.exp()).sum(1)
    estimate = (neg - 0.9 * 46 * pos.exp()) / 0.1
    assert bool((estimate < 46 * math.exp(-1.0)).any())


@pytest.mark.parametrize(("n", "d", "tau"), CASES)
def test_decoupled_matches_lightly_dcl(n: int, d: int, tau: float) -> None:
    """Our derived loss with lam = 1 equals lightly's DCLLoss, values and gradients (float64)."""
    a, b = _pair(n, d, seed=n + 2)
    ours_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    peer_in = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    ours = L.decoupled_contrastive_loss(ours_in, temperature=tau)
    peer = lightly_loss.DCLLoss(temperature=tau)(*peer_in)
    assert ours.item() == pytest.approx(peer.item(), rel=1e-9)
    ours.backward()
    peer.backward()
    for x, y in zip(ours_in, peer_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-7, atol=1e-10)
