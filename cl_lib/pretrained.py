"""A small pretrained encoder of the book's working recipe, for chapters that analyse one.

``results/pretrained/shapes_small_cnn.pt`` holds the model that ``configs/shapes_quick.yaml``
trains (SmallCNN with its projection head, NT-Xent, seed 0, 682 steps), stripped of its
optimiser state; ``shapes_small_cnn.json`` beside it holds its provenance and the kNN accuracy
the training run measured. :func:`load_pretrained` reads both, from the checkout or, outside
one (Colab), from the course's source (:func:`cl_lib.source.fetch_result`).
:func:`save_pretrained` makes them from a finished run folder.

What does not live here: training (:mod:`cl_lib.train`) and the kNN protocol
(:mod:`cl_lib.evaluate`); ``tests/test_pretrained.py`` checks that the stored encoder still
scores what its record says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_lib.files import atomic_write, write_json
from cl_lib.provenance import REPO_ROOT, git_state, machine

__all__ = ["PRETRAINED", "load_pretrained", "save_pretrained"]

PRETRAINED = "shapes_small_cnn"
"""The name of the stored encoder (``results/pretrained/<name>.pt`` and ``.json``)."""
_FOLDER = "pretrained"
_KEPT = ("config", "epoch", "model", "model_kwargs")  # what evaluation needs, no optimiser


def save_pretrained(run_dir: str | os.PathLike, name: str = PRETRAINED) -> dict[str, Any]:
    """Store the model of a finished run folder as ``results/pretrained/<name>.pt`` + ``.json``.

    The record holds the run's summary (kNN of the trained encoder, of raw pixels and of the
    random initialisation), its config and the provenance of the code and machine.
    """
    run_dir = Path(run_dir)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    slim = {key: state[key] for key in _KEPT}
    folder = REPO_ROOT / "results" / _FOLDER
    atomic_write(folder / f"{name}.pt", lambda f: torch.save(slim, f))
    commit, dirty = git_state()
    record = {
        "name": name,
        "summary": summary,
        "config": state["config"],
        "provenance": {"git_commit": commit, "git_dirty": dirty, **machine()},
    }
    write_json(folder / f"{name}.json", record)
    return record


def load_pretrained(
    name: str = PRETRAINED, device: torch.device | str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The stored encoder (evaluation mode) and its record (summary, config, provenance)."""
    from cl_lib.source import fetch_result
    from cl_lib.train import load_checkpoint_model

    record_path = fetch_result(f"{_FOLDER}/{name}.json", REPO_ROOT)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    model, _, _ = load_checkpoint_model(fetch_result(f"{_FOLDER}/{name}.pt", REPO_ROOT), device)
    return model, record
