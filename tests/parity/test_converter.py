"""Official checkpoint <-> raydn state dict conversion (spec §11)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from raydn.cli import main as cli_main
from raydn.config import HeadConfig
from raydn.errors import CheckpointError
from raydn.interop.convert import (
    add_prefix, convert_official_state_dict, load_checkpoint_file, load_official_checkpoint,
    read_key_list, strip_prefix, to_official_state_dict,
)
from raydn.models.head import RayDNHead


def _shared(official_dir):
    pairs = {}
    for line in (official_dir / "state_dict_shared.txt").read_text().splitlines():
        if line.startswith("#") or "\t==\t" not in line:
            continue
        a, _, b = line.split("\t")
        pairs[a] = b
    return pairs


def fake_official(official_dir) -> tuple[dict, dict]:
    """A fake official checkpoint with every key of ``state_dict_keys.txt`` (its shape and
    dtype), distinct values per key, and the aliased keys sharing one tensor."""
    shapes = read_key_list(official_dir / "state_dict_keys.txt")
    dtypes = {l.split("\t")[0]: l.split("\t")[2].strip()
              for l in (official_dir / "state_dict_keys.txt").read_text().splitlines() if l.strip()}
    shared = _shared(official_dir)
    sd = {}
    for i, (k, shape) in enumerate(shapes.items()):
        if k in shared:
            sd[k] = sd[shared[k]]
        elif dtypes[k] == "int64":
            sd[k] = torch.full(shape, i, dtype=torch.int64)
        else:
            sd[k] = torch.full(shape, float(i), dtype=torch.float32)
    return sd, shapes


def test_all_743_keys_map(official_dir):
    sd, shapes = fake_official(official_dir)
    assert len(sd) == 743
    out, report = convert_official_state_dict(sd, expected=shapes)
    assert report.ok, report.summary()
    assert len(report.mapped) == 743 and set(out) == set(shapes)
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    for k, v in sd.items():
        assert out[k] is v
    text = report.summary()
    assert "743 keys mapped" in text and "pts_bbox_head: 283" in text


def test_wrappers_meta_and_module_prefix(official_dir):
    sd, shapes = fake_official(official_dir)
    wrapped = {"meta": {"epoch": 60, "CLASSES": ("car",)}, "optimizer": {"state": {}},
               "state_dict": {"module." + k: v for k, v in sd.items()}}
    out, report = convert_official_state_dict(wrapped, expected=shapes)
    assert report.ok and set(out) == set(shapes)
    assert report.unwrapped == ["state_dict", "module."]


def test_reports_missing_unexpected_shape_and_tied(official_dir):
    sd, shapes = fake_official(official_dir)
    sd = dict(sd)
    del sd["img_neck.fpn_convs.3.conv.bias"]
    sd["pts_bbox_head.some_new.weight"] = torch.zeros(3)
    sd["pts_bbox_head.reference_points.weight"] = torch.zeros(644, 3)
    sd["pts_bbox_head.cls_branches.4.6.bias"] = torch.ones(10)       # breaks the tie
    out, report = convert_official_state_dict(sd, expected=shapes)
    assert not report.ok
    assert report.missing == ["img_neck.fpn_convs.3.conv.bias"]
    assert report.unexpected == ["pts_bbox_head.some_new.weight"]
    assert report.shape_mismatch == {"pts_bbox_head.reference_points.weight": ((644, 3), (300, 3))}
    assert report.tied_mismatch == ["pts_bbox_head.cls_branches.4.6.bias"]
    assert "pts_bbox_head.some_new.weight" not in out
    text = report.summary()
    assert "FAILED" in text and "(644, 3) -> (300, 3)" in text


def test_head_round_trip_and_official_key_set(official_dir):
    shapes = read_key_list(official_dir / "state_dict_keys.txt")
    head_keys = {k: s for k, s in shapes.items() if k.startswith("pts_bbox_head.")}
    torch.manual_seed(0)
    head = RayDNHead(HeadConfig())
    ours = add_prefix(head.state_dict(), "pts_bbox_head.")
    official = to_official_state_dict(ours)
    assert {k: tuple(v.shape) for k, v in official.items()} == head_keys
    back, report = convert_official_state_dict(official, expected=ours)
    assert report.ok
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


def test_official_head_weights_load(official_dir):
    from tests.conftest import load_fixture
    official = load_fixture("head_weights.pt")
    sd, report = convert_official_state_dict(add_prefix(official, "pts_bbox_head."))
    assert report.ok
    head = RayDNHead(HeadConfig())
    head.load_state_dict(strip_prefix(sd, "pts_bbox_head."), strict=True)
    for i in range(6):
        assert torch.equal(head.cls_branches[i][0].weight, official["cls_branches.0.0.weight"])
    assert torch.equal(head.transformer.decoder.layers[5].ffns[0].layers[1].weight,
                       official["transformer.decoder.layers.5.ffns.0.layers.1.weight"])
    assert not head.pseudo_reference_points.weight.requires_grad


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.pts_bbox_head = RayDNHead(HeadConfig(num_layers=6))


def test_load_official_checkpoint_file_and_errors(official_dir, tmp_path):
    from tests.conftest import load_fixture
    official = add_prefix(load_fixture("head_weights.pt"), "pts_bbox_head.")
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": official, "meta": {"epoch": 1}}, path)
    model = _Wrapper()
    report = load_official_checkpoint(path, model)
    assert report.ok
    assert torch.equal(model.pts_bbox_head.reference_points.weight,
                       official["pts_bbox_head.reference_points.weight"])
    # strict mismatch -> CheckpointError with the report
    bad = dict(official)
    del bad["pts_bbox_head.pc_range"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="pts_bbox_head.pc_range"):
        load_official_checkpoint(tmp_path / "bad.pth", _Wrapper())
    # a pickle that needs arbitrary classes -> clear CheckpointError
    torch.save({"state_dict": official, "meta": {"obj": _Unsafe()}}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="unsafe unpickling"):
        load_checkpoint_file(tmp_path / "unsafe.pth")
    assert "state_dict" in load_checkpoint_file(tmp_path / "unsafe.pth", trust=True)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "nope.pth")


class _Unsafe:
    pass


def test_cli_convert(official_dir, tmp_path, capsys):
    sd, _ = fake_official(official_dir)
    src, out = tmp_path / "official.pth", tmp_path / "out" / "raydn.pt"
    torch.save({"state_dict": sd, "meta": {"epoch": 3}}, src)
    keys = str(official_dir / "state_dict_keys.txt")
    assert cli_main(["convert", str(src), str(out), "--keys", keys]) == 0
    assert "conversion OK: 743 keys mapped" in capsys.readouterr().out
    loaded = torch.load(out, weights_only=True)
    assert loaded["format"] == "raydn-model/1" and loaded["preset"] == "r50_raydn"  # detected
    model_sd = loaded["model"]
    assert len(model_sd) == 743
    assert torch.equal(model_sd["img_backbone.conv1.weight"], sd["img_backbone.conv1.weight"])
    assert not list(out.parent.glob("*.tmp"))
    # mismatch -> exit 1, nothing written
    bad = dict(sd)
    del bad["img_backbone.conv1.weight"]
    torch.save(bad, src)
    out2 = tmp_path / "out2.pt"
    assert cli_main(["convert", str(src), str(out2), "--keys", keys]) == 1
    assert not out2.exists()
    assert "missing" in capsys.readouterr().out
    # unreadable input -> clean user error (exit 2)
    assert cli_main(["convert", str(tmp_path / "missing.pth"), str(out2)]) == 2
