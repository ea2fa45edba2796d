"""Geometry shared by every stage: box encodings, point-cloud-range normalisation, rigid
transforms and the positional encodings of the official head.

Conventions (see README "Frames and units"):

* 3D boxes live in the LiDAR frame of the current sample as ``(..., 9)`` tensors
  ``[x, y, z_center, l, w, h, yaw, vx, vy]`` in metres, radians and m/s; ``l, w, h`` are the
  sizes along the box's own x, y, z axes (nuScenes ``wlh`` reordered ``[1, 0, 2]``), ``yaw`` is
  the mmdet3d >= 1.0 LiDAR yaw (counter-clockwise from +x).
* The regression target of the head ("official encoding", ``normalize_bbox``) is ``(..., 10)``
  ``[x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy]`` with the centre in metres.
* Normalised coordinates are ``(p - pc_min) / (pc_max - pc_min)`` per axis.
* 4x4 matrices are column-convention homogeneous transforms: ``p' = T @ [p; 1]``.

All functions are pure, vectorised and differentiable where it makes sense; geometry is fp32.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor


def fp32_geometry(device):
    """Context manager keeping a geometry block in float32 under autocast (a bf16 4x4 product of
    global coordinates ~1.6e3 m rounds to ~8 m): ``autocast(enabled=False)`` when autocast is on
    for ``device``'s type, else a no-op (so traced / exported graphs see no autocast region).
    Callers cast their float inputs with ``.float()`` inside."""
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev):
        return torch.autocast(device_type=dev, enabled=False)
    return contextlib.nullcontext()


#: The official point-cloud range ``[x_min, y_min, z_min, x_max, y_max, z_max]`` (metres).
PC_RANGE = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
#: The official ``post_center_range`` of the NMS-free decoder (metres).
POST_CENTER_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
#: 3D class order of the official configs (label index = position).
CLASS_NAMES = (
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
)
#: Camera order used everywhere (official info files, lidar2img stacks).
CAMERA_NAMES = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT",
    "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT",
)


def _range(pc_range, like: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.as_tensor(pc_range, dtype=like.dtype, device=like.device)
    return r[:3], r[3:6] - r[:3]


def normalize_points(points: Tensor, pc_range=PC_RANGE) -> Tensor:
    """Metres (..., 3) -> normalised coordinates (..., 3) in the point-cloud range (no clamp)."""
    lo, size = _range(pc_range, points)
    return (points - lo) / size


def denormalize_points(points: Tensor, pc_range=PC_RANGE) -> Tensor:
    """Normalised (..., 3) -> metres (..., 3)."""
    lo, size = _range(pc_range, points)
    return points * size + lo


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """mmdet's ``inverse_sigmoid``: clamp to [0, 1], then ``log(max(x, eps) / max(1 - x, eps))``."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def normalize_bbox(boxes: Tensor) -> Tensor:
    """Official box encoding: (..., 9) LiDAR boxes -> (..., 10)
    ``[x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy]`` (centre in metres)."""
    cx, cy, cz = boxes[..., 0:1], boxes[..., 1:2], boxes[..., 2:3]
    l, w, h = boxes[..., 3:4].log(), boxes[..., 4:5].log(), boxes[..., 5:6].log()
    rot = boxes[..., 6:7]
    out = [cx, cy, cz, l, w, h, rot.sin(), rot.cos()]
    if boxes.shape[-1] > 7:
        out.append(boxes[..., 7:9])
    return torch.cat(out, dim=-1)


def denormalize_bbox(encoded: Tensor) -> Tensor:
    """Inverse of :func:`normalize_bbox`: (..., 10) -> (..., 9) (or (..., 8) -> (..., 7))."""
    rot = torch.atan2(encoded[..., 6:7], encoded[..., 7:8])
    cx, cy, cz = encoded[..., 0:1], encoded[..., 1:2], encoded[..., 2:3]
    lwh = encoded[..., 3:6].exp()
    out = [cx, cy, cz, lwh, rot]
    if encoded.shape[-1] > 8:
        out.append(encoded[..., 8:10])
    return torch.cat(out, dim=-1)


def transform_points(points: Tensor, matrix: Tensor) -> Tensor:
    """Apply homogeneous 4x4 transforms: points (B, L, 3), matrix (B, 4, 4) -> (B, L, 3)."""
    return points @ matrix[..., :3, :3].transpose(-1, -2) + matrix[..., None, :3, 3]


def rigid_inverse(matrix: Tensor) -> Tensor:
    """Inverse of rigid (rotation + translation, optionally uniformly scaled) 4x4 transforms
    computed with a general inverse in float64 for accuracy, returned in the input dtype."""
    return torch.linalg.inv(matrix.double()).to(matrix.dtype)


def pos2posemb3d(pos: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of normalised 3D points (..., 3) -> (..., 3 * num_pos_feats).

    Per axis value ``a``: ``u = 2 pi a``; features interleave ``sin(u / f_k), cos(u / f_k)`` with
    ``f_k = temperature ** (2k / num_pos_feats)``; output order is **y, x, z** (official)."""
    scale = 2 * math.pi
    pos = pos * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = pos[..., 0, None] / dim_t
    pos_y = pos[..., 1, None] / dim_t
    pos_z = pos[..., 2, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_z = torch.stack((pos_z[..., 0::2].sin(), pos_z[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x, pos_z), dim=-1)


def pos2posemb1d(pos: Tensor, num_pos_feats: int = 256, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of a scalar (..., 1) -> (..., num_pos_feats) (official ``pos2posemb1d``)."""
    scale = 2 * math.pi
    pos = pos * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = pos[..., 0, None] / dim_t
    return torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)


def nerf_positional_encoding(x: Tensor, num_encoding_functions: int = 6) -> Tensor:
    """NeRF encoding without the raw input: (..., D) -> (..., 2 * D * num_encoding_functions),
    ordered ``[sin(x f0), cos(x f0), sin(x f1), ...]`` with ``f_i = 2 ** i``."""
    freqs = 2.0 ** torch.linspace(0.0, num_encoding_functions - 1, num_encoding_functions,
                                  dtype=x.dtype, device=x.device)
    out = []
    for f in freqs:  # 6 frequencies: constant, tiny loop over encoding order, not over data
        out.append(torch.sin(x * f))
        out.append(torch.cos(x * f))
    return torch.cat(out, dim=-1)


def box_corners(boxes: Tensor) -> Tensor:
    """Corners of LiDAR boxes (n, >=7) ``[x, y, z_center, l, w, h, yaw, ...]`` -> (n, 8, 3) metres.

    Order: the 4 bottom corners counter-clockwise starting at (+l/2, +w/2) (front-left), then the
    4 top corners in the same order. Corners 0 and 3 span the front face (+x of the box)."""
    signs = torch.tensor([[1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1],
                          [1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1]],
                         dtype=boxes.dtype, device=boxes.device) * 0.5
    local = signs[None] * boxes[:, None, 3:6]                       # (n, 8, 3)
    c, s = boxes[:, 6].cos()[:, None], boxes[:, 6].sin()[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return torch.stack((x, y, local[..., 2]), dim=-1) + boxes[:, None, 0:3]


def project_points(points: Tensor, lidar2img: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Project LiDAR points (..., 3) with (4, 4) ``lidar2img`` -> pixels (..., 2) and depth (...,)."""
    hom = points @ lidar2img[:3, :3].T + lidar2img[:3, 3]
    depth = hom[..., 2]
    uv = hom[..., :2] / depth.clamp(min=eps)[..., None]
    return uv, depth
