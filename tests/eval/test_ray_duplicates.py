"""Duplicates along camera rays, on hand-built cases (golden counts worked out by hand)."""
import numpy as np
import pytest
import torch

from raydn.eval.ray_duplicates import (RayDuplicateConfig, format_ray_duplicates, greedy_match_bev,
                                       ray_duplicates, sample_ray_duplicates)
from raydn.geometry import CAMERA_NAMES

# a forward-looking pinhole camera at the LiDAR origin: camera z = LiDAR x, camera x = -y, camera y = -z
_R_C2L = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
_K = np.array([[1000.0, 0.0, 800.0], [0.0, 1000.0, 450.0], [0.0, 0.0, 1.0]])


def _info(gt_xyz, names, cam_offset=(0.0, 0.0, 0.0)):
    cam = {"sensor2lidar_rotation": _R_C2L, "sensor2lidar_translation": np.asarray(cam_offset),
           "cam_intrinsic": _K}
    boxes = np.array([[*c, 4.0, 2.0, 1.5, 0.0] for c in gt_xyz]).reshape(-1, 7)
    return {"token": "s0", "cams": {c: cam for c in CAMERA_NAMES}, "gt_boxes": boxes,
            "gt_names": np.array(names)}


def _det(xyz, labels, scores):
    b = np.zeros((len(xyz), 9), np.float32)
    b[:, :3] = np.asarray(xyz, np.float32).reshape(-1, 3)
    b[:, 3:6] = (4.0, 2.0, 1.5)
    return {"boxes": torch.from_numpy(b), "labels": torch.tensor(labels), "scores": torch.tensor(scores)}


CAR, PED = 0, 7


def test_hand_built_sample():
    info = _info([(20.0, 0.0, 0.0)], ["car"])
    det = _det([(20.2, 0.0, 0.0),     # TP (0.2 m)
                (28.0, 0.1, 0.0),     # on the ray (0.2 deg), 8 m deeper: ray duplicate
                (20.0, 5.0, 0.0),     # 14 deg off the ray: plain FP
                (20.5, 0.3, 0.0),     # GT already taken, right depth (0.5 m): plain duplicate, not along the ray
                (30.0, 0.0, 0.0),     # on the ray but another class: not counted
                (12.0, 0.0, 0.0)],    # on the ray, 8 m short, but below the score threshold
               [CAR, CAR, CAR, CAR, PED, CAR], [0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    r = ray_duplicates([det], [info])
    assert (r["gt_boxes"], r["true_positives"], r["false_positives"], r["ray_duplicates"]) == (1, 1, 4, 1)
    assert r["ray_duplicates_per_gt"] == pytest.approx(1.0)
    assert r["ray_duplicate_fp_share"] == pytest.approx(0.25)
    assert "1 of 4 false positives" in format_ray_duplicates(r)
    # a lower threshold lets the short one in: two ray duplicates
    r2 = ray_duplicates([det], [info], RayDuplicateConfig(score_threshold=0.05))
    assert (r2["false_positives"], r2["ray_duplicates"]) == (5, 2)


def test_angle_and_depth_gap_limits():
    info = _info([(20.0, 0.0, 0.0)], ["car"])
    # 1.9 deg vs 2.1 deg off the ray at 30 m range from the camera; TP first so they are FPs
    a19, a21 = np.radians(1.9), np.radians(2.1)
    det = _det([(20.0, 0.0, 0.0), (30 * np.cos(a19), 30 * np.sin(a19), 0.0),
                (30 * np.cos(a21), 30 * np.sin(a21), 0.0), (21.5, 0.0, 0.0)],
               [CAR] * 4, [0.9, 0.8, 0.7, 0.6])
    res = sample_ray_duplicates(det["boxes"].numpy(), det["labels"].numpy(), det["scores"].numpy(),
                                info["gt_boxes"], np.array([CAR]), info)
    # (21.5, 0, 0): on the ray but only 1.5 m deeper (< 2 m gap) -> not a ray duplicate
    assert res["is_fp"].tolist() == [False, True, True, True]
    assert res["is_ray_duplicate"].tolist() == [False, True, False, False]


def test_ray_is_seen_from_the_camera_centre_and_only_in_view():
    # camera 1 m to the left of the LiDAR origin: the ray goes from (0, 1, 0) through the GT
    info = _info([(20.0, 0.0, 0.0), (-20.0, 0.0, 0.0)], ["car", "car"], cam_offset=(0.0, 1.0, 0.0))
    on_cam_ray = (0.0 + 30.0, 1.0 - 1.5, 0.0)          # direction (20, -1) scaled by 1.5
    on_lidar_ray = (30.0, 0.0, 0.0)                    # 0.95 deg off the camera ray (on the LiDAR-origin ray)
    behind = (-30.0, 0.0, 0.0)                         # behind every camera: that GT is not seen
    det = _det([on_cam_ray, on_lidar_ray, behind], [CAR] * 3, [0.8, 0.7, 0.6])
    res = sample_ray_duplicates(det["boxes"].numpy(), det["labels"].numpy(), det["scores"].numpy(),
                                info["gt_boxes"], np.array([CAR, CAR]), info,
                                RayDuplicateConfig(max_angle_deg=0.5))
    assert res["is_fp"].all()
    assert res["is_ray_duplicate"].tolist() == [True, False, False]


def test_greedy_match_takes_highest_score_first():
    gt = np.array([[0.0, 0.0]])
    pred = np.array([[1.5, 0.0], [0.1, 0.0]])
    m = greedy_match_bev(gt, np.array([0]), pred, np.array([0, 0]), np.array([0.9, 0.5]), 2.0)
    assert m.tolist() == [0, -1]          # the higher score wins even though it is farther


def test_empty_inputs():
    info = _info([], [])
    r = ray_duplicates([_det(np.zeros((0, 3)), [], [])], [info])
    assert (r["gt_boxes"], r["false_positives"], r["ray_duplicates"]) == (0, 0, 0)
