"""The typed batch that flows from the data pipeline into the model.

One :class:`FrameBatch` holds **one frame per batch slot** (streaming: slot b of consecutive batches
walks one sub-sequence in time order). Frames and units:

* ``images`` (B, N, 3, H, W) float32, normalised RGB, N = 6 cameras in ``geometry.CAMERA_NAMES`` order.
* ``intrinsics`` (B, N, 4, 4): 4x4 "viewpad" with the (augmented) 3x3 K in the top-left block.
* ``extrinsics`` (B, N, 4, 4): LiDAR -> camera (NOT updated by the global rot/scale augmentation,
  as in the official code).
* ``lidar2img`` (B, N, 4, 4): (augmented) LiDAR -> pixel*depth of the (augmented) image.
* ``ego_pose`` (B, 4, 4): (augmented) LiDAR -> global ("ego_pose" is the official name);
  ``ego_pose_inv`` its inverse.
* ``timestamp`` (B,) float64 seconds; ``prev_exists`` (B,) float32 0/1 (0 = sequence start:
  the temporal memory of that slot is reset).
* ``pad_shape`` (H, W) of the network input.
* Targets (training): ``gt_boxes`` list of (n_b, 9) LiDAR boxes ``[x, y, z_center, l, w, h, yaw,
  vx, vy]``; ``gt_labels`` list of (n_b,) int64 in ``geometry.CLASS_NAMES`` order; 2D targets per
  sample per camera for the auxiliary head: ``gt_boxes_2d`` (k, 4) xyxy pixels of the augmented
  image, ``gt_labels_2d`` (k,), ``centers_2d`` (k, 2), ``depths_2d`` (k,).
* ``meta``: per sample dicts (``sample_token``, ``scene_token``, ...), never used by the model maths.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class FrameBatch:
    images: Tensor | None
    intrinsics: Tensor
    extrinsics: Tensor
    lidar2img: Tensor
    ego_pose: Tensor
    ego_pose_inv: Tensor
    timestamp: Tensor
    prev_exists: Tensor
    pad_shape: tuple[int, int]
    gt_boxes: list[Tensor] | None = None
    gt_labels: list[Tensor] | None = None
    gt_boxes_2d: list[list[Tensor]] | None = None
    gt_labels_2d: list[list[Tensor]] | None = None
    centers_2d: list[list[Tensor]] | None = None
    depths_2d: list[list[Tensor]] | None = None
    meta: list[dict] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.lidar2img.shape[0])

    @property
    def has_targets(self) -> bool:
        return self.gt_boxes is not None and self.gt_labels is not None

    def to(self, device, non_blocking: bool = False) -> "FrameBatch":
        """Move every tensor (also inside the target lists) to ``device``; dtypes are kept
        (timestamps stay float64)."""
        def mv(x):
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, list):
                return [mv(v) for v in x]
            return x
        return replace(self, **{f.name: mv(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("pad_shape", "meta")})

    def pin_memory(self) -> "FrameBatch":
        """Copy with every tensor in page-locked memory (called by ``DataLoader(pin_memory=True)``)."""
        def pin(x):
            if isinstance(x, Tensor):
                return x.pin_memory()
            if isinstance(x, list):
                return [pin(v) for v in x]
            return x
        return replace(self, **{f.name: pin(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("pad_shape", "meta")})

    def select(self, index: Tensor | list[int]) -> "FrameBatch":
        """Sub-batch of the given slots (tensors and per-sample lists)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, list) and f.name != "pad_shape":
                out[f.name] = [v[i] for i in idx.tolist()] if v else v
            else:
                out[f.name] = v
        return FrameBatch(**out)
