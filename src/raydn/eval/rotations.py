"""Vectorised float64 quaternion helpers that reproduce pyquaternion / nuscenes-devkit arithmetic.

Quaternions are ``(..., 4)`` arrays ``[w, x, y, z]`` (nuScenes order). The functions mirror what
``pyquaternion.Quaternion`` does (normalise only when ``|1 - |q|^2| >= 1e-14``, products through the
4x4 "q matrix", rotation matrices through ``Q @ conj(Qbar)^T``) with batched matmuls, so the devkit's
yaw (``quaternion_yaw``) is reproduced to a few ulp: not bit for bit on every CPU, since numpy's SIMD
``arctan2`` and OpenBLAS's 4x4 products are chosen per CPU (AVX-512 / AVX2) and may round the last bit
differently from pyquaternion's path. No pyquaternion needed.
"""
from __future__ import annotations

import numpy as np


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
