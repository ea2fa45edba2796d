"""Datasets given to ``raydn prepare`` (and what follows it): a v1.0-test dataroot (prepares; eval
refuses to score without ground truth), a scene with one sample, a sample without boxes, a missing
camera image, a truncated JPEG, a nonexistent dataroot, two prepares into one folder at once.
Every variant is a cheap edit of the session's synthetic world (tables copied, images symlinked)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from _deps import require
from _procs import slow_prepare_script

require("nuscenes")

from raydn.cli import main as cli_main  # noqa: E402
from raydn.data.dataset import NuScenesStreamingDataset  # noqa: E402
from raydn.engine.train import Trainer, TrainOptions  # noqa: E402
from raydn.presets import get_preset  # noqa: E402
from world_edit import (camera_file, copy_world, drop_scene_annotations, keep_first_sample,  # noqa: E402
                        make_test_split)

MINI = "v1.0-mini"


def _prepare(capsys, root, out, version=MINI):
    rc = cli_main(["prepare", "--dataroot", str(root), "--version", version, "--out", str(out), "--no-progress"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _train(infos_path, out, iters):
    return Trainer(TrainOptions(preset="tiny_raydn", data=str(infos_path), out_dir=str(out), max_iters=iters,
                                workers=0, ckpt_interval=1000, progress=False, tensorboard=False,
                                device="cpu")).run()


def test_test_split_prepares_and_eval_refuses_to_score(synth_world, tmp_path, capsys, tiny_model_file):
    root = make_test_split(synth_world, tmp_path / "test_root")
    rc, text, err = _prepare(capsys, root, tmp_path / "infos", "v1.0-test")
    assert rc == 0, err
    path = tmp_path / "infos" / "nuscenes2d_temporal_infos_test.pkl"
    data = _load(path)
    assert data["metadata"] == {"version": "v1.0-test"} and len(data["infos"]) == 18
    assert all("gt_boxes" not in info and len(info["cams"]) == 6 for info in data["infos"])
    for argv in (["--checkpoint", str(tiny_model_file)], ["--submission", str(tmp_path / "any.json")]):
        out = tmp_path / "eval"
        rc = cli_main(["eval", *argv, "--data", str(path), "--dataroot", str(root), "--out", str(out),
                       "--no-progress", "--workers", "0"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{path}: v1.0-test (split test) has no ground-truth annotations" in err and "--format-only" in err
        assert not out.exists()
    # what it says works: the submission for the evaluation server
    out = tmp_path / "eval"
    rc = cli_main(["eval", "--checkpoint", str(tiny_model_file), "--data", str(path), "--dataroot", str(root),
                   "--out", str(out), "--format-only", "--no-progress", "--workers", "0"])
    assert rc == 0
    sub = json.loads((out / "results_nusc.json").read_text())
    assert set(sub["results"]) == {info["token"] for info in data["infos"]}


@pytest.fixture(scope="module")
def edited_world(synth_world, tmp_path_factory):
    """Scene 0 without any annotation, scene 1 cut to its first sample; prepared."""
    base = tmp_path_factory.mktemp("edited")
    root = copy_world(synth_world, base / "root")
    no_box_samples = drop_scene_annotations(root, MINI, 0)
    single = keep_first_sample(root, MINI, 1)
    from raydn.data.prepare import prepare_infos
    paths = prepare_infos(root, MINI, base / "infos", progress=False)
    return root, paths, no_box_samples, single


def test_samples_without_boxes(edited_world, tmp_path):
    _, paths, no_box, _ = edited_world
    infos = [i for i in _load(paths["train"])["infos"] if i["token"] in no_box]
    assert len(infos) == 6
    for info in infos:
        assert info["gt_boxes"].shape == (0, 7) and len(info["gt_names"]) == 0
        assert info["gt_velocity"].shape == (0, 2) and info["valid_flag"].shape == (0,)
        assert all(b.reshape(-1, 4).shape[0] == 0 for b in info["bboxes2d"])
    ds = NuScenesStreamingDataset(infos, get_preset("tiny_raydn").train.aug)
    item = ds[0]
    assert item.gt_boxes.shape == (0, 9) and item.gt_labels.shape == (0,)
    only = tmp_path / "no_boxes.pkl"
    only.write_bytes(pickle.dumps({"infos": infos, "metadata": {"version": MINI}}))
    res = _train(only, tmp_path / "run", 3)          # the trainer stops on a non-finite loss
    assert res["iteration"] == 3 and all(np.isfinite(h["loss"]) for h in res["history"])


def test_scene_with_one_sample(edited_world, tmp_path):
    _, paths, _, single = edited_world
    infos = _load(paths["train"])["infos"]
    one = [i for i in infos if i["token"] == single]
    assert len(one) == 1 and one[0]["prev"] == "" and one[0]["next"] == ""
    assert sum(i["scene_token"] == one[0]["scene_token"] for i in infos) == 1
    ds = NuScenesStreamingDataset(paths["train"], get_preset("tiny_raydn").train.aug)
    k = [i["token"] for i in ds.infos].index(single)
    assert ds.prev_exists[k] == 0
    res = _train(paths["train"], tmp_path / "run", 4)  # 7 frames, 2 slots: every frame seen once
    assert res["iteration"] == 4 and all(np.isfinite(h["loss"]) for h in res["history"])


def test_missing_camera_image(synth_world, tmp_path, capsys):
    root = copy_world(synth_world, tmp_path / "root")
    gone = camera_file(root, MINI, 3, "CAM_FRONT_LEFT")
    gone.unlink()
    rc, _, err = _prepare(capsys, root, tmp_path / "infos")
    assert rc == 2 and "Traceback" not in err
    assert f"1 sensor file(s) listed in sample_data.json are missing under {root}, e.g. {gone}" in err, err
    assert not (tmp_path / "infos").exists()


def test_truncated_jpeg_is_caught_by_prepare(synth_world, tmp_path, capsys):
    root = copy_world(synth_world, tmp_path / "root")
    bad = camera_file(root, MINI, 2, "CAM_BACK")
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[: len(data) // 2])            # an interrupted copy
    rc, _, err = _prepare(capsys, root, tmp_path / "infos")
    assert rc == 2 and "Traceback" not in err
    assert f"1 camera image(s) are broken, e.g. {bad}: truncated JPEG ({len(data) // 2} bytes" in err, err
    assert not (tmp_path / "infos").exists()
    # not a JPEG at all, and an empty file
    bad.write_bytes(b"<html>404</html>")
    assert _prepare(capsys, root, tmp_path / "infos")[0] == 2
    bad.write_bytes(b"")
    rc, _, err = _prepare(capsys, root, tmp_path / "infos")
    assert rc == 2 and f"{bad}: camera image is empty (0 bytes)" in err


def test_nonexistent_dataroot(tmp_path, capsys):
    rc, _, err = _prepare(capsys, tmp_path / "no_such_root", tmp_path / "infos")
    assert rc == 2 and err.count("\n") == 1
    assert f"nuScenes dataroot {tmp_path / 'no_such_root'} does not exist" in err
    assert not (tmp_path / "infos").exists()


_SLOW_PREPARE = slow_prepare_script(0.2)


def _locked(folder) -> bool:
    from raydn.io import lock_holder
    return lock_holder(folder) is not None


def test_two_concurrent_prepares_into_one_folder(synth_world, tmp_path):
    """The second prepare waits for the first (saying so), then finds the pickles up to date; both exit
    0 and the pickles are whole and equal to a single prepare's."""
    out = tmp_path / "infos"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _SLOW_PREPARE, str(synth_world), str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out.is_dir() and _locked(out)):
        assert first.poll() is None and time.time() < deadline, "first prepare never took the lock"
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    f_out, f_err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, f_err + second.stderr
    assert f"raydn prepare: another raydn prepare (pid {first.pid}) is writing into {out}; waiting for it" \
        in second.stdout, second.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "nuscenes2d_temporal_infos_train.pkl", "nuscenes2d_temporal_infos_val.pkl"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".stamp.json")]
    assert len(_load(out / "nuscenes2d_temporal_infos_train.pkl")["infos"]) == 12


def test_truncated_jpeg_after_prepare_stops_training_before_the_run_folder(synth_world, synth_infos,
                                                                         tmp_path, capsys):
    """Info files not checked by our prepare (released ones, or an image damaged later): ``raydn train``
    checks every camera image before it creates the run folder."""
    root = copy_world(synth_world, tmp_path / "root")
    from raydn.data.prepare import prepare_infos
    paths = prepare_infos(root, MINI, tmp_path / "infos", progress=False)
    bad = camera_file(root, MINI, 1, "CAM_FRONT")
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data[:1000])
    run = tmp_path / "run"
    rc = cli_main(["train", "--preset", "tiny_raydn", "--data", str(paths["train"]), "--out", str(run),
                   "--workers", "0", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"1 of 72 camera images are broken, e.g. {bad}: truncated JPEG (1000 bytes" in err, err
    assert not run.exists()
