"""``raydn convert`` end to end (through ``raydn.cli.main``) and ``load_model`` on its output and
on raydn training checkpoints."""
from __future__ import annotations

import pytest
import torch

from raydn.cli import main as cli_main
from raydn.errors import CheckpointError
from raydn.interop.convert import MODEL_FORMAT, TRAIN_FORMAT, load_model, read_key_list
from raydn.presets import build_model


def _shared(path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "\t==\t" in line and not line.startswith("#"):
            a, _, b = line.split("\t")
            out[a] = b
    return out


@pytest.fixture(scope="module")
def fake_official(official_dir):
    """Random tensors with the official R50 key names, shapes and dtypes (tied keys aliased)."""
    shapes = read_key_list(official_dir / "state_dict_keys.txt")
    dtypes = {l.split("\t")[0]: l.split("\t")[2].strip()
              for l in (official_dir / "state_dict_keys.txt").read_text().splitlines() if l.strip()}
    shared = _shared(official_dir / "state_dict_shared.txt")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in shapes.items():
        if k in shared:
            sd[k] = sd[shared[k]]
        elif dtypes[k] == "int64":
            sd[k] = torch.randint(0, 1000, shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def official_file(fake_official, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "raydn_r50.pth"
    meta = {"epoch": 60, "iter": 42180, "mmcv_version": "1.7.2",
            "CLASSES": ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
                        "motorcycle", "bicycle", "pedestrian", "traffic_cone")}
    torch.save({"meta": meta, "state_dict": fake_official}, path)
    return path


def test_convert_writes_a_model_file_that_loads_strictly(official_file, fake_official, tmp_path,
                                                         capsys):
    out = tmp_path / "sub" / "r50.pt"
    assert cli_main(["convert", str(official_file), str(out), "--preset", "r50_raydn"]) == 0
    text = capsys.readouterr().out
    assert "conversion OK: 743 keys mapped" in text
    assert not list(out.parent.glob("*.tmp"))
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["format"] == MODEL_FORMAT and ckpt["preset"] == "r50_raydn"
    assert ckpt["source"] == official_file.name
    model = build_model("r50_raydn")
    model.load_state_dict(ckpt["model"], strict=True)
    sd = model.state_dict()
    for k, v in fake_official.items():
        assert torch.equal(sd[k], v), k
    # load_model builds the recorded preset
    loaded = load_model(out)
    assert loaded.preset == "r50_raydn"
    assert torch.equal(loaded.pts_bbox_head.reference_points.weight,
                       fake_official["pts_bbox_head.reference_points.weight"])
    # an official file is also accepted directly (preset detected from keys and shapes)
    direct = load_model(official_file)
    assert direct.preset == "r50_raydn"
    assert torch.equal(direct.img_backbone.conv1.weight, fake_official["img_backbone.conv1.weight"])


def test_convert_records_a_chosen_variant(official_file, tmp_path):
    out = tmp_path / "baseline.pt"
    assert cli_main(["convert", str(official_file), str(out), "--preset", "r50_repdetr3d"]) == 0
    model = load_model(out)
    assert model.preset == "r50_repdetr3d"
    assert not model.cfg.head.denoising.ray.enabled


@pytest.mark.parametrize("case", ["missing-key", "wrong-shape"])
def test_convert_mismatch_fails_without_output(case, fake_official, tmp_path, capsys):
    sd = dict(fake_official)
    key = "pts_bbox_head.reference_points.weight"
    if case == "missing-key":
        del sd[key]
    else:
        sd[key] = torch.zeros(299, 3)
    src, out = tmp_path / "bad.pth", tmp_path / "out.pt"
    torch.save({"meta": {"epoch": 1}, "state_dict": sd}, src)
    assert cli_main(["convert", str(src), str(out), "--preset", "r50_raydn"]) == 1
    cap = capsys.readouterr()
    assert key in cap.out
    assert ("missing" if case == "missing-key" else "(299, 3) -> (300, 3)") in cap.out
    assert "not written" in cap.err and str(src) in cap.err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


class _Unsafe:
    """Any class outside the ``weights_only`` allow-list makes the pickle unsafe."""


def test_convert_unsafe_pickle_is_refused(fake_official, tmp_path, capsys):
    src, out = tmp_path / "unsafe.pth", tmp_path / "out.pt"
    torch.save({"meta": {"hook": _Unsafe()},
                "state_dict": {"pts_bbox_head.pc_range": fake_official["pts_bbox_head.pc_range"]}},
               src)
    assert cli_main(["convert", str(src), str(out), "--preset", "r50_raydn"]) == 2
    err = capsys.readouterr().err
    assert "unsafe unpickling" in err and str(src) in err and "--trust-checkpoint" in err
    assert not out.exists()


def test_convert_usage_errors(official_file, tmp_path, capsys):
    out = tmp_path / "out.pt"
    assert cli_main(["convert", str(official_file), str(out), "--preset", "r51_raydn"]) == 2
    assert "unknown preset 'r51_raydn'" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "nope.pth"), str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_load_model_accepts_a_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny_raydn")
    path = tmp_path / "iter_0000003.pt"
    torch.save({"format": TRAIN_FORMAT, "iteration": 3, "preset": "tiny_raydn",
                "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "config": "{}"}, path)
    loaded = load_model(path)
    assert loaded.preset == "tiny_raydn"
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # a wrong explicit preset and an unknown format are clear errors naming the file
    with pytest.raises(CheckpointError, match="is preset 'tiny_raydn' but preset 'r50_raydn' was requested"):
        load_model(path, preset="r50_raydn")
    torch.save({"format": "something/9", "model": {}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'something/9'"):
        load_model(tmp_path / "odd.pt")
    torch.save({"x.weight": torch.zeros(2)}, tmp_path / "alien.pt")
    with pytest.raises(CheckpointError, match="names no preset"):
        load_model(tmp_path / "alien.pt")
