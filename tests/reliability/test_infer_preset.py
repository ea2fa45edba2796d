"""``--preset`` never overrides the preset a model file records (issue 17): the checkpoint's own
preset wins, a different ``--preset`` is a one-line error naming both, the same name is fine, and
``--preset`` names the preset only of files that record none. One function decides it
(``raydn.interop.convert.resolve_preset``) for ``load_model`` and every command that takes
``--preset`` with a model file: ``infer``, ``export``, ``convert`` (``eval`` takes no ``--preset``).
The onnxruntime side (an export's recorded preset) is in test_export_consistency.py."""
from __future__ import annotations

import json

import pytest
import torch

from raydn.cli import main
from raydn.errors import CheckpointError
from raydn.interop.convert import load_model, save_model_file
from raydn.presets import build_model
from _deps import require

PRESET = "tiny_raydn"


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return build_model(PRESET).state_dict()


@pytest.fixture(scope="module")
def named(weights, tmp_path_factory):
    """A raydn model file that records preset tiny_raydn."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_model_file(weights, path, PRESET, source="test")
    return path


@pytest.fixture(scope="module")
def bare(weights, tmp_path_factory):
    """A plain state dict (names no preset), as an official .pth."""
    path = tmp_path_factory.mktemp("ckpt") / "bare.pth"
    torch.save(dict(weights), path)
    return path


def _cli(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_load_model_keeps_the_recorded_preset_and_refuses_another(named, bare):
    # r50_raydn would change the input size (256x704 instead of 128x352); tiny_repdetr3d has the
    # very same weights, so nothing but this check would notice the swap
    for other in ("r50_raydn", "tiny_repdetr3d"):
        with pytest.raises(CheckpointError, match=rf"tiny\.pt: the model is preset 'tiny_raydn' but "
                                                  rf"preset '{other}' was requested"):
            load_model(named, other)
    assert load_model(named, PRESET).preset == PRESET          # the same name twice: fine
    assert load_model(named).preset == PRESET
    # a file that names none: --preset names it (else detection by keys and shapes)
    assert load_model(bare, "tiny_repdetr3d").preset == "tiny_repdetr3d"
    assert load_model(bare).preset == PRESET


def test_infer_refuses_a_preset_other_than_the_checkpoints(named, tmp_path, capsys):
    out = tmp_path / "dets.jsonl"
    rc, _, err = _cli(capsys, "infer", "--checkpoint", str(named), "--preset", "r50_raydn",
                      "--dataroot", str(tmp_path / "no_data"), "--out", str(out))
    assert rc == 2
    assert err.startswith("raydn infer: error: ") and len(err.strip().splitlines()) == 1
    assert "'tiny_raydn'" in err and "'r50_raydn'" in err
    assert not out.exists()


def test_infer_with_the_checkpoints_own_preset_runs_at_its_input_size(named, synth_world, tmp_path, capsys):
    require("nuscenes")
    scene = json.loads((synth_world / "v1.0-mini" / "scene.json").read_text())[0]["name"]
    out = tmp_path / "dets.jsonl"
    rc, text, err = _cli(capsys, "infer", "--checkpoint", str(named), "--preset", PRESET,
                         "--dataroot", str(synth_world), "--scene", scene, "--limit", "1",
                         "--workers", "0", "--no-progress", "--out", str(out))
    assert rc == 0, err
    assert f"preset {PRESET}" in text
    assert len(out.read_text().splitlines()) == 1


def test_export_refuses_a_preset_other_than_the_checkpoints(named, tmp_path, capsys):
    out = tmp_path / "onnx"
    rc, _, err = _cli(capsys, "export", "--checkpoint", str(named), "--preset", "tiny_repdetr3d",
                      "--out", str(out), "--no-check")
    assert rc == 2 and "'tiny_raydn'" in err and "'tiny_repdetr3d'" in err
    assert not out.exists()


def test_convert_keeps_the_preset_a_raydn_model_file_records(named, tmp_path, capsys):
    out = tmp_path / "out.pt"
    rc, _, err = _cli(capsys, "convert", str(named), str(out), "--preset", "tiny_repdetr3d")
    assert rc == 2 and "'tiny_raydn'" in err and "'tiny_repdetr3d'" in err
    assert not out.exists()
    rc, text, err = _cli(capsys, "convert", str(named), str(out))
    assert rc == 0, err
    assert torch.load(out, weights_only=True)["preset"] == PRESET


def test_convert_records_the_given_preset_for_a_file_that_names_none(bare, tmp_path, capsys):
    out = tmp_path / "out.pt"
    rc, _, err = _cli(capsys, "convert", str(bare), str(out), "--preset", "tiny_repdetr3d")
    assert rc == 0, err
    assert torch.load(out, weights_only=True)["preset"] == "tiny_repdetr3d"
