"""Synthetic :class:`FrameBatch` objects for smoke runs, benchmarks and model tests (no dataset).

Cameras are the 6 real nuScenes cameras of one car (:mod:`raydn.data.nuscenes_calib`) with the
official test-time image transform (resize 1600x900 to the input width, bottom crop to the input
height). The LiDAR frame is the nuScenes ``LIDAR_TOP`` frame of that car; the ego drives along
global +x at ``speed`` m/s, one frame every ``dt`` seconds. Boxes are random LiDAR-frame boxes
``[x, y, z_center, l, w, h, yaw, vx, vy]`` around the car, with their per-camera 2D labels (the
clipped projection of the 8 corners, the projected centre and its depth) for the auxiliary head.
Images are normalised noise. Everything is drawn from an explicit ``torch.Generator``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from raydn.core.batch import FrameBatch
from raydn.core.frames import camera_matrices
from raydn.data.frames import eval_transform_params
from raydn.data.nuscenes_calib import IMAGE_SIZE, camera_intrinsic, camera_to_ego, lidar_to_ego
from raydn.data.transforms import AugConfig, ida_matrix
from raydn.geometry import CAMERA_NAMES, box_corners, rigid_inverse

#: Typical (l, w, h) in metres per class (CLASS_NAMES order) for plausible random boxes.
_CLASS_SIZES = torch.tensor([
    [4.6, 1.9, 1.7], [6.9, 2.5, 2.8], [6.4, 2.8, 3.2], [11.0, 2.9, 3.5], [12.0, 2.9, 3.9],
    [0.5, 2.5, 1.0], [2.1, 0.8, 1.5], [1.7, 0.6, 1.3], [0.7, 0.7, 1.8], [0.4, 0.4, 1.0]])


def pinhole_cameras(image_size: tuple[int, int] = (256, 704)) -> tuple[Tensor, Tensor, Tensor]:
    """The 6 nuScenes cameras (``CAMERA_NAMES`` order) for network inputs of ``image_size`` (H, W).

    Returns float32 ``intrinsics`` (6, 4, 4) (viewpad with the transformed K), ``extrinsics``
    (6, 4, 4) LiDAR -> camera, ``lidar2img`` (6, 4, 4) LiDAR -> pixel * depth.
    The image transform is the official test one (:func:`raydn.data.frames.eval_transform_params`:
    scale ``r = max(H / 900, W / 1600)``, centred crop in width, bottom-aligned crop in height)."""
    W0, H0 = IMAGE_SIZE
    ida = ida_matrix(eval_transform_params(AugConfig(final_dim=tuple(image_size)), (H0, W0)))
    K = np.stack([camera_intrinsic(name) for name in CAMERA_NAMES])
    l2c = np.stack([np.linalg.inv(camera_to_ego(name)) @ lidar_to_ego() for name in CAMERA_NAMES])
    intr, l2i = camera_matrices(K, l2c, ida)
    return (torch.from_numpy(intr).float(), torch.from_numpy(l2c).float(),
            torch.from_numpy(l2i).float())


def ego_pose(frame_index: int, slot: int = 0, speed: float = 5.0, dt: float = 0.5) -> Tensor:
    """LiDAR -> global (4, 4) float64 of frame ``frame_index`` of slot ``slot``: the car drives
    along +x at ``speed`` m/s (slots are 100 m apart in y, slightly different headings)."""
    yaw = 0.05 * slot
    c, s = np.cos(yaw), np.sin(yaw)
    e2g = np.eye(4)
    e2g[:2, :2] = [[c, -s], [s, c]]
    e2g[:3, 3] = [600.0 + speed * dt * frame_index * c, 1600.0 + 100.0 * slot + speed * dt * frame_index * s, 0.0]
    return torch.from_numpy(e2g @ lidar_to_ego())


def random_boxes(num: int, generator: torch.Generator, num_classes: int = 10,
                 max_range: float = 40.0) -> tuple[Tensor, Tensor]:
    """``num`` random LiDAR boxes (num, 9) float32 at 4..``max_range`` m and labels (num,) int64."""
    g = generator
    labels = torch.randint(0, num_classes, (num,), generator=g)
    radius = 4.0 + (max_range - 4.0) * torch.rand(num, generator=g)
    phi = (torch.rand(num, generator=g) * 2 - 1) * torch.pi
    size = _CLASS_SIZES[labels % len(_CLASS_SIZES)] * (0.8 + 0.4 * torch.rand(num, 3, generator=g))
    z = -1.8 + size[:, 2] / 2 + 0.2 * torch.randn(num, generator=g)   # on the ground (LiDAR z ~ +1.8 m)
    yaw = (torch.rand(num, generator=g) * 2 - 1) * torch.pi
    velo = torch.randn(num, 2, generator=g) * 2.0
    boxes = torch.cat([(radius * phi.cos())[:, None], (radius * phi.sin())[:, None], z[:, None],
                       size, yaw[:, None], velo], dim=1)
    return boxes.float(), labels


def boxes_to_2d(boxes: Tensor, labels: Tensor, lidar2img: Tensor, image_size: tuple[int, int],
                min_depth: float = 0.5, min_size: float = 2.0):
    """Per-camera 2D labels of LiDAR boxes (n, 9) for cameras ``lidar2img`` (N, 4, 4).

    A box is labelled in a camera when its 8 corners lie in front of it (depth > ``min_depth``)
    and the clipped corner bounding box is at least ``min_size`` pixels wide and high.
    Returns 4 lists over cameras: boxes (k, 4) xyxy pixels, labels (k,), centres (k, 2) pixels
    (projected 3D centre, clipped to the image), depths (k,) metres."""
    H, W = image_size
    n = boxes.shape[0]
    pts = torch.cat([box_corners(boxes), boxes[:, None, :3]], dim=1)           # (n, 9, 3)
    hom = torch.cat([pts, torch.ones_like(pts[..., :1])], -1).reshape(1, -1, 4, 1)
    N = lidar2img.shape[0]
    proj = (lidar2img.float()[:, None] @ hom).squeeze(-1).reshape(N, n, 9, 4)   # (N, n, 9, 4)
    depth = proj[..., 2]
    uv = proj[..., :2] / depth.clamp(min=1e-5)[..., None]
    lo = uv[:, :, :8].amin(2)
    hi = uv[:, :, :8].amax(2)
    x1, y1 = lo[..., 0].clamp(0, W), lo[..., 1].clamp(0, H)
    x2, y2 = hi[..., 0].clamp(0, W), hi[..., 1].clamp(0, H)
    keep = (depth[..., :8].amin(2) > min_depth) & (x2 - x1 >= min_size) & (y2 - y1 >= min_size)
    xyxy = torch.stack([x1, y1, x2, y2], -1)                                     # (N, n, 4)
    centre = torch.stack([uv[..., 8, 0].clamp(0, W - 1), uv[..., 8, 1].clamp(0, H - 1)], -1)
    out = ([], [], [], [])
    for cam in range(N):  # ragged per-camera lists (label building, not a hot path)
        k = keep[cam]
        out[0].append(xyxy[cam][k])
        out[1].append(labels[k])
        out[2].append(centre[cam][k])
        out[3].append(depth[cam, :, 8][k])
    return out


def synthetic_frame_batch(batch_size: int = 1, image_size: tuple[int, int] = (256, 704), *,
                          frame_index: int = 0, prev_exists: Sequence[float] | None = None,
                          num_boxes: int | Sequence[int] = 4, with_targets: bool = True,
                          with_images: bool = True, num_classes: int = 10,
                          generator: torch.Generator | None = None, seed: int = 0,
                          dt: float = 0.5) -> FrameBatch:
    """One synthetic frame per slot (see the module docstring).

    Args:
        batch_size: B slots; image_size: (H, W) network input.
        frame_index: position in the sequence (drives the ego pose and the timestamp
            ``1.5e9 + dt * frame_index`` seconds, float64).
        prev_exists: (B,) 0/1; default 0 for frame 0, else 1.
        num_boxes: boxes per slot (an int for all, or one per slot; 0 allowed).
        with_targets: add 3D boxes/labels and the per-camera 2D labels.
        with_images: add (B, 6, 3, H, W) normalised noise images (else ``images=None``).
        generator / seed: random source (a fresh ``torch.Generator`` seeded with ``seed``
            combined with ``frame_index`` when ``generator`` is None).
    """
    B = batch_size
    g = generator or torch.Generator().manual_seed(seed * 1000 + frame_index)
    intr, extr, l2i = pinhole_cameras(image_size)
    poses = torch.stack([ego_pose(frame_index, b, dt=dt) for b in range(B)])  # (B, 4, 4) float64
    if prev_exists is None:
        prev_exists = [0.0 if frame_index == 0 else 1.0] * B
    counts = [int(num_boxes)] * B if isinstance(num_boxes, int) else [int(n) for n in num_boxes]
    if len(counts) != B:
        raise ValueError(f"num_boxes: expected {B} counts, got {len(counts)}")
    images = (torch.randn(B, len(CAMERA_NAMES), 3, *image_size, generator=g) if with_images
              else None)
    batch = FrameBatch(
        images=images,
        intrinsics=intr.expand(B, -1, -1, -1).clone(),
        extrinsics=extr.expand(B, -1, -1, -1).clone(),
        lidar2img=l2i.expand(B, -1, -1, -1).clone(),
        ego_pose=poses.float(),
        ego_pose_inv=rigid_inverse(poses).float(),
        timestamp=torch.full((B,), 1.5e9 + dt * frame_index, dtype=torch.float64),
        prev_exists=torch.tensor(prev_exists, dtype=torch.float32),
        pad_shape=tuple(image_size),
        meta=[{"sample_token": f"synthetic-{b}-{frame_index}", "scene_token": f"synthetic-{b}"}
              for b in range(B)],
    )
    if not with_targets:
        return batch
    boxes, labels = zip(*[random_boxes(n, g, num_classes) for n in counts])
    two_d = [boxes_to_2d(bx, lb, l2i, image_size) for bx, lb in zip(boxes, labels)]
    batch.gt_boxes, batch.gt_labels = list(boxes), list(labels)
    batch.gt_boxes_2d = [t[0] for t in two_d]
    batch.gt_labels_2d = [t[1] for t in two_d]
    batch.centers_2d = [t[2] for t in two_d]
    batch.depths_2d = [t[3] for t in two_d]
    return batch
