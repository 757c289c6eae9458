"""Small supervised experiments for Chapter 1 (supervised objectives).

* :func:`load_digits_split` - scikit-learn's 8x8 digits as standardised 64-d feature tensors;
* :func:`make_embedding_mlp` - a seeded two-layer MLP from features to an embedding;
* :func:`balanced_batches` - class-balanced mini-batches (every class in every batch);
* :func:`train_supervised_embedding` - a short CPU training run with the smooth prototype
  objective or SupCon, returning the loss per epoch and embedding snapshots;
* :func:`prototype_stats` - how tightly embeddings gather around their class prototypes and
  the accuracy of the prototype classifier;
* :func:`supcon_prototype_bound` - the prototype form that SupCon upper-bounds (Jensen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lib.losses import class_prototypes, supcon_loss, supervised_prototype_loss

OBJECTIVES = ("prototype", "supcon")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_features_labels(x: Tensor, labels: Tensor, x_name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{x_name} must be a floating-point tensor of shape (N, D)")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype != torch.long:
        raise ValueError("labels must be an int64 tensor of shape (N,)")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have one entry per row of {x_name}: "
            f"got {labels.shape[0]} labels for {x.shape[0]} rows"
        )


@dataclass(frozen=True)
class DigitsSplit:
    """A stratified train/test split of the digits features (standardised with train stats)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10


def load_digits_split(
    test_fraction: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DigitsSplit:
    """scikit-learn's 1797 8x8 digits as (N, 64) features, split stratified by class.

    Features are standardised with the training mean and standard deviation (pixels that
    are constant in the training set are only centred). ``dtype`` is float32 or float64; the
    chapters train in float64, whose results agree across CPUs to far more digits than they
    print (float32 training moves the third digit between CPUs).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    _check_int("seed", seed, 0)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    x_train = torch.as_tensor(x_tr, dtype=dtype)
    x_test = torch.as_tensor(x_te, dtype=dtype)
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return DigitsSplit(
        x_train=(x_train - mean) / std,
        y_train=torch.as_tensor(y_tr, dtype=torch.long),
        x_test=(x_test - mean) / std,
        y_test=torch.as_tensor(y_te, dtype=torch.long),
    )


def make_embedding_mlp(in_dim: int, out_dim: int = 3, hidden: int = 64, seed: int = 0) -> nn.Module:
    """Linear-ReLU-Linear from ``in_dim`` features to ``out_dim`` raw (unnormalised) embeddings.

    The weights are initialised from ``seed`` without touching the global random state.
    """
    _check_int("in_dim", in_dim, 1)
    _check_int("out_dim", out_dim, 2)
    _check_int("hidden", hidden, 1)
    _check_int("seed", seed, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def balanced_batches(
    labels: Tensor, per_class: int, generator: torch.Generator | None = None
) -> Tensor:
    """Index batches of ``per_class`` random members of every class, shape (B, C * per_class).

    Classes are ``0 .. labels.max()``; each must have at least ``per_class`` members. One epoch
    yields ``min_c count_c // per_class`` batches; no index repeats within an epoch.
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype != torch.long:
        raise ValueError("labels must be an int64 tensor of shape (N,)")
    _check_int("per_class", per_class, 1)
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("labels must be non-empty class indices >= 0")
    counts = torch.bincount(labels)
    if int(counts.min()) < per_class:
        raise ValueError(
            f"labels must give every class 0..{counts.numel() - 1} at least per_class="
            f"{per_class} members; the smallest class has {int(counts.min())}"
        )
    keys = torch.rand(labels.shape, generator=generator, device=labels.device)
    order = torch.argsort(labels.to(keys.dtype) + keys)  # grouped by class, shuffled within
    sorted_labels = labels[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
    num_batches = int(counts.min()) // per_class
    keep = rank < num_batches * per_class
    batch_id = rank[keep] // per_class
    members = order[keep][torch.argsort(batch_id, stable=True)]
    return members.view(num_batches, counts.numel() * per_class)


@torch.no_grad()
def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Unit-norm embeddings of ``x`` (evaluation mode, no gradient)."""
    was_training = model.training
    model.eval()
    z = F.normalize(model(x), dim=-1)
    model.train(was_training)
    return z


@dataclass
class SupervisedRun:
    """The result of :func:`train_supervised_embedding`."""

    model: nn.Module
    losses: Tensor  # (epochs,) mean training loss per epoch
    snapshots: dict[int, Tensor] = field(default_factory=dict)  # epoch -> unit embeddings


def _batch_loss(
    z: Tensor, y: Tensor, objective: str, num_classes: int, lam: float, temperature: float
) -> Tensor:
    """The training loss of one batch (prototypes are the batch's own class means)."""
    if objective == "supcon":
        return supcon_loss(z, y, temperature=temperature)
    prototypes = class_prototypes(z, y, num_classes)
    return supervised_prototype_loss(z, y, prototypes, lam=lam, temperature=temperature)


def train_supervised_embedding(
    x: Tensor,
    labels: Tensor,
    *,
    objective: str = "prototype",
    out_dim: int = 3,
    hidden: int = 64,
    epochs: int = 30,
    per_class: int = 16,
    lr: float = 1e-2,
    lam: float = 1.0,
    temperature: float = 0.1,
    seed: int = 0,
    snapshot_x: Tensor | None = None,
    snapshot_epochs: Sequence[int] = (),
) -> SupervisedRun:
    """Train :func:`make_embedding_mlp` on ``(x, labels)`` with Adam and class-balanced batches.

    ``objective="prototype"``: the smooth prototype objective
    ``-<z, mu_y> + lam * LSE_tau_{c != y} <z, mu_c>`` with ``mu`` the batch's class means;
    ``objective="supcon"``: SupCon at ``temperature``. Snapshots are unit embeddings of
    ``snapshot_x`` (default ``x``) after the listed epochs (0 = before training).
    The model takes the dtype of ``x`` (float32 or float64). Deterministic for a given
    ``seed`` on CPU.
    """
    _check_features_labels(x, labels)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    _check_int("epochs", epochs, 1)
    _check_positive("lr", lr)
    _check_positive("lam", lam)
    _check_positive("temperature", temperature)
    snapshot_x = x if snapshot_x is None else snapshot_x
    if not isinstance(snapshot_x, Tensor) or snapshot_x.shape[1:] != x.shape[1:]:
        raise ValueError(f"snapshot_x must be a tensor of shape (M, {x.shape[1]})")
    wanted = set(snapshot_epochs)
    if any(not isinstance(e, int) or isinstance(e, bool) or not 0 <= e <= epochs for e in wanted):
        raise ValueError(f"snapshot_epochs must be ints in [0, {epochs}], got {snapshot_epochs!r}")

    num_classes = int(labels.max()) + 1
    generator = torch.Generator(device=x.device).manual_seed(seed)
    model = make_embedding_mlp(x.shape[1], out_dim, hidden, seed).to(x.device, x.dtype)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    snapshots = {0: embed(model, snapshot_x)} if 0 in wanted else {}
    epoch_losses = []
    for epoch in range(1, epochs + 1):
        batches = balanced_batches(labels, per_class, generator)
        total = torch.zeros((), device=x.device)
        for idx in batches:
            loss = _batch_loss(model(x[idx]), labels[idx], objective, num_classes, lam, temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total = total + loss.detach()
        epoch_losses.append(total / len(batches))
        if epoch in wanted:
            snapshots[epoch] = embed(model, snapshot_x)
    return SupervisedRun(model=model, losses=torch.stack(epoch_losses), snapshots=snapshots)


@dataclass(frozen=True)
class PrototypeStats:
    """Summary of embeddings against class prototypes (see :func:`prototype_stats`)."""

    own_cosine: float  # mean cos(z, mu_y)
    other_cosine: float  # mean max_{c != y} cos(z, mu_c)
    prototype_norm: float  # mean ||mu_c|| (1 = a class collapsed onto one point)
    accuracy: float  # prototype classifier argmax_c <z, mu_c>


@torch.no_grad()
def prototype_stats(
    train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, num_classes: int
) -> PrototypeStats:
    """Prototypes from the training embeddings, evaluated on the test embeddings.

    Cosines use unit prototypes; the prototype classifier predicts ``argmax_c <z, mu_c>``.
    """
    _check_features_labels(train_z, train_y, "train_z")
    _check_features_labels(test_z, test_y, "test_z")
    _check_int("num_classes", num_classes, 2)
    if train_z.shape[1] != test_z.shape[1]:
        raise ValueError("test_z must have as many columns as train_z")
    if int(torch.bincount(train_y, minlength=num_classes).min()) == 0:
        raise ValueError(f"train_y must contain every class 0..{num_classes - 1}")
    prototypes = class_prototypes(train_z, train_y, num_classes)
    z = F.normalize(test_z, dim=-1)
    cos = z @ F.normalize(prototypes, dim=-1).T
    own = cos.gather(1, test_y[:, None]).squeeze(1)
    other = cos.scatter(1, test_y[:, None], float("-inf")).amax(1)
    correct = (z @ prototypes.T).argmax(1) == test_y
    return PrototypeStats(
        own_cosine=own.mean().item(),
        other_cosine=other.mean().item(),
        prototype_norm=prototypes.norm(dim=1).mean().item(),
        accuracy=correct.float().mean().item(),
    )


def supcon_prototype_bound(embeddings: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Per-anchor lower bound of SupCon (``L_out``) by leave-one-out class means, shape (N,).

    For anchor ``i`` with class ``y``, ``m_c`` the mean of the unit embeddings of class ``c``
    without ``i``, and ``n_c`` their number::

        -<z_i, m_y> / tau + log sum_c n_c exp(<z_i, m_c> / tau)

    SupCon's positive term equals the first part exactly; Jensen's inequality on each class's
    block of the denominator gives the second, so SupCon >= this bound, with equality when
    each class's embeddings have equal similarity to the anchor (e.g. a collapsed class).
    Every class present needs at least two members.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        raise ValueError("embeddings must be a tensor of shape (N, D)")
    _check_features_labels(embeddings, labels, "embeddings")
    _check_positive("temperature", temperature)
    z = F.normalize(embeddings, dim=-1)
    onehot = F.one_hot(labels).to(z.dtype)  # (N, C)
    counts = onehot.sum(0)
    present = counts > 0
    if bool((counts[present] < 2).any()):
        raise ValueError("labels must give every class present at least two members")
    sums = onehot.T @ z  # (C, D)
    n_loo = counts.unsqueeze(0) - onehot  # (N, C) members of each class other than i
    dots = (z @ sums.T - onehot) / n_loo.clamp_min(1)  # <z_i, m_c>, using <z_i, z_i> = 1
    log_weights = torch.where(n_loo > 0, n_loo.log(), torch.full_like(n_loo, float("-inf")))
    own = dots.gather(1, labels[:, None]).squeeze(1)
    return -own / temperature + torch.logsumexp(dots / temperature + log_weights, dim=1)
