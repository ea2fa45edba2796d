"""The synthetic world: a genuine nuScenes dataroot (devkit + official metric), boxes where the
annotations say, lidar counts, attributes, determinism."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from _deps import require

require("nuscenes")

from raydn.data.synth import generate_world, render_instance_masks, scene_names  # noqa: E402
from raydn.geometry import CAMERA_NAMES, CLASS_NAMES  # noqa: E402



def test_tables_and_files(synth_world, synth_nusc, synth_params):
    nusc = synth_nusc
    WORLD_SCENES, WORLD_SAMPLES = synth_params["scenes"], synth_params["samples"]
    assert len(nusc.scene) == WORLD_SCENES and len(nusc.sample) == WORLD_SCENES * WORLD_SAMPLES
    from nuscenes.utils.splits import create_splits_scenes
    sp = create_splits_scenes()
    names = [s["name"] for s in nusc.scene]
    assert names[:2] == sp["mini_train"][:2] and names[2] == sp["mini_val"][0]
    assert {c["name"] for c in nusc.category} >= {"vehicle.car", "movable_object.trafficcone"}
    for sample in nusc.sample:
        assert set(sample["data"]) == set(CAMERA_NAMES) | {"LIDAR_TOP"}
        for ch, tok in sample["data"].items():
            sd = nusc.get("sample_data", tok)
            path = synth_world / sd["filename"]
            assert path.is_file()
            if ch == "LIDAR_TOP":
                pts = np.fromfile(path, dtype=np.float32)
                assert pts.size % 5 == 0 and pts.size > 5 * 10000
            else:
                from PIL import Image
                with Image.open(path) as im:
                    assert im.size == (1600, 900) and im.format == "JPEG"
    # prev/next chains of keyframes and sample_data
    scene = nusc.scene[0]
    s = nusc.get("sample", scene["first_sample_token"])
    assert s["prev"] == ""
    n = 1
    while s["next"]:
        nxt = nusc.get("sample", s["next"])
        assert nxt["prev"] == s["token"] and nxt["timestamp"] - s["timestamp"] == pytest.approx(5e5, abs=1e3)
        assert nusc.get("sample_data", nxt["data"]["CAM_FRONT"])["prev"] == s["data"]["CAM_FRONT"]
        s, n = nxt, n + 1
    assert n == WORLD_SAMPLES
    # camera timestamps differ from the lidar one (ego pose at camera time differs)
    sd_cam = nusc.get("sample_data", s["data"]["CAM_FRONT_LEFT"])
    assert sd_cam["timestamp"] != s["timestamp"]
    # every detection class appears
    dets = {a["category_name"] for a in nusc.sample_annotation}
    from nuscenes.eval.detection.utils import category_to_detection_name
    assert {category_to_detection_name(c) for c in dets} >= set(CLASS_NAMES)
    # an interrupted run leaves no complete-looking dataroot: no partial folder remains
    assert not any(p.name.startswith(".") and "partial" in p.name for p in synth_world.parent.iterdir())


def test_scene_names_splits():
    assert len(scene_names(10, "mini")) == 10
    from nuscenes.utils.splits import create_splits_scenes
    sp = create_splits_scenes()
    assert scene_names(10, "mini") == sp["mini_train"] + sp["mini_val"]
    tv = scene_names(6, "trainval")
    assert tv[:5] == sp["train"][:5] and tv[5] == sp["val"][0]


def _gt_predictions(nusc, eval_set):
    from nuscenes.eval.detection.utils import category_to_detection_name
    from nuscenes.utils.splits import create_splits_scenes
    names = set(create_splits_scenes()[eval_set])
    preds = {}
    for sample in nusc.sample:
        if nusc.get("scene", sample["scene_token"])["name"] not in names:
            continue
        lst = []
        for tok in sample["anns"]:
            a = nusc.get("sample_annotation", tok)
            if a["num_lidar_pts"] + a["num_radar_pts"] == 0:
                continue  # the devkit drops such GT boxes: a prediction there is a false positive
            det = category_to_detection_name(a["category_name"])
            attr = nusc.get("attribute", a["attribute_tokens"][0])["name"] if a["attribute_tokens"] else ""
            lst.append(dict(sample_token=sample["token"], translation=a["translation"], size=a["size"],
                            rotation=a["rotation"], velocity=list(nusc.box_velocity(tok)[:2]),
                            detection_name=det, detection_score=1.0, attribute_name=attr))
        preds[sample["token"]] = lst
    return preds


def _evaluate(nusc, preds, tmp_path):
    from nuscenes.eval.detection.config import config_factory
    from nuscenes.eval.detection.evaluate import NuScenesEval
    tmp_path.mkdir(parents=True, exist_ok=True)
    res = tmp_path / "results.json"
    res.write_text(json.dumps(dict(meta=dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False,
                                             use_external=False), results=preds)))
    ev = NuScenesEval(nusc, config=config_factory("detection_cvpr_2019"), result_path=str(res),
                      eval_set="mini_val", output_dir=str(tmp_path / "eval"), verbose=False)
    return ev.main(plot_examples=0, render_curves=False)


def test_official_metric_on_gt_predictions(synth_nusc, tmp_path):
    preds = _gt_predictions(synth_nusc, "mini_val")
    m = _evaluate(synth_nusc, preds, tmp_path / "exact")
    assert m["mean_ap"] >= 0.99, m["mean_dist_aps"]
    assert m["nd_score"] >= 0.99, m["tp_errors"]
    rng = np.random.default_rng(0)
    pert = {}
    for tok, lst in preds.items():
        out = []
        for p in lst:
            if rng.random() < 0.3:
                continue  # missed detections
            q = dict(p)
            q["translation"] = list(np.asarray(p["translation"]) + rng.normal(0, 0.6, 3))
            q["velocity"] = list(np.asarray(p["velocity"]) + rng.normal(0, 1.0, 2))
            out.append(q)
        pert[tok] = out
    m2 = _evaluate(synth_nusc, pert, tmp_path / "pert")
    assert m2["mean_ap"] < 0.9 and m2["nd_score"] < 0.9


def _project_corners(nusc, ann_token, cam_token):
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion
    sd = nusc.get("sample_data", cam_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    box = nusc.get_box(ann_token)
    box.translate(-np.array(pose["translation"]))
    box.rotate(Quaternion(pose["rotation"]).inverse)
    box.translate(-np.array(cs["translation"]))
    box.rotate(Quaternion(cs["rotation"]).inverse)
    K = np.array(cs["camera_intrinsic"])
    corners = box.corners()
    return view_points(corners, K, True)[:2].T, corners[2], view_points(box.center[:, None], K, True)[:2, 0]


def test_boxes_are_where_annotations_say(synth_world, synth_nusc):
    """Masks (same renderer as the JPEGs) vs the devkit's projection of the annotation boxes."""
    from matplotlib.path import Path as MplPath
    from scipy.spatial import ConvexHull
    nusc = synth_nusc
    checked = 0
    for sample in nusc.sample[1::5]:
        masks, toks = render_instance_masks(synth_world, sample["token"])
        assert masks.shape == (6, 900, 1600) and masks.dtype == np.int32
        for c, cam in enumerate(CAMERA_NAMES):
            ids, counts = np.unique(masks[c][masks[c] >= 0], return_counts=True)
            for i, cnt in zip(ids, counts):
                a = nusc.get("sample_annotation", toks[i])
                uv, z, ctr = _project_corners(nusc, toks[i], sample["data"][cam])
                if a["visibility_token"] != "4" or z.min() < 1.0 or cnt < 400:
                    continue
                hull = uv[ConvexHull(uv).vertices]
                ys, xs = np.nonzero(masks[c] == i)
                inside = MplPath(hull).contains_points(np.stack([xs + 0.5, ys + 0.5], 1), radius=1.5)
                assert inside.mean() >= 0.9, (cam, toks[i], inside.mean())
                if z.min() > 3.0 and CLASS_NAMES[0] and 0 <= ctr[0] < 1600 and 0 <= ctr[1] < 900:
                    cls = a["category_name"]
                    if not cls.startswith(("vehicle.bicycle", "vehicle.motorcycle", "movable_object.traffic")):
                        window = masks[c][int(ctr[1]) - 3:int(ctr[1]) + 4, int(ctr[0]) - 3:int(ctr[0]) + 4]
                        assert (window == i).any(), (cam, toks[i], cls)
                checked += 1
    assert checked >= 10


def test_masks_match_rendered_images(synth_world, synth_nusc, synth_params):
    """The table-derived masks equal the generator's own instance buffer (what the JPEGs show)."""
    from raydn.data import nuscenes_calib as calib
    from raydn.data.synth.render import CameraView, render_camera
    from raydn.data.synth.writer import CAMERA_OFFSETS_US, _prims_at, cached_scene, ego_matrix
    WORLD_SEED, WORLD_SAMPLES = synth_params["seed"], synth_params["samples"]
    nusc = synth_nusc
    sc = 1
    sample = nusc.get("sample", nusc.scene[sc]["first_sample_token"])
    sample = nusc.get("sample", sample["next"])
    sim = cached_scene(WORLD_SEED, sc, nusc.scene[sc]["name"], WORLD_SAMPLES)
    masks, toks = render_instance_masks(synth_world, sample["token"], size=(800, 450),
                                        intrinsics=np.stack([np.diag([0.5, 0.5, 1.0]) @ calib.camera_intrinsic(c)
                                                             for c in CAMERA_NAMES]))
    # instance i of the simulation is annotation i of the sample (table order)
    inst_of_tok = {t: j for j, t in enumerate(toks)}
    assert len(inst_of_tok) == len(sim.objects)
    for c, cam in enumerate(CAMERA_NAMES):
        t_c = sim.sample_t[1] + CAMERA_OFFSETS_US[cam] * 1e-6
        (xy,), (yaw,) = sim.ego.pose_at(t_c)
        c2g = ego_matrix(xy, yaw) @ calib.camera_to_ego(cam)
        K = np.diag([0.5, 0.5, 1.0]) @ calib.camera_intrinsic(cam)
        view = CameraView(K=K, R=c2g[:3, :3], position=c2g[:3, 3], size=(800, 450))
        _, inst, _, _ = render_camera(view, _prims_at(sim, t_c), len(sim.objects), scale=1.0, shade=False)
        # the half-pixel convention: K scaled by 0.5 maps pixel centres exactly only up to 0.25 px
        agree = (inst == masks[c]).mean()
        assert agree > 0.995, (cam, agree)
        assert (masks[c] >= 0).any() or cam == "CAM_BACK"


def test_lidar_counts_attributes_velocity(synth_world, synth_nusc):
    from nuscenes.utils.geometry_utils import points_in_box
    from nuscenes.utils.data_classes import LidarPointCloud
    nusc = synth_nusc
    agree, total, moving_ok, n_att = 0, 0, 0, 0
    for sample in nusc.sample[::4]:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        pc = LidarPointCloud.from_file(str(path))
        assert pc.points.shape[0] == 4
        for box, tok in zip(boxes, sample["anns"]):
            a = nusc.get("sample_annotation", tok)
            n_in = int(points_in_box(box, pc.points[:3], wlh_factor=1.0).sum())
            total += 1
            agree += abs(n_in - a["num_lidar_pts"]) <= max(2, 0.1 * a["num_lidar_pts"])
            assert a["num_radar_pts"] <= a["num_lidar_pts"]
            v = np.linalg.norm(nusc.box_velocity(tok)[:2])
            if a["attribute_tokens"]:
                name = nusc.get("attribute", a["attribute_tokens"][0])["name"]
                if name.endswith((".moving",)):
                    moving_ok += v > 0.3
                    n_att += 1
                elif name in ("vehicle.parked", "vehicle.stopped", "pedestrian.standing"):
                    moving_ok += v < 0.05
                    n_att += 1
    assert agree / total > 0.9, agree / total
    assert moving_ok == n_att and n_att > 10
    # far / fully occluded boxes exist and have no points (the devkit filters them)
    assert any(a["num_lidar_pts"] == 0 for a in nusc.sample_annotation)
    vis = [a["visibility_token"] for a in nusc.sample_annotation]
    assert {"1", "4"} <= set(vis)


def _digest(root):
    h = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            h[os.path.relpath(p, root)] = hashlib.md5(open(p, "rb").read()).hexdigest()
    return h


@pytest.mark.slow
def test_determinism_and_workers(tmp_path):
    a = generate_world(tmp_path / "a", scenes=2, seed=11, samples_per_scene=2, workers=1, progress=False)
    b = generate_world(tmp_path / "b", scenes=2, seed=11, samples_per_scene=2, workers=2, progress=False)
    da, db = _digest(a), _digest(b)
    assert da == db and len(da) > 30
    c = generate_world(tmp_path / "c", scenes=2, seed=12, samples_per_scene=2, workers=1, progress=False)
    dc = _digest(c)
    assert dc["v1.0-mini/sample_annotation.json"] != da["v1.0-mini/sample_annotation.json"]
    from raydn.errors import DataError
    with pytest.raises(DataError, match="exists"):
        generate_world(tmp_path / "a", scenes=2, seed=11, samples_per_scene=2, progress=False)


def test_demo_profile_keeps_objects_near():
    """The ``demo`` layout keeps every class but brings objects close and slows the ego."""
    from raydn.data.synth.world import get_profile, simulate_scene
    near, far, speeds = [], [], {}
    for prof, out in (("demo", near), ("realistic", far)):
        v = []
        for i in range(3):
            sim = simulate_scene(f"s{i}", i, 5, 40, prof)
            assert set(sim.objects.cls.tolist()) == set(range(len(CLASS_NAMES)))
            xy, _ = sim.ego.pose_at(sim.sample_t)
            for k, t in enumerate(sim.sample_t):
                out.append(np.linalg.norm(sim.objects.centers_at(t)[:, :2] - xy[k], axis=1))
            v.append(sim.ego.speed.max())
        speeds[prof] = max(v)
    near, far = np.concatenate(near), np.concatenate(far)
    assert np.median(near) < 30.0 < 40.0 < np.median(far)
    assert speeds["demo"] <= 6.0 + 1e-9 < speeds["realistic"]
    with pytest.raises(ValueError, match="unknown world profile"):
        get_profile("nope")
