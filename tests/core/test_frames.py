"""The one frames / poses / matching implementation (issue 21): argument order, the two box-to-global
forms agreeing, the devkit's strict matching threshold, and the preset's own test transform."""
import math

import numpy as np
import torch

from raydn.core.frames import (boxes_to_global, camera_matrices, invert_rigid, lidar_boxes_to_global,
                               pose_matrix, quat_from_yaw, quat_to_matrix, quat_yaw)
from raydn.eval.fast_eval import greedy_match_groups
from raydn.eval.ray_duplicates import greedy_match_bev
from raydn.presets import get_preset, list_presets


def _quat(axis, angle):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    return np.r_[math.cos(angle / 2), math.sin(angle / 2) * axis]


def test_pose_matrix_takes_rotation_then_translation():
    q = _quat([0, 0, 1], math.pi / 2)
    m = pose_matrix(q, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(m @ [1.0, 0.0, 0.0, 1.0], [1.0, 3.0, 3.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(pose_matrix(quat_to_matrix(q), [1.0, 2.0, 3.0]), m, atol=0)
    np.testing.assert_allclose(invert_rigid(m) @ m, np.eye(4), atol=1e-12)


def test_both_box_to_global_forms_agree():
    rng = np.random.default_rng(0)
    n = 5
    l2e_q, e2g_q = _quat([0.1, -0.2, 1.0], 0.7)[None], _quat([0.0, 0.05, 1.0], -2.1)[None]
    l2e_t, e2g_t = np.array([[0.9, 0.0, 1.8]]), np.array([[600.0, 1600.0, 0.5]])
    centre, yaw = rng.normal(size=(n, 3)) * 10, rng.uniform(-math.pi, math.pi, n)
    vel = np.c_[rng.normal(size=(n, 2)), np.zeros(n)]
    c, q, v = lidar_boxes_to_global(centre, yaw, vel, np.zeros(n, np.int64), l2e_t, l2e_q, e2g_t, e2g_q)
    pose = pose_matrix(e2g_q[0], e2g_t[0]) @ pose_matrix(l2e_q[0], l2e_t[0])
    boxes = np.c_[centre, np.ones((n, 3)), yaw, vel[:, :2]]
    g = boxes_to_global(torch.from_numpy(boxes), torch.from_numpy(pose)).numpy()
    np.testing.assert_allclose(g[:, :3], c, atol=1e-9)
    # the quaternion's yaw equals the rotated heading's yaw for (near-)upright poses only in BEV:
    # compare headings as unit vectors of the projected x axis
    hq = quat_to_matrix(q)[:, :2, 0]
    hq /= np.linalg.norm(hq, axis=1, keepdims=True)
    np.testing.assert_allclose(np.c_[np.cos(g[:, 6]), np.sin(g[:, 6])], hq, atol=1e-9)
    np.testing.assert_allclose(g[:, 7:9], v[:, :2], atol=1e-9)
    np.testing.assert_allclose(quat_yaw(quat_from_yaw(np.array([0.3, -2.0]))), [0.3, -2.0], atol=1e-12)


def test_camera_matrices_project_a_point_in_front():
    K = np.array([[[1000.0, 0, 800], [0, 1000.0, 450], [0, 0, 1]]])
    ida = np.array([[0.5, 0, -10], [0, 0.5, -20], [0, 0, 1]])
    intr, l2i = camera_matrices(K, np.eye(4)[None], ida)
    uvw = l2i[0] @ [1.0, 0.5, 10.0, 1.0]
    np.testing.assert_allclose(uvw[:2] / uvw[2], [0.5 * 900 - 10, 0.5 * 500 - 20], atol=1e-9)
    np.testing.assert_allclose(intr[0, :3, :3], ida @ K[0], atol=0)


def test_greedy_matching_threshold_is_strict_as_in_the_devkit():
    gt_xy = np.array([[0.0, 0.0], [10.0, 0.0]])
    pred_xy = np.array([[2.0, 0.0], [10.0, 1.999]])     # exactly 2 m from GT 0; 1.999 m from GT 1
    m = greedy_match_groups(np.zeros(2, np.int64), gt_xy, np.zeros(2, np.int64), pred_xy,
                            np.array([0, 1]), (2.0, 4.0))
    assert m.tolist() == [[-1, 0], [1, 1]]
    got = greedy_match_bev(gt_xy, np.array([0, 0]), pred_xy, np.array([0, 0]), np.array([0.9, 0.8]), 2.0)
    assert got.tolist() == [-1, 1]
    # other class: no match even when close
    assert greedy_match_bev(gt_xy, np.array([1, 0]), pred_xy[:1] * 0, np.array([0]), np.array([0.9]), 2.0).tolist() == [-1]


def test_preset_test_transform_uses_the_model_input_size():
    for name in list_presets():
        p = get_preset(name)
        t = p.test_transform()
        assert not t.training and p.train.aug.training
        assert tuple(t.final_dim) == tuple(p.model.image_size)
        assert tuple(t.img_mean) == tuple(p.model.img_mean) and tuple(t.img_std) == tuple(p.model.img_std)


def test_run_config_derives_the_transform_from_the_model():
    import pytest

    from raydn.errors import ConfigError
    from raydn.run_config import resolve
    rc = resolve("tiny_raydn", sets=["image_size=[160,384]"])[0]
    assert tuple(rc.train.aug.final_dim) == (160, 384) == tuple(rc.to_preset().test_transform().final_dim)
    with pytest.raises(ConfigError, match="train.aug.final_dim"):
        resolve("tiny_raydn", sets=["train.aug.final_dim=[160,384]"])
