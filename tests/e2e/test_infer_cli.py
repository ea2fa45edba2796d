"""`raydn infer` end to end: a synthetic nuScenes scene and own-camera folders."""
from __future__ import annotations

import json

import pytest

from raydn.cli import main
from raydn.data.infos import load_info_file
from raydn.data.own_cameras import rig_dict_from_infos, write_rig_file

THREE = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_BACK"]


@pytest.fixture(scope="module")
def mini_val_scene(synth_world):
    from nuscenes.utils.splits import create_splits_scenes
    names = [s["name"] for s in json.loads((synth_world / "v1.0-mini" / "scene.json").read_text())]
    val = [n for n in names if n in create_splits_scenes()["mini_val"]]
    assert len(val) == 1
    return val[0]


def _lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


def test_infer_on_a_nuscenes_scene_writes_jsonl_and_mp4(synth_world, synth_infos, tiny_model_file,
                                                        mini_val_scene, tmp_path, capsys):
    from raydn.viz.video import count_video_frames
    out, mp4 = tmp_path / "dets.jsonl", tmp_path / "scene.mp4"
    rc = main(["infer", "--checkpoint", str(tiny_model_file), "--dataroot", str(synth_world),
               "--scene", mini_val_scene, "--out", str(out), "--video", str(mp4), "--score-thr", "0",
               "--workers", "0", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recs = _lines(out)
    infos = sorted(load_info_file(synth_infos[1]["val"])["infos"], key=lambda r: r["timestamp"])
    assert [r["sample_token"] for r in recs] == [r["token"] for r in infos]
    assert all(r["scene"] == mini_val_scene for r in recs)
    assert [r["new_sequence"] for r in recs] == [True] + [False] * (len(recs) - 1)
    assert count_video_frames(mp4) == len(recs) == 6
    # the same scene from the prepared info file (instead of the tables): the same output
    out2 = tmp_path / "dets2.jsonl"
    assert main(["infer", "--checkpoint", str(tiny_model_file), "--dataroot", str(synth_world),
                 "--data", str(synth_infos[1]["val"]), "--split", "mini_val", "--out", str(out2),
                 "--score-thr", "0", "--workers", "0", "--no-progress"]) == 0
    assert out2.read_text() == out.read_text()


def test_infer_on_own_cameras_writes_jsonl_and_mp4(synth_infos, tiny_model_file, tmp_path, capsys):
    from raydn.viz.video import count_video_frames
    recs = load_info_file(synth_infos[1]["val"])["infos"]
    calib = write_rig_file(rig_dict_from_infos(recs), tmp_path / "calib.yaml")
    out, mp4, png = tmp_path / "o" / "dets.jsonl", tmp_path / "o" / "v.mp4", tmp_path / "o" / "png"
    rc = main(["infer", "--checkpoint", str(tiny_model_file), "--cameras", str(calib), "--out", str(out),
               "--video", str(mp4), "--render", str(png), "--score-thr", "0.0", "--workers", "1",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    lines = _lines(out)
    assert len(lines) == 6 and count_video_frames(mp4) == 6 and len(list(png.glob("*.png"))) == 6
    assert "scene" not in lines[0] and len(lines[0]["detections"]) == 100
    assert "6 cameras" in capsys.readouterr().out


def test_three_camera_folder_with_a_six_camera_model_is_a_clear_error(synth_infos, tiny_model_file,
                                                                      tmp_path, capsys):
    recs = load_info_file(synth_infos[1]["val"])["infos"]
    calib = write_rig_file(rig_dict_from_infos(recs, cameras=THREE), tmp_path / "calib.json")
    out = tmp_path / "o" / "dets.jsonl"
    rc = main(["infer", "--checkpoint", str(tiny_model_file), "--cameras", str(calib), "--out", str(out),
               "--video", str(tmp_path / "o" / "v.mp4"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "has 3 camera(s)" in err and "built for 6" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_calibration_and_arguments_are_clean_errors(synth_infos, tiny_model_file, tmp_path, capsys):
    recs = load_info_file(synth_infos[1]["val"])["infos"]
    rig = rig_dict_from_infos(recs)
    rig["cameras"][4]["intrinsics"] = [[1, 0], [0, 1]]
    calib = write_rig_file(rig, tmp_path / "calib.json")
    out = tmp_path / "dets.jsonl"
    base = ["infer", "--checkpoint", str(tiny_model_file), "--out", str(out), "--no-progress"]
    assert main(base + ["--cameras", str(calib)]) == 2
    err = capsys.readouterr().err
    assert "cameras[4] (CAM_BACK_LEFT): field 'intrinsics'" in err and "2x2" in err
    assert main(base) == 2 and "exactly one input" in capsys.readouterr().err
    assert main(base + ["--dataroot", str(tmp_path), "--cameras", str(calib)]) == 2
    capsys.readouterr()
    assert main(["infer", "--backend", "onnxruntime", "--cameras", str(calib), "--out", str(out)]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main(base + ["--dataroot", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
    assert not out.exists()
