"""Session-scoped synthetic nuScenes world shared by the data tests (built once, ~10 s)."""
from __future__ import annotations

import pytest

WORLD_SEED = 3
WORLD_SCENES = 3  # 2 mini_train + 1 mini_val scene
WORLD_SAMPLES = 6


@pytest.fixture(scope="session")
def synth_params():
    return dict(seed=WORLD_SEED, scenes=WORLD_SCENES, samples=WORLD_SAMPLES)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """Path of a small generated dataroot (v1.0-mini, 3 scenes x 6 keyframes)."""
    pytest.importorskip("nuscenes")
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
