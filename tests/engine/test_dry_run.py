"""``raydn train --dry-run`` and the initialisation step of a real run (issue 18 items 1 and 3):
the must-show commands on r50_raydn, the summary against the real run's schedule and lr, nothing
written, --resume without init flags, init_report.json."""
from __future__ import annotations

import json
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raydn.cli import main
from raydn.engine.dry_run import dry_run
from raydn.engine.initialisation import InitialisationError
from raydn.engine.schedule import derive_schedule, lr_factor
from raydn.engine.train import Trainer, TrainOptions
from raydn.presets import NUIMAGES_R50_INIT, build_model, get_preset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from infos_helper import make_infos  # noqa: E402
from init_files import nuimages_r50_file  # noqa: E402

SCENES = (5, 4, 6)  # 15 samples, 3 scenes -> 6 sub-sequences (seq_split_num 2)


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    path = root / "infos_train.pkl"
    with open(path, "wb") as f:
        pickle.dump(make_infos(root, scene_lengths=SCENES, boxes_per_sample=3, seed=0), f)
    return root, path


def _cli(infos, out, *extra):
    root, path = infos
    return main(["train", "--data", str(path), "--dataroot", str(root), "--out", str(out),
                 "--device", "cpu", "--workers", "0", "--no-progress", *extra])


# ------------------------------------------------------------------------------ must-show (R50)
def test_r50_dry_run_without_initialisation_stops_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    # the info file does not even exist: the initialisation is checked before the data is read
    assert main(["train", "--preset", "r50_raydn", "--data", str(tmp_path / "missing.pkl"),
                 "--out", str(out), "--device", "cpu", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raydn train: error: preset r50_raydn starts from backbone weights "
                          + NUIMAGES_R50_INIT.file_name)
    assert len(err.splitlines()) == 1
    for part in ("--pretrained PATH", "--load-from PATH", "--from-scratch", NUIMAGES_R50_INIT.source):
        assert part in err
    assert not out.exists()


def test_r50_dry_run_with_the_nuimages_file(official_dir, infos, tmp_path, capsys):
    weights = tmp_path / NUIMAGES_R50_INIT.file_name
    nuimages_r50_file(weights, official_dir)
    out = tmp_path / "run"
    assert _cli(infos, out, "--preset", "r50_raydn", "--pretrained", str(weights), "--dry-run",
                "--batch-per-gpu", "2") == 0
    text = capsys.readouterr().out
    assert "backbone <- " in text and "mmdet detector, backbone.* keys): loaded 318 tensors, skipped 0" in text
    assert "ignored (not backbone weights): neck.* (16), rpn_head.* (6), roi_head.* (60)" in text
    assert "15 training samples in 3 scenes -> 6 sub-sequences (seq_split_num 2) walked by 2 streaming slots" in text
    assert "1 on cpu x 2 per process = total batch 2 (recipe 16 @ lr 0.0004)" in text
    assert "gradient checkpointing on" in text and "encoder autocast none" in text
    assert "img_backbone" in text and "dry run: no step run, nothing written" in text
    assert not out.exists()


# ------------------------------------------------------------------------------ summary vs the run
def test_dry_run_summary_is_the_run_schedule_and_lr(infos, tmp_path, capsys):
    root, path = infos
    opts = TrainOptions(preset="tiny_raydn", data=str(path), dataroot=str(root), out_dir=str(tmp_path / "run"),
                        epochs=3, seed=1, workers=0, progress=False, tensorboard=False, device="cpu",
                        batch_per_gpu=2)
    s = dry_run(opts)
    assert not (tmp_path / "run").exists()
    recipe = get_preset("tiny_raydn").train
    ref = derive_schedule(num_train_frames=15, world_size=1, batch_per_gpu=2,
                          reference_total_batch=recipe.total_batch_size, reference_lr=recipe.lr,
                          epochs=3, reference_warmup_iters=recipe.warmup_iters)
    assert (s["iterations"], s["warmup_iters"], s["iters_per_epoch"]) == (ref.max_iters, ref.warmup_iters, ref.iters_per_epoch)
    assert s["epochs"] == pytest.approx(3.0) and (s["samples"], s["scenes"], s["sub_sequences"]) == (15, 3, 6)
    model = build_model("tiny_raydn")
    assert s["params_total"] == sum(p.numel() for p in model.parameters())
    assert s["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    (g_rest, g_bb) = s["param_groups"]
    assert g_bb["name"] == "img_backbone" and "pts_bbox_head" in g_rest["name"]
    assert g_rest["params"] + g_bb["params"] == s["params_trainable"]
    curve = [lr_factor(i, ref.max_iters, ref.warmup_iters, recipe.warmup_ratio, recipe.min_lr_ratio)
             for i in range(ref.max_iters)]
    f = [curve[0], max(curve), curve[-1]]
    assert s["peak_iteration"] == curve.index(max(curve))
    for g, mult in ((g_rest, 1.0), (g_bb, recipe.backbone_lr_mult)):
        assert g["weight_decay"] == recipe.weight_decay
        assert (g["lr_start"], g["lr_peak"], g["lr_end"]) == pytest.approx(tuple(ref.lr * mult * x for x in f))
    # the lr the real run sets at its first step is the dry run's warm-up start
    tr = Trainer(replace(opts, out_dir=str(tmp_path / "real")))
    try:
        logged = tr.train_step(next(iter(tr.loader)))
    finally:
        tr.close()
    assert logged["lr"] == pytest.approx(g_rest["lr_start"], rel=1e-12)
    text = capsys.readouterr().out
    assert "lr groups" in text and "initialisation: random weights (the preset needs none)" in text


# ------------------------------------------------------------------------------ the Trainer's init step
def _official_tiny(tmp_path):
    """tiny_raydn given an official initialisation requirement (the R50's), to exercise the
    official-preset rules at tiny cost."""
    return replace(get_preset("tiny_raydn"), name="tiny_raydn", init=NUIMAGES_R50_INIT)


def _opts(infos, out, preset, **kw):
    root, path = infos
    return TrainOptions(**{"preset": preset, "data": str(path), "dataroot": str(root), "out_dir": str(out),
                           "max_iters": 2, "seed": 0, "workers": 0, "progress": False,
                           "tensorboard": False, "device": "cpu", "batch_per_gpu": 2,
                           "ckpt_interval": 1, **kw})


def test_fresh_run_writes_init_report_and_resume_needs_no_flag(infos, tmp_path, capsys):
    from raydn.engine.train import train
    preset = _official_tiny(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(InitialisationError, match="starts from backbone weights"):
        Trainer(_opts(infos, out, preset))
    assert not out.exists()
    # a whole-detector file in the official layout (the tiny model's own keys), one tensor of
    # another shape, loaded non-strictly by a real run
    src = build_model("tiny_raydn").state_dict()
    odd = "pts_bbox_head.reference_points.weight"
    sd = {k: (torch.zeros(v.shape[0] + 7, *v.shape[1:]) if k == odd else v) for k, v in src.items()}
    torch.save({"state_dict": sd}, tmp_path / "det.pth")
    train(_opts(infos, out, preset, max_iters=3, stop_after=2, load_from=str(tmp_path / "det.pth")))
    report = json.loads((out / "init_report.json").read_text())
    (f,) = report["files"]
    assert f["kind"] == "detector" and len(f["loaded"]) == len(src) - 1
    assert f["skipped"] == [{"key": odd, "model_shape": list(src[odd].shape),
                             "file_shape": [src[odd].shape[0] + 7, *src[odd].shape[1:]]}]
    assert report["expected"]["flag"] == "--pretrained"
    capsys.readouterr()
    # --resume auto continues without any init flag; a given flag is named as not applied
    res = train(_opts(infos, out, preset, max_iters=3, resume="auto", pretrained=str(tmp_path / "det.pth")))
    assert res["iteration"] == 3
    assert "weights from the resumed checkpoint (--pretrained not applied" in capsys.readouterr().out
    before = (out / "init_report.json").read_text()
    assert json.loads(before)["files"][0]["kind"] == "detector"  # the fresh run's report stays
