"""Official initialisation (issue 18 item 1): --pretrained / --load-from / --from-scratch, the
presets' InitSpec, the non-strict whole-detector loading and its report, the init check before any
work. Weight files are built from the official key lists (tests/engine/init_files.py)."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raydn.engine.initialisation import InitialisationError, apply_initialisation, plan_initialisation
from raydn.engine.train import TrainOptions
from raydn.errors import CheckpointError
from raydn.interop.convert import load_detector_weights
from raydn.presets import EVA02L_INIT, NUIMAGES_R50_INIT, build_model, get_preset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from init_files import constant, eva02l_remapped_file, nuimages_r50_file, value_of  # noqa: E402


def _opts(**kw) -> TrainOptions:
    return TrainOptions(**{"preset": "r50_raydn", "data": "unused.pkl", **kw})


# ------------------------------------------------------------------------------ presets
def test_official_presets_state_their_initialisation():
    for name in ("r50_raydn", "r50_repdetr3d"):
        spec = get_preset(name).init
        assert spec is NUIMAGES_R50_INIT and spec.kind == "backbone" and spec.flag == "--pretrained"
        # mmdet's publish_model names the file with the first 8 hex digits of its sha256
        assert spec.file_name.endswith(f"-{spec.sha256_prefix}.pth")
        assert spec.source.endswith(spec.file_name) and spec.source.startswith("https://")
    for name in ("eva02l_raydn", "eva02l_repdetr3d"):
        spec = get_preset(name).init
        assert spec is EVA02L_INIT and spec.kind == "detector" and spec.flag == "--load-from"
        assert spec.file_name == "eva02_L_coco_det_sys_o365_remapped.pth" and spec.how
    for name in ("tiny_raydn", "tiny_repdetr3d", "demo_raydn", "demo_repdetr3d"):
        assert get_preset(name).init is None


# ------------------------------------------------------------------------------ the plan
def test_official_preset_without_initialisation_is_refused_with_the_file_and_flags():
    with pytest.raises(InitialisationError) as e:
        plan_initialisation(get_preset("r50_raydn"), _opts(), resuming=False)
    msg = str(e.value)
    assert "\n" not in msg
    for part in (NUIMAGES_R50_INIT.file_name, NUIMAGES_R50_INIT.source, "--pretrained PATH",
                 "--load-from PATH", "--from-scratch"):
        assert part in msg
    with pytest.raises(InitialisationError, match="eva02_L_coco_det_sys_o365_remapped.pth.*--load-from PATH"):
        plan_initialisation(get_preset("eva02l_raydn"), _opts(preset="eva02l_raydn"), resuming=False)


def test_plan_rules(tmp_path):
    f = tmp_path / "w.pth"
    torch.save({}, f)
    r50 = get_preset("r50_raydn")
    assert plan_initialisation(r50, _opts(from_scratch=True), False).from_scratch
    assert "from scratch" in plan_initialisation(r50, _opts(from_scratch=True), False).describe()
    p = plan_initialisation(r50, _opts(pretrained=str(f), load_from=str(f)), False)
    assert (p.pretrained, p.pretrained_from, p.load_from) == (str(f), "--pretrained", str(f))
    with pytest.raises(InitialisationError, match="--from-scratch contradicts --pretrained"):
        plan_initialisation(r50, _opts(pretrained=str(f), from_scratch=True), False)
    with pytest.raises(InitialisationError, match="--load-from .*nope.pth: file not found"):
        plan_initialisation(r50, _opts(load_from=str(tmp_path / "nope.pth")), False)
    # resuming: nothing needed, given flags are named as not applied
    p = plan_initialisation(r50, _opts(pretrained=str(f)), resuming=True)
    assert p.resuming and "--pretrained not applied" in p.describe()
    assert apply_initialisation(None, p) == []
    # the tiny preset needs nothing; the demo keeps its ImageNet backbone unless --from-scratch
    assert plan_initialisation(get_preset("tiny_raydn"), _opts(preset="tiny_raydn"), False).pretrained is None
    demo = plan_initialisation(get_preset("demo_raydn"), _opts(preset="demo_raydn"), False)
    assert (demo.pretrained, demo.pretrained_from) == ("imagenet", "preset")
    assert plan_initialisation(get_preset("demo_raydn"), _opts(preset="demo_raydn", from_scratch=True),
                               False).pretrained is None
    # a backbone file set through the model configuration counts as the initialisation
    cfg = replace(r50.model, backbone=replace(r50.model.backbone, pretrained=str(f)))
    assert plan_initialisation(r50, _opts(), False, model_cfg=cfg).pretrained == str(f)


# ------------------------------------------------------------------------------ R50 nuImages
@pytest.fixture(scope="module")
def nuimages(official_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / NUIMAGES_R50_INIT.file_name
    return path, nuimages_r50_file(path, official_dir)


def test_nuimages_backbone_loads_all_318_resnet50_tensors(nuimages):
    path, values = nuimages
    model = build_model("r50_raydn")
    head_before = model.pts_bbox_head.state_dict()["query_embedding.0.weight"].clone()
    plan = plan_initialisation(get_preset("r50_raydn"), _opts(pretrained=str(path)), False)
    (rep,) = apply_initialisation(model, plan)
    assert rep.kind == "backbone" and "backbone.*" in rep.layout
    assert len(rep.loaded) == 318 and len(values) == 318
    assert not rep.missing and not rep.unexpected and not rep.skipped
    # nothing silently dropped: the neck / RPN / RoI keys of the file are listed as ignored
    assert {k.split(".")[0] for k in rep.ignored} == {"neck", "rpn_head", "roi_head"}
    assert len(rep.ignored) == 16 + 6 + 3 * 8 + 3 * 12
    sd = model.state_dict()
    for k, v in values.items():  # every backbone tensor holds the file's constant for its key
        assert torch.all(sd[k] == v), k
    assert torch.equal(model.pts_bbox_head.state_dict()["query_embedding.0.weight"], head_before)
    # the digest is recorded and compared with the official file's prefix (this file is not it)
    assert len(rep.sha256) == 64 and any("not the official" in n for n in rep.notes)
    assert "loaded 318 tensors" in rep.summary() and "neck.* (16)" in rep.summary()


def test_nuimages_file_given_to_load_from_says_to_use_pretrained(nuimages):
    path, _ = nuimages
    with pytest.raises(CheckpointError, match="none of its .* tensors fits.*give it to --pretrained"):
        load_detector_weights(build_model("tiny_raydn"), path)


# ------------------------------------------------------------------------------ non-strict load_from
def _official_tiny_file(path, model, other_shapes=(), drop=(), extra=(), untie=None):
    """The official layout of ``model`` (its own keys: the official names), every tensor a distinct
    constant (the tied copies of the cls / reg branches one value, as in an official checkpoint,
    except ``untie``), ``other_shapes`` keys with their first dimension +1, ``drop`` keys left
    out, ``extra`` unknown keys added; wrapped as an official checkpoint ({'state_dict', 'meta'})."""
    sd, values, index = {}, {}, {}
    for i, (k, t) in enumerate(model.state_dict().items()):
        canonical = re.sub(r"^(pts_bbox_head\.(cls|reg)_branches\.)\d+\.", r"\g<1>0.", k)
        i = index.setdefault(canonical if k != untie else k, i)
        if k in drop:
            continue
        shape = tuple(t.shape)
        if k in other_shapes:
            shape = (shape[0] + 1,) + shape[1:]
        ints = not t.dtype.is_floating_point
        sd[k] = constant(shape, 1 if ints else value_of(i), ints)
        values[k] = 1 if ints else value_of(i)
    for k in extra:
        sd[k] = torch.zeros(3)
    torch.save({"meta": {"epoch": 24}, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return values


def test_load_from_is_non_strict_like_mmcv(tmp_path):
    model = build_model("tiny_raydn")
    keys = list(model.state_dict())
    odd = "pts_bbox_head.query_embedding.0.weight"
    gone = [k for k in keys if k.startswith("img_roi_head.")]
    values = _official_tiny_file(tmp_path / "det.pth", model, other_shapes=[odd], drop=gone,
                                 extra=["pts_bbox_head.some_new_buffer"])
    before = model.state_dict()[odd].clone()
    aux_before = {k: v.clone() for k, v in model.state_dict().items() if k in gone}
    rep = load_detector_weights(model, tmp_path / "det.pth")
    shape = tuple(before.shape)
    assert rep.skipped == [(odd, shape, (shape[0] + 1,) + shape[1:])]
    assert rep.missing == gone and rep.unexpected == ["pts_bbox_head.some_new_buffer"]
    assert len(rep.loaded) == len(keys) - len(gone) - 1
    sd = model.state_dict()
    assert torch.equal(sd[odd], before)  # skipped: kept its initialisation
    assert all(torch.equal(sd[k], v) for k, v in aux_before.items())  # missing: kept
    assert all(torch.all(sd[k] == values[k]) for k in rep.loaded)
    text = rep.summary()
    assert f"skipped {odd}: model {shape} vs file" in text and "img_roi_head.* (" in text
    js = rep.as_dict()
    assert js["skipped"][0] == {"key": odd, "model_shape": list(shape),
                                "file_shape": [shape[0] + 1, *shape[1:]]}
    json.dumps(js)


def test_load_from_unreadable_and_unrelated_files(tmp_path):
    model = build_model("tiny_raydn")
    torch.save({"foo.bar": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="none of its 1 tensors fits"):
        load_detector_weights(model, tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_detector_weights(model, tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_detector_weights(model, tmp_path / "missing.pth")


def test_eva02l_load_from_skips_the_tensor_of_another_shape(official_dir, tmp_path):
    """The real EVA02-L detector (332 M parameters, ~3 s / 1.5 GB on CPU) and a file in the
    remapped official layout whose position table was given another shape (257 positions, the
    model has 197)."""
    path = tmp_path / EVA02L_INIT.file_name
    values = eva02l_remapped_file(path, official_dir, {"img_backbone.pos_embed": (1, 257, 1024)})
    model = build_model("eva02l_raydn")
    pos_before = model.img_backbone.pos_embed.detach().clone()
    plan = plan_initialisation(get_preset("eva02l_raydn"), _opts(preset="eva02l_raydn", load_from=str(path)), False)
    (rep,) = apply_initialisation(model, plan)
    assert rep.kind == "detector"
    assert rep.skipped == [("img_backbone.pos_embed", (1, 197, 1024), (1, 257, 1024))]
    assert len(rep.loaded) == 545 - 1 and not rep.unexpected
    assert {k.split(".")[0] for k in rep.missing} == {"img_roi_head", "pts_bbox_head"}
    assert len(rep.missing) == 956 - 545
    assert torch.equal(model.img_backbone.pos_embed.detach(), pos_before)
    sd = model.state_dict()
    for k in ("img_backbone.patch_embed.proj.weight", "img_backbone.blocks.23.mlp.w3.weight",
              "img_backbone.adapter.simfp_5.2.norm.bias"):
        assert torch.all(sd[k] == values[k]), k
    assert "skipped img_backbone.pos_embed: model (1, 197, 1024) vs file (1, 257, 1024)" in rep.summary()


def test_load_from_notes_tied_branch_copies_that_differ(tmp_path):
    model = build_model("tiny_raydn")
    _official_tiny_file(tmp_path / "det.pth", model, untie="pts_bbox_head.cls_branches.2.0.weight")
    rep = load_detector_weights(model, tmp_path / "det.pth")
    assert not rep.skipped and not rep.missing and not rep.unexpected
    assert any("tied branch copies differ" in n and "cls_branches.2.0.weight" in n for n in rep.notes)
