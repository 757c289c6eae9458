"""Two gloo processes on halves of a batch reproduce one process on the whole batch.

Each rank back-propagates its own mean loss; DDP would average the parameter gradients over
the W ranks, i.e. the gradient of ``mean_r L_r``. For the inputs of rank r that gradient is
``grad_r / W``, which must equal the single-process gradient of the whole-batch mean loss.
With view-major ordering, rank r holds instances ``r*n .. (r+1)*n - 1`` of every view.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cl_lib import distributed as cl_dist
from cl_lib import losses as L

WORLD, V, N, D = 2, 2, 6, 5
V3 = 3


def _data() -> dict[str, torch.Tensor]:
    """The whole batch, identical in every process (float64)."""
    g = torch.Generator().manual_seed(0)
    return {
        "views": torch.randn(V, N, D, generator=g, dtype=torch.float64),
        "views3": torch.randn(V3, N, D, generator=g, dtype=torch.float64),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),  # every class on both halves
        "w_cand": torch.rand(V * N, generator=g, dtype=torch.float64) + 0.5,
        "w_pair": torch.rand(V * N, V * N, generator=g, dtype=torch.float64) + 0.5,
    }


def _local_slices(data: dict[str, torch.Tensor], r: int, n: int) -> dict[str, torch.Tensor]:
    """The inputs rank r sees: its instances of every view, its anchors' rows of w_pair."""
    sl = slice(r * n, (r + 1) * n)
    return {
        "views": data["views"][:, sl],
        "views3": data["views3"][:, sl],
        "labels": data["labels"][sl],
        "w_cand": data["w_cand"].reshape(V, N)[:, sl].reshape(-1),
        "w_pair": data["w_pair"].reshape(V, N, V * N)[:, sl].reshape(V * n, V * N),
    }


def _cases(gather: bool) -> dict[str, object]:
    """Loss of (views, inputs) for each case; w_pair is global-column in both settings."""
    return {
        "nt_xent": lambda x, d: L.nt_xent_loss(x, temperature=0.3, gather_distributed=gather),
        "decoupled": lambda x, d: L.decoupled_contrastive_loss(
            x, temperature=0.4, lam=0.7, gather_distributed=gather
        ),
        "balanced_cand": lambda x, d: L.balanced_contrastive_loss(
            x, alpha=1.3, lam=0.6, negative_weights=d["w_cand"], gather_distributed=gather
        ),
        "balanced_pair": lambda x, d: L.balanced_contrastive_loss(
            x, temperature=0.2, negative_weights=d["w_pair"], gather_distributed=gather
        ),
        "debiased": lambda x, d: L.debiased_contrastive_loss(
            x, temperature=0.5, tau_plus=0.1, gather_distributed=gather
        ),
        "supcon_labels": lambda x, d: L.SupConLoss(0.2, gather_distributed=gather)(x, d["labels"]),
        "supcon_instances": lambda x, d: L.SupConLoss(0.2, gather_distributed=gather)(x),
        "class_weights": lambda x, d: L.BalancedContrastiveLoss(
            class_weights=torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
            gather_distributed=gather,
        )(x, d["labels"]),
    }


def _multi_view_cases(gather: bool) -> dict[str, object]:
    """Cases on three views."""
    return {
        "nt_xent_v3": lambda x, d: L.nt_xent_loss(x, gather_distributed=gather),
        "balanced_v3": lambda x, d: L.balanced_contrastive_loss(
            x, alpha=0.7, lam=1.4, include_positive=True, gather_distributed=gather
        ),
    }


def _run_cases(data: dict[str, torch.Tensor], gather: bool) -> dict[str, tuple]:
    """Loss and input gradient of every case."""
    out = {}
    for key, cases in (("views", _cases(gather)), ("views3", _multi_view_cases(gather))):
        for name, fn in cases.items():
            x = data[key].clone().requires_grad_(True)
            loss = fn(x, data)
            loss.backward()
            out[name] = (loss.detach(), x.grad.detach())
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: compute every case on its half and save losses and gradients."""
    torch.set_num_threads(1)  # two ranks share a small CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert cl_dist.is_distributed() and cl_dist.rank() == rank
        local = _local_slices(_data(), rank, N // WORLD)
        torch.save(_run_cases(local, gather=True), os.path.join(out_dir, f"rank{rank}.pt"))
        # the differentiable gather itself: forward concatenates, backward sums and slices
        t = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = cl_dist.all_gather_with_grad(t)
        assert gathered.shape == (4, 3)
        (gathered * torch.arange(1, 5).view(4, 1)).sum().backward()
        expected = torch.arange(1, 5).view(4, 1).expand(4, 3)[2 * rank : 2 * rank + 2] * WORLD
        assert torch.equal(t.grad, expected.float())
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    """Mean of the ranks' losses and grad_r / W equal the single-process loss and gradient."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = _run_cases(_data(), gather=False)
    n = N // WORLD
    for name, (loss, grad) in single.items():
        mean_loss = sum(rk[name][0] for rk in ranks) / WORLD
        torch.testing.assert_close(mean_loss, loss, msg=f"{name}: loss")
        for r, rk in enumerate(ranks):
            torch.testing.assert_close(
                rk[name][1] / WORLD, grad[:, r * n : (r + 1) * n], msg=f"{name}: grad of rank {r}"
            )
