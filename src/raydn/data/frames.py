"""One typed path from camera frames to the model: :class:`FrameInputs` -> :func:`collate_frames`
-> :class:`~raydn.core.batch.FrameBatch`.

Every source of frames builds the same :class:`FrameInputs` (one frame of one sample) with the same
helpers, so the geometry is computed one way only:

* :class:`raydn.data.dataset.NuScenesStreamingDataset` (training and evaluation on a nuScenes
  dataroot, official augmentation),
* :class:`raydn.data.own_cameras.CameraRigFrames` (your own cameras + a calibration file),
* ``raydn infer`` (both of the above, streamed through :func:`collate_frames`).

Frames and units (N cameras, any N >= 1; the model decides how many it accepts):

* the "LiDAR frame" is the vehicle-fixed frame the model works in (nuScenes: LIDAR_TOP; your own
  cameras: the calibration file's vehicle frame, x forward, y left, z up), metres;
* ``vehicle2cam`` (N, 4, 4): vehicle -> camera (OpenCV camera axes: x right, y down, z forward);
* ``cam_intrinsics`` (N, 3, 3): pinhole K in pixels of the **original** image; the image transform
  (resize + crop (+ flip)) is the 3x3 pixel map ``ida`` (N, 3, 3), and the network sees
  ``K' = ida @ K``;
* ``ego_pose`` (4, 4): vehicle -> global; timestamps float64 seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from raydn.core.batch import FrameBatch
from raydn.data.images import load_image
from raydn.data.transforms import (AugConfig, ImageAugParams, apply_image_aug, normalize_images,
                                   pad_images, sample_image_aug)

__all__ = ["FrameInputs", "collate_frames", "eval_transform_params",
           "draft_size", "load_camera_images"]


@dataclass
class FrameInputs:
    """One frame of one sample, ready for :func:`collate_frames`.

    * ``images`` (N, 3, H, W) float32 normalised RGB of the network input (H, W = padded
      ``final_dim``), or None (head-only use);
    * ``intrinsics`` (N, 4, 4) viewpad with the transformed K; ``extrinsics`` (N, 4, 4)
      vehicle/LiDAR -> camera; ``lidar2img`` (N, 4, 4) vehicle/LiDAR -> pixel x depth of the
      network input; ``ego_pose`` (4, 4) vehicle/LiDAR -> global, ``ego_pose_inv`` its inverse;
      all float32;
    * ``timestamp`` float seconds (Python float = float64); ``prev_exists`` 0.0 (the memory of
      this slot is reset: a sequence starts) or 1.0;
    * ``pad_shape`` (H, W) of the network input;
    * training targets (None without annotations): ``gt_boxes`` (n, 9) float32 LiDAR boxes
      ``[x, y, z_center, l, w, h, yaw, vx, vy]``, ``gt_labels`` (n,) int64; per-camera lists
      ``gt_boxes_2d`` (k, 4), ``gt_labels_2d`` (k,), ``centers_2d`` (k, 2), ``depths_2d`` (k,);
    * ``meta``: bookkeeping never used by the model maths (tokens, paths, the augmentation draw);
    * ``points`` (depth supervision only, else None): (P, 3) float32 LiDAR points in the frame of
      ``lidar2img`` (after the BEV augmentation).
    """
    images: Tensor | None
    intrinsics: Tensor
    extrinsics: Tensor
    lidar2img: Tensor
    ego_pose: Tensor
    ego_pose_inv: Tensor
    timestamp: float
    prev_exists: float
    pad_shape: tuple[int, int]
    gt_boxes: Tensor | None = None
    gt_labels: Tensor | None = None
    gt_boxes_2d: list[Tensor] | None = None
    gt_labels_2d: list[Tensor] | None = None
    centers_2d: list[Tensor] | None = None
    depths_2d: list[Tensor] | None = None
    meta: dict = field(default_factory=dict)
    points: Tensor | None = None

    @property
    def num_cams(self) -> int:
        return int(self.lidar2img.shape[0])

    @classmethod
    def from_arrays(cls, *, images: Tensor | None, intrinsics, extrinsics, lidar2img, ego_pose,
                    ego_pose_inv, timestamp: float, prev_exists: float,
                    pad_shape: tuple[int, int] | None = None, **rest) -> "FrameInputs":
        """Build from float64 numpy geometry (cast to float32 tensors here, once, after all the
        float64 arithmetic); ``pad_shape`` defaults to the images' (H, W)."""
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        if pad_shape is None:
            if images is None:
                raise ValueError("FrameInputs.from_arrays: pad_shape is needed without images")
            pad_shape = tuple(images.shape[-2:])
        return cls(images=images, intrinsics=f32(intrinsics), extrinsics=f32(extrinsics),
                   lidar2img=f32(lidar2img), ego_pose=f32(ego_pose), ego_pose_inv=f32(ego_pose_inv),
                   timestamp=float(timestamp), prev_exists=float(prev_exists),
                   pad_shape=(int(pad_shape[0]), int(pad_shape[1])), **rest)

    def with_reset(self) -> "FrameInputs":
        """Copy with ``prev_exists = 0`` (the memory of this slot restarts here)."""
        return replace(self, prev_exists=0.0)


def collate_frames(samples: Sequence[FrameInputs]) -> FrameBatch:
    """B :class:`FrameInputs` -> one :class:`FrameBatch` (images (B, N, 3, H, W) float32, matrices
    float32, ``timestamp`` (B,) float64, ``prev_exists`` (B,) float32; targets as per-sample lists,
    ``None`` unless every item has them). All items must have the same N and input size."""
    if not samples:
        raise ValueError("collate_frames: empty batch")
    for i, s in enumerate(samples):
        if not isinstance(s, FrameInputs):
            raise TypeError(f"collate_frames: item {i} is a {type(s).__name__}, expected FrameInputs")
    first = samples[0]
    bad = [i for i, s in enumerate(samples) if s.num_cams != first.num_cams or s.pad_shape != first.pad_shape]
    if bad:
        s = samples[bad[0]]
        raise ValueError(f"collate_frames: item {bad[0]} has {s.num_cams} cameras at {s.pad_shape}, "
                         f"item 0 has {first.num_cams} at {first.pad_shape}")
    stack = lambda k: torch.stack([getattr(s, k) for s in samples])  # noqa: E731
    images = None if any(s.images is None for s in samples) else stack("images")

    def lst(k):
        vals = [getattr(s, k) for s in samples]
        return None if any(v is None for v in vals) else vals

    return FrameBatch(
        images=images,
        intrinsics=stack("intrinsics"), extrinsics=stack("extrinsics"), lidar2img=stack("lidar2img"),
        ego_pose=stack("ego_pose"), ego_pose_inv=stack("ego_pose_inv"),
        timestamp=torch.tensor([float(s.timestamp) for s in samples], dtype=torch.float64),
        prev_exists=torch.tensor([float(s.prev_exists) for s in samples], dtype=torch.float32),
        pad_shape=first.pad_shape,
        gt_boxes=lst("gt_boxes"), gt_labels=lst("gt_labels"),
        gt_boxes_2d=lst("gt_boxes_2d"), gt_labels_2d=lst("gt_labels_2d"),
        centers_2d=lst("centers_2d"), depths_2d=lst("depths_2d"),
        meta=[dict(s.meta) for s in samples], points=lst("points"),
    )


# ---------------------------------------------------------------------------------------- images

def eval_transform_params(cfg: AugConfig, src_size: tuple[int, int]) -> ImageAugParams:
    """The deterministic test transform (spec §2.4) of an image of ``src_size`` (H, W): resize by
    ``max(fH / H, fW / W)``, centred crop in width, bottom-aligned crop in height, no flip."""
    return sample_image_aug(replace(cfg, src_size=tuple(src_size), training=False), None)


def draft_size(cfg: AugConfig, p: ImageAugParams, src_size: tuple[int, int] | None = None
               ) -> tuple | None:
    """Largest libjpeg DCT reduction (1/2, 1/4, 1/8) that divides ``src_size`` (H, W; default
    ``cfg.src_size``) exactly and still yields at least ``resize_dims``; ``None`` if
    ``cfg.jpeg_draft`` is off or none applies."""
    if not cfg.jpeg_draft:
        return None
    H, W = cfg.src_size if src_size is None else src_size
    for f in (8, 4, 2):
        if H % f == 0 and W % f == 0 and p.resize_dims[0] <= W // f and p.resize_dims[1] <= H // f:
            return (W // f, H // f)
    return None


def load_camera_images(paths: Sequence[str | Path], cfg: AugConfig, params: Sequence[ImageAugParams],
                       src_sizes: Sequence[tuple[int, int]], loader=None) -> Tensor:
    """Decode, transform, normalise and pad the N images of one frame -> (N, 3, H, W) float32.

    ``params[i]`` / ``src_sizes[i]`` (H, W) belong to ``paths[i]``; ``loader(path, src_size,
    draft)`` opens one image as RGB PIL (default :func:`raydn.data.images.load_image`, which
    raises :class:`~raydn.errors.DataError` naming the file)."""
    if loader is None:
        loader = load_image
    imgs = np.stack([np.asarray(apply_image_aug(loader(p, tuple(s), draft_size(cfg, a, s)), a, cfg.fast_resize))
                     for p, a, s in zip(paths, params, src_sizes)])  # per file: decoding is per file
    return pad_images(normalize_images(imgs, cfg.img_mean, cfg.img_std), cfg.size_divisor)
