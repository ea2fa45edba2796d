"""Checkpoints given to ``raydn convert``: the official mmcv layout converts; a missing key, a wrong
shape, an extra key, random bytes, a pickle that would run a command, and an EVA02 checkpoint given to
the R50 preset are refused with a message naming the file and what was expected, a non-zero exit and
no output file.

The fake official checkpoints have the official keys and shapes of the preset (taken from our model
built on the meta device) with one-element storages expanded to each shape, so that even the EVA02-L
file is a few hundred kilobytes."""
from __future__ import annotations

import os

import pytest
import torch

from raydn.cli import main as cli_main
from raydn.interop.convert import MODEL_FORMAT
from raydn.presets import build_model


def fake_official_state_dict(preset: str) -> dict:
    with torch.device("meta"):
        model = build_model(preset)
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


def mmcv_checkpoint(sd: dict) -> dict:
    """The layout of an official RayDN ``.pth`` (mmcv ``save_checkpoint``): meta + state_dict + optimizer."""
    first = next(k for k, v in sd.items() if v.is_floating_point())
    return {
        "meta": {"mmcv_version": "1.6.0", "time": "Sat Apr 13 10:00:00 2024", "epoch": 60, "iter": 105480,
                 "config": "model = dict(type='RepDetr3D', ...)\noptimizer = dict(type='AdamW', lr=4e-4)\n",
                 "CLASSES": ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle",
                             "bicycle", "pedestrian", "traffic_cone")},
        "state_dict": sd,
        "optimizer": {"state": {0: {"step": torch.tensor(105480.0), "exp_avg": torch.zeros(sd[first].shape),
                                    "exp_avg_sq": torch.zeros(sd[first].shape)}},
                      "param_groups": [{"lr": 4e-7, "betas": (0.9, 0.999), "weight_decay": 0.01, "params": [0]}]},
    }


@pytest.fixture(scope="module")
def r50_sd():
    return fake_official_state_dict("r50_raydn")


def _convert(capsys, src, out, *extra):
    rc = cli_main(["convert", str(src), str(out), *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name) or p.suffix == ".tmp"]


def test_official_mmcv_layout_with_meta_and_optimizer_converts(r50_sd, tmp_path, capsys):
    src, out = tmp_path / "raydn_r50.pth", tmp_path / "out" / "r50.pt"
    torch.save(mmcv_checkpoint(r50_sd), src)
    rc, text, err = _convert(capsys, src, out, "--preset", "r50_raydn")
    assert rc == 0, err
    assert f"conversion OK: {len(r50_sd)} keys mapped" in text and "unwrapped: state_dict" in text
    assert "dropped" not in text                      # meta / optimizer are not tensors of the model
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == MODEL_FORMAT and ckpt["preset"] == "r50_raydn" and set(ckpt["model"]) == set(r50_sd)
    # without --preset the preset is detected from the keys and shapes
    rc, text, _ = _convert(capsys, src, tmp_path / "auto.pt")
    assert rc == 0 and "preset: r50_raydn (detected" in text


@pytest.mark.parametrize("damage, expected", [
    ("missing", "missing (expected by the model, absent from the checkpoint) (1):\n    pts_bbox_head.query_embedding.0.weight"),
    ("shape", "shape mismatch (key: checkpoint -> model) (1):\n    pts_bbox_head.query_embedding.0.weight: (7, 7) -> "),
    ("extra", "unexpected (in the checkpoint, unknown to the model) (1):\n    pts_bbox_head.not_a_layer.weight"),
])
def test_damaged_state_dicts_are_reported_and_not_written(r50_sd, tmp_path, capsys, damage, expected):
    sd = dict(r50_sd)
    key = "pts_bbox_head.query_embedding.0.weight"
    assert key in sd
    if damage == "missing":
        del sd[key]
    elif damage == "shape":
        sd[key] = torch.zeros(7, 7)
    else:
        sd["pts_bbox_head.not_a_layer.weight"] = torch.zeros(3)
    src, out = tmp_path / "damaged.pth", tmp_path / "out.pt"
    torch.save(mmcv_checkpoint(sd), src)
    rc, text, err = _convert(capsys, src, out, "--preset", "r50_raydn")
    assert rc == 1
    assert "conversion FAILED" in text and expected in text, text
    assert f"raydn convert: error: {src} does not match the expected model" in err and f"{out} not written" in err
    _no_output(out)


def test_random_bytes_are_not_a_checkpoint_and_no_unsafe_advice(tmp_path, capsys):
    src, out = tmp_path / "random.pth", tmp_path / "out.pt"
    src.write_bytes(os.urandom(1 << 14).replace(b"PK", b"pk").replace(b"\x80", b"\x81"))
    rc, _, err = _convert(capsys, src, out)
    assert rc == 2 and "Traceback" not in err
    assert f"{src}: not a PyTorch checkpoint (16384 bytes starting with" in err, err
    assert "trust" not in err and "unpickling" not in err
    _no_output(out)
    src.write_bytes(b"")
    rc, _, err = _convert(capsys, src, out)
    assert rc == 2 and f"{src}: empty file (0 bytes); expected a PyTorch checkpoint" in err


class _RunsACommand:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_an_arbitrary_object_is_refused_without_executing_it(r50_sd, tmp_path, capsys):
    marker = tmp_path / "EXECUTED"
    src, out = tmp_path / "evil.pth", tmp_path / "out.pt"
    ckpt = mmcv_checkpoint(r50_sd)
    ckpt["meta"]["hook"] = _RunsACommand(marker)
    torch.save(ckpt, src)
    assert not marker.exists()
    rc, _, err = _convert(capsys, src, out)
    assert rc == 2 and "Traceback" not in err
    assert f"{src}: refused to load: the file asks to import 'posix.system'" in err or \
        f"{src}: refused to load: the file asks to import 'nt.system'" in err, err
    assert "nothing was executed" in err and "not a checkpoint to load" in err
    assert not marker.exists()                        # really nothing was executed
    _no_output(out)


def test_eva02_checkpoint_given_to_the_r50_preset(tmp_path, capsys):
    src, out = tmp_path / "raydn_eva02.pth", tmp_path / "out.pt"
    torch.save(mmcv_checkpoint(fake_official_state_dict("eva02l_raydn")), src)
    assert src.stat().st_size < 2_000_000
    rc, text, err = _convert(capsys, src, out, "--preset", "r50_raydn")
    assert rc == 1 and "conversion FAILED" in text
    assert "missing (expected by the model, absent from the checkpoint)" in text and "img_backbone.conv1.weight" in text
    assert "its keys and shapes are those of preset eva02l_raydn: pass --preset eva02l_raydn" in err, err
    _no_output(out)
