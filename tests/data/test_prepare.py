"""raydn prepare: official info records from the synthetic world (fields, calibration chain,
idempotence, restart, errors)."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
from _deps import require

require("nuscenes")

from raydn.data.prepare import NUS_CATEGORIES_2D, prepare_infos  # noqa: E402
from raydn.errors import DataError  # noqa: E402
from raydn.geometry import CAMERA_NAMES  # noqa: E402


def _load(p):
    with open(p, "rb") as f:
        return pickle.load(f)


def test_fields_shapes_dtypes(synth_infos, synth_nusc, synth_params):
    out, paths = synth_infos
    assert sorted(paths) == ["train", "val"]
    assert paths["train"].name == "nuscenes2d_temporal_infos_train.pkl"
    tr, va = _load(paths["train"]), _load(paths["val"])
    assert tr["metadata"] == {"version": "v1.0-mini"}
    n = synth_params["samples"]
    assert len(tr["infos"]) == 2 * n and len(va["infos"]) == n
    for info in tr["infos"] + va["infos"]:
        assert list(info["cams"]) == list(CAMERA_NAMES)
        sample = synth_nusc.get("sample", info["token"])
        assert (len(info["sweeps"]) == 0) == (sample["prev"] == "")
        assert info["timestamp"] == sample["timestamp"] and isinstance(info["timestamp"], int)
        assert os.path.isfile(info["lidar_path"])
        k = len(info["gt_names"])
        assert info["gt_boxes"].shape == (k, 7) and info["gt_boxes"].dtype == np.float64
        assert info["gt_velocity"].shape == (k, 2)
        assert info["num_lidar_pts"].shape == (k,) and info["valid_flag"].dtype == bool
        np.testing.assert_array_equal(info["valid_flag"], (info["num_lidar_pts"] + info["num_radar_pts"]) > 0)
        assert len(info["lidar2ego_rotation"]) == 4 and len(info["ego2global_translation"]) == 3
        for key in ("bboxes2d", "labels2d", "centers2d", "depths", "bboxes3d_cams", "bboxes_ignore", "visibilities"):
            assert len(info[key]) == 6
        for c in range(6):
            m = info["bboxes2d"][c].shape[0]
            assert info["bboxes2d"][c].dtype == np.float32 and (m == 0 or info["bboxes2d"][c].shape == (m, 4))
            assert info["labels2d"][c].dtype == np.int64 and info["labels2d"][c].shape == (m,)
            assert info["depths"][c].shape == (m,) and (info["depths"][c] > 0).all()
            b = info["bboxes2d"][c].reshape(-1, 4)
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= 1600).all() and (b[:, 3] <= 900).all()
            assert ((b[:, 2] - b[:, 0]) >= 1).all()
        for cam in info["cams"].values():
            assert cam["cam_intrinsic"].shape == (3, 3)
            assert cam["sensor2lidar_rotation"].shape == (3, 3) and cam["sensor2lidar_translation"].shape == (3,)
            R = cam["sensor2lidar_rotation"]
            np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
            assert os.path.isfile(cam["data_path"])
    names = set(np.concatenate([i["gt_names"] for i in tr["infos"]]).tolist())
    assert names <= set(NUS_CATEGORIES_2D) and len(names) == 10


def test_calibration_chain_and_boxes(synth_infos, synth_nusc):
    """Projecting a GT box centre with cam_intrinsic @ inv(sensor2lidar) equals the devkit's own
    view_points of the box in that camera (cam -> ego(t_cam) -> global -> ego(t_lidar) -> lidar)."""
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion
    out, paths = synth_infos
    nusc = synth_nusc
    info = _load(paths["val"])["infos"][2]
    _, boxes, _ = nusc.get_sample_data(nusc.get("sample", info["token"])["data"]["LIDAR_TOP"])
    np.testing.assert_allclose(info["gt_boxes"][:, :3], np.array([b.center for b in boxes]))
    np.testing.assert_allclose(info["gt_boxes"][:, 3:6], np.array([b.wlh[[1, 0, 2]] for b in boxes]))
    # velocity: global box_velocity rotated by R_e2g^-1 then R_l2e^-1, (vx, vy) kept
    vg = np.array([nusc.box_velocity(t)[:2] for t in nusc.get("sample", info["token"])["anns"]])
    R = Quaternion(info["lidar2ego_rotation"]).rotation_matrix.T @ Quaternion(info["ego2global_rotation"]).rotation_matrix.T
    v_l = (R @ np.concatenate([vg, np.zeros((len(vg), 1))], 1).T).T[:, :2]
    np.testing.assert_allclose(info["gt_velocity"], v_l, atol=1e-9)
    assert np.abs(info["gt_velocity"]).max() > 1.0
    checked = 0
    for cam, ci in info["cams"].items():
        s2l = np.eye(4)
        s2l[:3, :3] = ci["sensor2lidar_rotation"]
        s2l[:3, 3] = ci["sensor2lidar_translation"]
        l2c = np.linalg.inv(s2l)
        centers = np.concatenate([info["gt_boxes"][:, :3], np.ones((len(boxes), 1))], 1)
        pc = (l2c @ centers.T)[:3]
        _, cam_boxes, K = nusc.get_sample_data(ci["sample_data_token"])
        ref = np.stack([b.center for b in nusc.get_boxes(ci["sample_data_token"])])
        # devkit: box -> ego(t_cam) -> camera
        sd = nusc.get("sample_data", ci["sample_data_token"])
        cs, pose = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]), nusc.get("ego_pose", sd["ego_pose_token"])
        ref = (ref - pose["translation"]) @ Quaternion(pose["rotation"]).rotation_matrix
        ref = (ref - cs["translation"]) @ Quaternion(cs["rotation"]).rotation_matrix
        front = ref[:, 2] > 1.0
        np.testing.assert_allclose(pc.T[front], ref[front], atol=1e-6)
        ours = view_points(pc[:, front], ci["cam_intrinsic"], True)[:2]
        theirs = view_points(ref[front].T, np.array(K), True)[:2]
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        checked += int(front.sum())
        # 2D centres are projections of the (camera-time) box centres
        if len(info["centers2d"][list(info["cams"]).index(cam)]):
            d = info["depths"][list(info["cams"]).index(cam)]
            assert np.isin(np.round(d, 3), np.round(ref[:, 2].astype(np.float32), 3)).all()
        del cam_boxes
    assert checked > 20
    # ego at the camera time differs from the lidar one, and the chain accounts for it
    assert any(ci["ego2global_translation"] != info["ego2global_translation"] for ci in info["cams"].values())


def test_idempotent_and_restart(synth_world, tmp_path):
    out = tmp_path / "infos"
    paths = prepare_infos(synth_world, "v1.0-mini", out, progress=False)
    first = {k: p.read_bytes() for k, p in paths.items()}
    mt = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    prepare_infos(synth_world, "v1.0-mini", out, progress=False)  # up to date: skipped
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == mt
    prepare_infos(synth_world, "v1.0-mini", out, progress=False, force=True)  # rebuilt: byte-identical
    assert {k: p.read_bytes() for k, p in paths.items()} == first
    # restart after an interruption that left only the train split
    mt_train = paths["train"].stat().st_mtime_ns
    paths["val"].unlink()
    prepare_infos(synth_world, "v1.0-mini", out, progress=False)
    assert paths["val"].read_bytes() == first["val"] and paths["train"].stat().st_mtime_ns == mt_train
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def _light_copy(src, dst):
    """Dataroot copy: tables copied, sensor files symlinked (cheap)."""
    shutil.copytree(src / "v1.0-mini", dst / "v1.0-mini")
    shutil.copytree(src / "maps", dst / "maps")
    for dp, _, fs in os.walk(src / "samples"):
        rel = os.path.relpath(dp, src)
        os.makedirs(dst / rel, exist_ok=True)
        for f in fs:
            os.symlink(os.path.join(dp, f), dst / rel / f)
    return dst


def test_errors(synth_world, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_infos(tmp_path / "nope", "v1.0-mini", tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="v1.0-trainval"):
        prepare_infos(synth_world, "v1.0-trainval", tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="--version"):
        prepare_infos(synth_world, "v2", tmp_path / "o", progress=False)
    root = _light_copy(synth_world, tmp_path / "copy")
    (root / "v1.0-mini" / "ego_pose.json").rename(root / "v1.0-mini" / "ego_pose.json.bak")
    with pytest.raises(DataError, match="ego_pose.json"):
        prepare_infos(root, "v1.0-mini", tmp_path / "o", progress=False)
    (root / "v1.0-mini" / "ego_pose.json.bak").rename(root / "v1.0-mini" / "ego_pose.json")
    victims = sorted((root / "samples" / "CAM_BACK").iterdir())[:2]
    for v in victims:
        v.unlink()
    with pytest.raises(DataError, match=r"2 sensor file\(s\).*CAM_BACK"):
        prepare_infos(root, "v1.0-mini", tmp_path / "o", progress=False)


def test_cli(synth_world, tmp_path, capsys):
    from raydn.cli import main
    assert main(["prepare", "--dataroot", str(tmp_path / "missing"), "--version", "v1.0-mini",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prepare", "--dataroot", str(synth_world), "--version", "v1.0-mini",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert (tmp_path / "o" / "nuscenes2d_temporal_infos_val.pkl").is_file()
    assert main(["synth", "--out", str(synth_world), "--scenes", "1", "--samples-per-scene", "2",
                 "--no-progress"]) == 2  # refuses to overwrite a non-empty folder
    json.loads((synth_world / "raydn_synth.json").read_text())
