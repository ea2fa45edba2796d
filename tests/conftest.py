"""Shared pytest fixtures.

``shared_dir``: the ``../shared`` folder beside the checkout (override with RAYDN_SHARED). Parity
tests need it; they are skipped where it is absent, except under CI (CI=true) where that fails.
Optional packages follow the same rule: ``tests/_deps.py`` ``require``.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning OpenMP threads

import pytest
import torch

from _deps import require, under_ci

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYDN_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "official"


def pytest_configure(config):
    # under pytest-xdist every worker gets one thread (no oversubscription of the 2 cores)
    threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not FIXTURES.is_dir():
        if under_ci():
            pytest.fail(f"official fixtures not found at {FIXTURES}")
        pytest.skip(f"official fixtures not found at {FIXTURES}")
    return FIXTURES


def load_fixture(name: str):
    """Load ``../shared/fixtures/official/<name>`` safely (weights_only)."""
    path = FIXTURES / name
    if not path.exists():
        if under_ci():
            pytest.fail(f"official fixture missing: {path}")
        pytest.skip(f"official fixture missing: {path}")
    return torch.load(path, weights_only=True, map_location="cpu")


# ---------------------------------------------------------------- synthetic world
# Session-scoped synthetic nuScenes world shared by all tests (built once per worker, ~10 s).

WORLD_SEED = 3
WORLD_SCENES = 3  # 2 mini_train + 1 mini_val scene
WORLD_SAMPLES = 6


@pytest.fixture(scope="session")
def synth_params():
    return dict(seed=WORLD_SEED, scenes=WORLD_SCENES, samples=WORLD_SAMPLES)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """Path of a small generated dataroot (v1.0-mini, 3 scenes x 6 keyframes)."""
    require("nuscenes")
    from raydn.data.synth import generate_world
    root = tmp_path_factory.mktemp("synth") / "nuscenes"
    generate_world(root, scenes=WORLD_SCENES, seed=WORLD_SEED, samples_per_scene=WORLD_SAMPLES,
                   workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def synth_nusc(synth_world):
    from nuscenes.nuscenes import NuScenes
    return NuScenes(version="v1.0-mini", dataroot=str(synth_world), verbose=False)


@pytest.fixture(scope="session")
def synth_infos(synth_world, tmp_path_factory):
    """(out folder, {split: path}) of the info pickles of the session world."""
    from raydn.data.prepare import prepare_infos
    out = tmp_path_factory.mktemp("infos")
    return out, prepare_infos(synth_world, "v1.0-mini", out, progress=False)


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A ``raydn`` model file (``save_model_file``) of the tiny_raydn preset, weights from seed 0;
    read-only (``--checkpoint`` of the CLI tests)."""
    from raydn.interop.convert import save_model_file
    from raydn.presets import build_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model_file(build_model("tiny_raydn").state_dict(), path, "tiny_raydn")
    return path
