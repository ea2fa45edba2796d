"""Frames, rotations and poses: the one implementation every stage uses.

Conventions (nuScenes):

* Quaternions are ``(..., 4)`` float64 arrays ``[w, x, y, z]``. The arithmetic reproduces
  pyquaternion / nuscenes-devkit (normalise only when ``|1 - |q|^2| >= 1e-14``, products through the
  4x4 "q matrix", rotation matrices through ``Q @ conj(Qbar)^T``) with batched matmuls, so the devkit's
  yaw (``quaternion_yaw``) is reproduced to a few ulp: not bit for bit on every CPU, since numpy's SIMD
  ``arctan2`` and OpenBLAS's 4x4 products are chosen per CPU (AVX-512 / AVX2) and may round the last bit
  differently from pyquaternion's path. No pyquaternion needed.
* Poses are 4x4 float64 column-convention homogeneous transforms ``p' = T @ [p; 1]`` built with
  ``pose_matrix(rotation, translation)`` -- always **rotation first** (a quaternion or a 3x3 matrix).
  A nuScenes record ``{translation, rotation}`` of a sensor or an ego pose maps sensor -> ego /
  ego -> global.
* Cameras: :func:`camera_matrices` gives the intrinsics of a transformed image and ``lidar2img``
  (the one place a projection matrix is built).
* Boxes are ``[x, y, z, l, w, h, yaw, (vx, vy)]`` in a source frame; "to global" applies the pose's
  rotation to the centre, the heading (the box's x axis) and the velocity, and keeps the sizes.
  :func:`boxes_to_global` does it with one 4x4 pose (torch, float64; streamed detections);
  :func:`lidar_boxes_to_global` with the two quaternion records LiDAR -> ego -> global in the
  devkit's ``Box.rotate`` / ``translate`` order, returning the rotation as a quaternion (numpy,
  float64; the submission and the evaluator's ground truth). Same formula, two argument forms.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["quat_normalise", "quat_to_matrix", "quat_multiply", "quat_from_yaw", "quat_yaw",
           "rotate_vectors", "pose_matrix", "invert_rigid", "camera_matrices", "boxes_to_global", "lidar_boxes_to_global"]


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def quat_normalise(q) -> np.ndarray:
    """pyquaternion ``_normalise``: (..., 4) -> (..., 4); unit within 1e-14 are left unchanged."""
    q = _f64(q)
    w, x, y, z = np.moveaxis(q, -1, 0)
    ss = ((w * w + x * x) + y * y) + z * z          # np.dot(q, q) order for a 4-vector
    unit = np.abs(1.0 - ss) < 1e-14
    n = np.sqrt(ss)
    safe = np.where(unit | (n <= 0), 1.0, n)
    return np.where((unit | (n <= 0))[..., None], q, q / safe[..., None])


def _q_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([np.stack([w, -x, -y, -z], -1), np.stack([x, w, -z, y], -1),
                     np.stack([y, z, w, -x], -1), np.stack([z, -y, x, w], -1)], -2)


def _q_bar_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([np.stack([w, -x, -y, -z], -1), np.stack([x, w, z, -y], -1),
                     np.stack([y, -z, w, x], -1), np.stack([z, y, -x, w], -1)], -2)


def quat_to_matrix(q) -> np.ndarray:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4) (pyquaternion ``rotation_matrix``)."""
    q = quat_normalise(q)
    prod = np.matmul(_q_matrix(q), np.swapaxes(_q_bar_matrix(q), -1, -2))
    return prod[..., 1:, 1:]


def quat_multiply(a, b) -> np.ndarray:
    """Hamilton product ``a * b`` of (..., 4) quaternions (pyquaternion ``__mul__``, no normalising)."""
    a, b = np.broadcast_arrays(_f64(a), _f64(b))
    return np.matmul(_q_matrix(a), b[..., None])[..., 0]


def quat_from_yaw(yaw) -> np.ndarray:
    """``Quaternion(axis=[0, 0, 1], radians=yaw)``: (...,) radians -> (..., 4)."""
    half = _f64(yaw) / 2.0
    s = np.sin(half)
    return np.stack([np.cos(half), 0.0 * s, 0.0 * s, s], -1)


def quat_yaw(q) -> np.ndarray:
    """Devkit ``quaternion_yaw``: yaw (...,) in (-pi, pi] of the rotated x axis, radians."""
    r = quat_to_matrix(q)
    return np.arctan2(r[..., 1, 0], r[..., 0, 0])


def rotate_vectors(matrix: np.ndarray, vec) -> np.ndarray:
    """``matrix @ vec`` for (..., 3, 3) and (..., 3) -> (..., 3)."""
    return np.matmul(matrix, _f64(vec)[..., None])[..., 0]


def pose_matrix(rotation, translation) -> np.ndarray:
    """4x4 float64 column-convention transform(s) (..., 4, 4) from a rotation -- (..., 3, 3) matrix or
    (..., 4) ``w, x, y, z`` quaternion (:func:`quat_to_matrix`) -- and a translation (..., 3) metres."""
    rotation = _f64(rotation)
    if rotation.shape[-1] == 4:
        rotation = quat_to_matrix(rotation)
    translation = _f64(translation)
    out = np.zeros(np.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1]) + (4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def invert_rigid(matrix: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transforms (..., 4, 4) float64: ``[R^T, -R^T t; 0, 1]``."""
    m = np.asarray(matrix, dtype=np.float64)
    rt = np.swapaxes(m[..., :3, :3], -1, -2)
    out = np.zeros(m.shape)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, m[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def camera_matrices(cam_intrinsics: np.ndarray, vehicle2cam: np.ndarray, ida: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Intrinsics of the transformed images and the projection (all float64).

    ``cam_intrinsics`` (N, 3, 3) K of the original images, ``vehicle2cam`` (N, 4, 4), ``ida``
    (N, 3, 3) or (3, 3) pixel transform of the image augmentation (:func:`ida_matrix`) ->
    ``intrinsics`` (N, 4, 4) viewpad with ``ida @ K`` and ``lidar2img = intrinsics @ vehicle2cam``
    (N, 4, 4), as the official ``ResizeCropFlipRotImage``."""
    K = np.asarray(cam_intrinsics, dtype=np.float64)
    n = K.shape[0]
    intr = np.tile(np.eye(4), (n, 1, 1))
    intr[:, :3, :3] = K
    intr[:, :3, :3] = np.asarray(ida, dtype=np.float64) @ intr[:, :3, :3]
    return intr, intr @ np.asarray(vehicle2cam, dtype=np.float64)


def boxes_to_global(boxes: Tensor, pose: Tensor) -> Tensor:
    """(k, 9) boxes ``[x, y, z, l, w, h, yaw, vx, vy]`` in the vehicle frame -> world frame with
    ``pose`` (4, 4) vehicle -> world; float64. Centres are transformed, yaw is the world heading
    of the box's x axis, velocities are rotated; sizes are unchanged."""
    b = boxes.to(torch.float64)
    T = pose.to(torch.float64)
    R = T[:3, :3]
    centre = b[:, :3] @ R.T + T[:3, 3]
    zero = torch.zeros_like(b[:, 0])
    heading = torch.stack([torch.cos(b[:, 6]), torch.sin(b[:, 6]), zero], -1) @ R.T
    vel = torch.stack([b[:, 7], b[:, 8], zero], -1) @ R.T
    yaw = torch.atan2(heading[:, 1], heading[:, 0])
    return torch.cat([centre, b[:, 3:6], yaw[:, None], vel[:, :2]], -1)


def lidar_boxes_to_global(centre, yaw, velocity, sample_idx, l2e_t, l2e_q, e2g_t, e2g_q):
    """LiDAR-frame boxes -> global frame, nuScenes ``Box.rotate``/``translate`` order.

    centre (N, 3), yaw (N,), velocity (N, 3) float64; per-sample transforms (S, 3) / (S, 4)
    (quaternions ``w, x, y, z``) gathered with ``sample_idx`` (N,).
    Returns centre (N, 3), rotation quaternion (N, 4), velocity (N, 3), all global."""
    r_l2e, r_e2g = quat_to_matrix(l2e_q)[sample_idx], quat_to_matrix(e2g_q)[sample_idx]
    c = rotate_vectors(r_l2e, centre) + l2e_t[sample_idx]
    c = rotate_vectors(r_e2g, c) + e2g_t[sample_idx]
    q = quat_multiply(e2g_q[sample_idx], quat_multiply(l2e_q[sample_idx], quat_from_yaw(yaw)))
    v = rotate_vectors(r_e2g, rotate_vectors(r_l2e, velocity))
    return c, q, v
