"""The random streams of a run, and the global RNG states a checkpoint saves.

Every epoch derives its own generators from ``(seed, stream, epoch[, rank])``: the batch order
(shared by all ranks), the view sources and the augmentations; the held-out geometry subset
has a stream of its own. Together with the saved generator, optimiser and scheduler states this
makes resume exact. Not here: where the generators are used (:mod:`cl_lib.train.trainer`).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

# Streams of per-epoch randomness (see _derive_seed).
_ORDER, _VIEWS, _AUGMENT, _GEOMETRY = 0, 1, 2, 3


def _derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (independent streams via NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as plain values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
