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
* ``points`` (training with depth supervision only, else None): list of (P_b, 3) float32 LiDAR
  points in the (augmented) LiDAR frame of ``lidar2img`` (:mod:`raydn.models.depth_head`).
* ``meta``: per sample dicts (``sample_token``, ``scene_token``, ...), never used by the model maths.

Input checks: :func:`check_frame_batch` is what ``RayDNDetector.predict`` checks before it touches the
temporal memory: the camera count the model was built for, matching shapes, and finite images,
calibration (``intrinsics``, ``extrinsics``, ``lidar2img``), odometry (``ego_pose``, ``ego_pose_inv``)
and timestamps. A NaN anywhere in these would otherwise give plausible-looking boxes and be carried in
the memory into every later frame of the scene. On an error the caller's ``state`` is untouched: the
next good frame can be given with the same state (the bad frame is skipped), or with
``prev_exists = 0`` to start the memory afresh.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from raydn.errors import DataError

__all__ = ["FrameBatch", "check_frame_batch"]


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
    points: list[Tensor] | None = None

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


#: FrameBatch fields that must be finite, with their expected trailing shape (None: any).
_FINITE_FIELDS = (("intrinsics", (4, 4)), ("extrinsics", (4, 4)), ("lidar2img", (4, 4)))
_POSE_FIELDS = ("ego_pose", "ego_pose_inv")


def _where(batch, b: int) -> str:
    """'frame <sample token>' when the batch carries one, else 'batch slot b'."""
    meta = getattr(batch, "meta", None) or []
    if b < len(meta) and isinstance(meta[b], dict) and meta[b].get("sample_token"):
        return f"frame {meta[b]['sample_token']!r} (batch slot {b})"
    return f"batch slot {b}"


def _first_bad(t: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first non-finite element, or None."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def check_frame_batch(batch, num_cams: int) -> None:
    """Raise :class:`DataError` naming the field, the batch slot/frame and the camera when ``batch``
    does not have ``num_cams`` cameras with consistent shapes, or holds NaN/inf values in its images,
    calibration, poses or timestamps. Costs one ``isfinite`` pass over the images (~1 ms per frame)."""
    B = batch.lidar2img.shape[0] if batch.lidar2img.dim() >= 1 else 0
    for name, tail in _FINITE_FIELDS:
        t = getattr(batch, name)
        if t.dim() != 4 or tuple(t.shape[2:]) != tail or t.shape[0] != B:
            raise DataError(f"FrameBatch.{name}: expected shape (B={B}, N={num_cams}, 4, 4), "
                            f"got {tuple(t.shape)}")
        if t.shape[1] != num_cams:
            raise DataError(f"FrameBatch.{name}: {t.shape[1]} cameras, but the model is built for "
                            f"{num_cams} (shape {tuple(t.shape)}, expected ({B}, {num_cams}, 4, 4))")
    if batch.images is not None:
        img = batch.images
        if img.dim() != 5 or img.shape[0] != B or img.shape[2] != 3:
            raise DataError(f"FrameBatch.images: expected shape (B={B}, N={num_cams}, 3, H, W), "
                            f"got {tuple(img.shape)}")
        if img.shape[1] != num_cams:
            raise DataError(f"FrameBatch.images: {img.shape[1]} cameras, but the model is built for "
                            f"{num_cams} (shape {tuple(img.shape)})")
    for name in _POSE_FIELDS:
        t = getattr(batch, name)
        if tuple(t.shape) != (B, 4, 4):
            raise DataError(f"FrameBatch.{name}: expected shape ({B}, 4, 4), got {tuple(t.shape)}")
    for name in ("timestamp", "prev_exists"):
        t = getattr(batch, name)
        if t.numel() != B:
            raise DataError(f"FrameBatch.{name}: expected {B} values (one per batch slot), got "
                            f"shape {tuple(t.shape)}")
    checks = [(n, getattr(batch, n), True) for n, _ in _FINITE_FIELDS]
    checks += [(n, getattr(batch, n), False) for n in _POSE_FIELDS + ("timestamp", "prev_exists")]
    if batch.images is not None and batch.images.is_floating_point():
        checks.insert(0, ("images", batch.images, True))
    for name, t, per_camera in checks:
        if not t.is_floating_point():
            continue
        idx = _first_bad(t)
        if idx is None:
            continue
        where = _where(batch, idx[0] if t.dim() else 0)
        cam = f", camera {idx[1]}" if per_camera and len(idx) > 1 else ""
        raise DataError(f"FrameBatch.{name}: NaN/inf value in {where}{cam} at index {list(idx)}; "
                        f"expected finite values. The frame was not used and the temporal state "
                        f"passed in is unchanged")
