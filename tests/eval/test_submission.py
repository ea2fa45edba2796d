"""Submission conversion (spec §9.2): hand-checked box, the mmdet3d pipeline as an oracle,
attributes, the class-range filter, and the JSON accepted by the devkit loader."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from raydn.errors import DataError
from raydn.eval.constants import ATTRIBUTE_NAMES, DETECTION_NAMES
from raydn.eval.submission import (attribute_table, build_submission, detections_to_global,
                                   load_results_arrays, results_to_arrays, write_results_json)
from raydn.geometry import CLASS_NAMES
from _deps import require


def _q(yaw):
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def _info(token="tok", l2e_t=(0.0, 0.0, 0.0), l2e_yaw=0.0, e2g_t=(0.0, 0.0, 0.0), e2g_yaw=0.0):
    return dict(token=token, lidar2ego_translation=list(l2e_t), lidar2ego_rotation=_q(l2e_yaw),
                ego2global_translation=list(e2g_t), ego2global_rotation=_q(e2g_yaw))


def _det(boxes, labels, scores=None):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 9)
    s = torch.full((b.shape[0],), 0.5) if scores is None else torch.tensor(scores, dtype=torch.float32)
    return dict(boxes=b, scores=s, labels=torch.tensor(labels, dtype=torch.long))


def test_hand_checked_box():
    # LiDAR turned +90 deg in the ego frame and 1 m forward; ego turned 180 deg at (100, 200, 0).
    info = _info(l2e_t=(1.0, 0.0, 2.0), l2e_yaw=math.pi / 2, e2g_t=(100.0, 200.0, 0.0), e2g_yaw=math.pi)
    # car at LiDAR (10, 0, -1), l=4, w=2, h=1.5, yaw 0.25, velocity (3, 0) in the LiDAR frame
    det = _det([10.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.25, 3.0, 0.0], [CLASS_NAMES.index("car")], [0.75])
    rec = build_submission([det], [info])["tok"][0]
    # ego: R(90)(10, 0, -1) + (1, 0, 2) = (1, 10, 1); global: R(180)(1, 10, 1) + (100, 200, 0) = (99, 190, 1)
    np.testing.assert_allclose(rec["translation"], [99.0, 190.0, 1.0], atol=1e-5)
    assert rec["size"] == [2.0, 4.0, 1.5]                                  # w, l, h
    yaw = 0.25 + math.pi / 2 + math.pi                                     # composed yaw
    np.testing.assert_allclose(np.abs(np.dot(rec["rotation"], _q(yaw))), 1.0, atol=1e-7)
    # velocity: (3, 0) -> ego (0, 3) -> global (0, -3)
    np.testing.assert_allclose(rec["velocity"], [0.0, -3.0], atol=1e-6)
    assert rec["detection_name"] == "car" and rec["attribute_name"] == "vehicle.moving"
    assert rec["detection_score"] == 0.75 and rec["sample_token"] == "tok"
    assert set(rec) == {"sample_token", "translation", "size", "rotation", "velocity", "detection_name",
                        "detection_score", "attribute_name"}


def test_bottom_centre_input():
    info = _info()
    top = build_submission([_det([1, 2, 0.25, 4, 2, 1.5, 0, 0, 0], [0])], [info])["tok"][0]
    bottom = build_submission([_det([1, 2, -0.5, 4, 2, 1.5, 0, 0, 0], [0])], [info], z_is_bottom=True)["tok"][0]
    assert top["translation"] == pytest.approx(bottom["translation"], abs=1e-7)
    assert bottom["translation"][2] == pytest.approx(0.25)


def test_matches_mmdet3d_pipeline_with_nuscenes_box():
    """Oracle: mmdet3d's output_to_nusc_box + lidar_nusc_box_to_global written with the devkit's
    Box and pyquaternion, on random boxes and non-trivial calibrations (pitch/roll included)."""
    require("nuscenes")
    from nuscenes.utils.data_classes import Box
    from pyquaternion import Quaternion

    rng = np.random.default_rng(0)
    infos, dets = [], []
    for s in range(5):
        q1 = rng.normal(size=4) * [1, 0.05, 0.05, 1]
        q2 = rng.normal(size=4) * [1, 0.05, 0.05, 1]
        infos.append(dict(token=f"s{s}", lidar2ego_translation=rng.normal(0, 1, 3).tolist(),
                          lidar2ego_rotation=(q1 / np.linalg.norm(q1)).tolist(),
                          ego2global_translation=rng.uniform(-1000, 1000, 3).tolist(),
                          ego2global_rotation=(q2 / np.linalg.norm(q2)).tolist()))
        n = 40
        b = np.c_[rng.uniform(-60, 60, (n, 2)), rng.uniform(-3, 2, n), rng.uniform(0.3, 6, (n, 3)),
                  rng.uniform(-np.pi, np.pi, n), rng.normal(0, 2, (n, 2))]
        dets.append(_det(b.tolist(), rng.integers(0, 10, n).tolist(), rng.random(n).tolist()))
    ours = build_submission(dets, infos)
    ranges = {"car": 50, "truck": 50, "bus": 50, "trailer": 50, "construction_vehicle": 50, "pedestrian": 40,
              "motorcycle": 40, "bicycle": 40, "traffic_cone": 30, "barrier": 30}
    for det, info in zip(dets, infos):
        expected = []
        b = det["boxes"].numpy()
        for i in range(b.shape[0]):
            name = CLASS_NAMES[int(det["labels"][i])]
            box = Box(b[i, :3], b[i, [4, 3, 5]], Quaternion(axis=[0, 0, 1], radians=float(b[i, 6])),
                      velocity=(float(b[i, 7]), float(b[i, 8]), 0.0))
            box.rotate(Quaternion(info["lidar2ego_rotation"]))
            box.translate(np.array(info["lidar2ego_translation"]))
            if np.linalg.norm(box.center[:2], 2) > ranges[name]:
                continue
            box.rotate(Quaternion(info["ego2global_rotation"]))
            box.translate(np.array(info["ego2global_translation"]))
            expected.append((box, name, float(det["scores"][i])))
        got = ours[info["token"]]
        assert len(got) == len(expected) and 0 < len(got) < b.shape[0]
        for rec, (box, name, score) in zip(got, expected):
            np.testing.assert_allclose(rec["translation"], box.center, rtol=0, atol=1e-9)
            np.testing.assert_allclose(rec["size"], box.wlh, rtol=0, atol=0)
            np.testing.assert_allclose(rec["rotation"], box.orientation.elements, rtol=0, atol=1e-12)
            np.testing.assert_allclose(rec["velocity"], box.velocity[:2], rtol=0, atol=1e-12)
            assert rec["detection_name"] == name and rec["detection_score"] == score


def test_attribute_table():
    moving, slow = attribute_table()
    name = {i: (ATTRIBUTE_NAMES[a] if a >= 0 else "") for i, a in enumerate(moving)}
    slow_name = {i: (ATTRIBUTE_NAMES[a] if a >= 0 else "") for i, a in enumerate(slow)}
    expected_moving = {"car": "vehicle.moving", "truck": "vehicle.moving", "bus": "vehicle.moving",
                       "trailer": "vehicle.moving", "construction_vehicle": "vehicle.moving",
                       "pedestrian": "pedestrian.moving", "motorcycle": "cycle.with_rider",
                       "bicycle": "cycle.with_rider", "traffic_cone": "", "barrier": ""}
    expected_slow = {"car": "vehicle.parked", "truck": "vehicle.parked", "bus": "vehicle.stopped",
                     "trailer": "vehicle.parked", "construction_vehicle": "vehicle.parked",
                     "pedestrian": "pedestrian.standing", "motorcycle": "cycle.without_rider",
                     "bicycle": "cycle.without_rider", "traffic_cone": "", "barrier": ""}
    for i, c in enumerate(DETECTION_NAMES):
        assert name[i] == expected_moving[c], c
        assert slow_name[i] == expected_slow[c], c
    # Through the converter: threshold 0.2 m/s on the global speed, strict '>'.
    info = _info(e2g_yaw=1.0)
    boxes = [[5, 0, 0, 4, 2, 1.5, 0, 0.3, 0], [6, 0, 0, 4, 2, 1.5, 0, 0.19, 0.0], [7, 0, 0, 1, 1, 1, 0, 0.1, 0.1]]
    recs = build_submission([_det(boxes, [CLASS_NAMES.index("bus")] * 2 + [CLASS_NAMES.index("pedestrian")])],
                            [info])["tok"]
    assert [r["attribute_name"] for r in recs] == ["vehicle.moving", "vehicle.stopped", "pedestrian.standing"]


def test_class_range_filter_in_ego_bev():
    # The LiDAR sits 10 m behind the ego origin: ranges are measured from the ego origin.
    info = _info(l2e_t=(-10.0, 0.0, 0.0), e2g_t=(500.0, 0.0, 0.0), e2g_yaw=0.7)
    car, ped, cone = CLASS_NAMES.index("car"), CLASS_NAMES.index("pedestrian"), CLASS_NAMES.index("traffic_cone")
    boxes = [[60.0, 0, 5.0, 4, 2, 1.5, 0, 0, 0],     # car, ego x = 50 exactly -> kept (not > 50)
             [60.01, 0, 0, 4, 2, 1.5, 0, 0, 0],      # car at 50.01 -> dropped
             [45.0, 0, 0, 1, 1, 2, 0, 0, 0],         # pedestrian at ego 35 < 40 -> kept
             [10.0, 40.5, 0, 1, 1, 2, 0, 0, 0],      # pedestrian at ego (0, 40.5) -> dropped
             [39.9, 0, 0, 0.5, 0.5, 1, 0, 0, 0],     # cone at 29.9 -> kept
             [40.5, 0, 0, 0.5, 0.5, 1, 0, 0, 0]]     # cone at 30.5 -> dropped (LiDAR dist 40.5 is irrelevant)
    g = detections_to_global([_det(boxes, [car, car, ped, ped, cone, cone], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])], [info])
    assert g.score.round(2).tolist() == [0.9, 0.7, 0.5]
    assert [DETECTION_NAMES[i] for i in g.label] == ["car", "pedestrian", "traffic_cone"]


def test_json_valid_and_accepted_by_devkit_loader(tmp_path):
    require("nuscenes")
    from nuscenes.eval.common.loaders import load_prediction
    from nuscenes.eval.detection.data_classes import DetectionBox

    rng = np.random.default_rng(3)
    infos = [_info(token=f"t{i}", l2e_t=(1, 0, 2), l2e_yaw=-1.57, e2g_t=(300, 400, 0), e2g_yaw=0.1 * i)
             for i in range(3)]
    dets = [_det(np.c_[rng.uniform(-40, 40, (n, 2)), rng.uniform(-2, 1, n), rng.uniform(0.5, 4, (n, 3)),
                       rng.uniform(-3, 3, n), rng.normal(0, 1, (n, 2))].tolist(),
                 rng.integers(0, 10, n).tolist(), rng.random(n).tolist()) for n in (30, 0, 300)]
    results = build_submission(dets, infos)
    assert list(results) == ["t0", "t1", "t2"] and results["t1"] == []
    path = write_results_json(tmp_path / "sub" / "results.json", results)
    assert not [f for f in os.listdir(tmp_path / "sub") if f != "results.json"]    # no temp left
    with open(path) as f:
        data = json.load(f)
    assert data["meta"] == {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False,
                            "use_external": True}
    boxes, meta = load_prediction(path, 500, DetectionBox)
    assert len(boxes.all) == sum(len(v) for v in results.values()) > 0
    assert set(boxes.sample_tokens) == {"t0", "t1", "t2"}
    # The JSON read back as arrays equals the in-memory conversion.
    ego = {i["token"]: i["ego2global_translation"] for i in infos}
    a = load_results_arrays(path, ego)
    b = detections_to_global(dets, infos).to_eval_arrays()
    for f in ("sample_idx", "translation", "size", "velocity", "label", "score", "attribute", "ego_dist"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=0, atol=1e-12, err_msg=f)
    np.testing.assert_allclose(a.yaw, b.yaw, atol=1e-12)


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing field 'token'"):
        build_submission([_det([[0] * 9], [0])], [{"lidar2ego_translation": [0, 0, 0]}])
    with pytest.raises(DataError, match=r"expected \(n, 9\)"):
        build_submission([dict(boxes=torch.zeros(2, 7), scores=torch.zeros(2), labels=torch.zeros(2))], [_info()])
    with pytest.raises(DataError, match="2 detection sets for 1"):
        build_submission([_det([[0] * 9], [0])] * 2, [_info()])
    bad = tmp_path / "bad.json"
    bad.write_text("{\"results\": 3}")
    with pytest.raises(DataError, match="'results' dict"):
        load_results_arrays(bad, {})
    with pytest.raises(DataError, match="no ego pose"):
        results_to_arrays({"x": []}, {})
