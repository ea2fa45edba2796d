"""Training checkpoints: written atomically, loaded safely (``weights_only=True``).

A checkpoint holds everything needed to continue a run exactly: model, optimiser, grad scaler,
iteration, sampler position, RNG states (python, numpy, torch CPU and CUDA) and the temporal memory
of every batch slot. Layout (all plain tensors / containers, so ``weights_only`` loading works)::

    {"format": "raydn-train/1", "iteration": int, "model": state_dict, "optimizer": ..., "scaler": ...,
     "sampler": {...}, "rng": {...}, "temporal_state": {name: tensor}, "preset": str,
     "config": {...}, "schedule": {...}}
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from raydn.io import atomic_torch_save  # noqa: F401  (re-exported)
from raydn.safe_load import load_weights_only

FORMAT = "raydn-train/1"


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(weights_only=True)`` with clear errors for missing or unsafe/corrupt files."""
    return load_weights_only(path, map_location=map_location)


def _np_state_to_tensors(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_tensors(d) -> tuple:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


def capture_rng_state() -> dict:
    """RNG states of python, numpy (legacy global), torch CPU and CUDA as weights_only-safe data."""
    py = random.getstate()
    state = {
        "python_version": int(py[0]),
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2] if py[2] is not None else float("nan"),
        "numpy": _np_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    gauss = state["python_gauss"]
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     None if gauss != gauss else gauss))
    np.random.set_state(_np_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
