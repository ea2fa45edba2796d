"""The official image / calibration / box augmentations (spec §2.3 steps 3-8 and §2.4).

* :func:`sample_image_aug` + :func:`apply_image_aug` + :func:`ida_matrix` = ``ResizeCropFlipRotImage``
  (one draw per sample shared by its 6 images; PIL bicubic resize -> crop (black fill past the edges)
  -> optional horizontal flip; ``K <- A K``).
* :func:`transform_boxes_2d` + :func:`filter_invisible` = its 2D-label branch.
* :func:`sample_global_aug` + :func:`global_rot_scale_matrix` + :func:`apply_global_rot_scale` =
  ``GlobalRotScaleTransImage`` (updates ``lidar2img``, ``ego_pose``, ``ego_pose_inv`` and the boxes,
  **not** ``intrinsics`` / ``extrinsics``, as officially).
* :func:`filter_boxes_range`, :func:`limit_yaw` = ``ObjectRangeFilter``.
* :func:`normalize_images` = ``NormalizeMultiviewImage`` (RGB decode + RGB mean/std is identical to the
  official BGR decode + ``to_rgb``), :func:`pad_images` = ``PadMultiViewImage``.

Everything is numpy float64 / PIL uint8 (the dataset casts to float32 tensors at the end). Boxes are
``(n, 9)`` LiDAR boxes ``[x, y, z_center, l, w, h, yaw, vx, vy]``; pixel coordinates are continuous
with the origin at the top-left corner of the top-left pixel (PIL / mmcv convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "AugConfig", "aug_config_r50", "aug_config_eva", "ImageAugParams", "GlobalAugParams",
    "sample_image_aug", "ida_matrix", "apply_image_aug", "transform_boxes_2d", "filter_invisible",
    "sample_global_aug", "global_rot_scale_matrix", "apply_global_rot_scale", "limit_yaw",
    "filter_boxes_range", "normalize_images", "pad_images", "IMG_MEAN_RGB", "IMG_STD_RGB",
]

#: ``img_norm_cfg`` of the official configs, in RGB order (to_rgb=True).
IMG_MEAN_RGB = (123.675, 116.28, 103.53)
IMG_STD_RGB = (58.395, 57.12, 57.375)

_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC
_FLIP_LR = getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT


@dataclass(frozen=True)
class AugConfig:
    """``ida_aug_conf`` + ``GlobalRotScaleTransImage`` settings (defaults: official R50, training).

    ``final_dim`` (H, W) network input; ``src_size`` (H, W) of the raw camera images (the official
    code hard-codes 900x1600 and so do we: other sizes are rejected by the dataset);
    ``resize_lim`` range of the random resize factor; ``bot_pct_lim`` fraction cut at the bottom
    (official (0, 0)); ``rot_range`` (radians) / ``scale_range`` of the global BEV augmentation;
    ``training=False`` gives the deterministic test transform (no flip, no global aug).
    ``jpeg_draft``: decode JPEGs with libjpeg DCT down-scaling (PIL ``draft``) by 1/2 when the resize
    factor is <= 0.5 — faster, slightly different pixels (NOT official; off by default).
    ``size_divisor``: pad the input to a multiple (official 32; no-op for 256x704 / 320x800).
    ``fast_resize``: resample only the cropped region (see :func:`apply_image_aug`; <= 1 grey level
    from the official resize-then-crop on < 0.05 % of pixels); ``False`` = literal official ops."""
    final_dim: tuple = (256, 704)
    resize_lim: tuple = (0.38, 0.55)
    rand_flip: bool = True
    rot_range: tuple = (-0.3925, 0.3925)
    scale_range: tuple = (0.95, 1.05)
    training: bool = True
    src_size: tuple = (900, 1600)
    bot_pct_lim: tuple = (0.0, 0.0)
    jpeg_draft: bool = False
    fast_resize: bool = True
    size_divisor: int = 32
    img_mean: tuple = IMG_MEAN_RGB
    img_std: tuple = IMG_STD_RGB

    def __post_init__(self):
        if len(self.final_dim) != 2 or min(self.final_dim) <= 0:
            raise ValueError(f"AugConfig.final_dim must be (H, W) > 0, got {self.final_dim}")
        if self.resize_lim[0] > self.resize_lim[1] or self.resize_lim[0] <= 0:
            raise ValueError(f"AugConfig.resize_lim must be 0 < lo <= hi, got {self.resize_lim}")


def aug_config_r50(training: bool = True, **overrides) -> AugConfig:
    """Official R50 config: 256x704, resize U(0.38, 0.55) (test: 0.44, crop top 140)."""
    kw = dict(final_dim=(256, 704), resize_lim=(0.38, 0.55), training=training)
    kw.update(overrides)
    return AugConfig(**kw)


def aug_config_eva(training: bool = True, **overrides) -> AugConfig:
    """Official EVA02-L config: 320x800, resize U(0.47, 0.625) (test: 0.5, crop top 130)."""
    kw = dict(final_dim=(320, 800), resize_lim=(0.47, 0.625), training=training)
    kw.update(overrides)
    return AugConfig(**kw)


@dataclass(frozen=True)
class ImageAugParams:
    """One ``ResizeCropFlipRotImage`` draw: ``resize`` factor, ``resize_dims`` (W', H') = (int(W r),
    int(H r)), ``crop`` box (x0, y0, x1, y1) in the resized image, ``flip`` (horizontal, after crop)."""
    resize: float
    resize_dims: tuple
    crop: tuple
    flip: bool


@dataclass(frozen=True)
class GlobalAugParams:
    """One ``GlobalRotScaleTransImage`` draw: ``rot`` (radians, new = R(-rot) old) and ``scale``."""
    rot: float = 0.0
    scale: float = 1.0


def sample_image_aug(cfg: AugConfig, rng: np.random.Generator | None) -> ImageAugParams:
    """Draw the image augmentation exactly as ``ResizeCropFlipRotImage._sample_augmentation``.

    Training: r ~ U(resize_lim); crop_h = int((1 - U(bot_pct_lim)) H') - fH (bottom crop);
    crop_w = int(U(0, max(0, W' - fW))); flip with p = 0.5 if ``rand_flip``. Test: r = max(fH/H, fW/W),
    centred crop in width, bottom-aligned in height, no flip (``rng`` unused)."""
    H, W = cfg.src_size
    fH, fW = cfg.final_dim
    if cfg.training:
        r = float(rng.uniform(*cfg.resize_lim))
        newW, newH = int(W * r), int(H * r)
        crop_h = int((1 - rng.uniform(*cfg.bot_pct_lim)) * newH) - fH
        crop_w = int(rng.uniform(0, max(0, newW - fW)))
        flip = bool(cfg.rand_flip and rng.integers(0, 2))
    else:
        r = max(fH / H, fW / W)
        newW, newH = int(W * r), int(H * r)
        crop_h = int((1 - float(np.mean(cfg.bot_pct_lim))) * newH) - fH
        crop_w = int(max(0, newW - fW) / 2)
        flip = False
    return ImageAugParams(r, (newW, newH), (crop_w, crop_h, crop_w + fW, crop_h + fH), flip)


def ida_matrix(p: ImageAugParams) -> np.ndarray:
    """3x3 float64 pixel transform A of the image augmentation: u' = A [u, v, 1] (original pixels
    -> augmented pixels). A = [[±r, 0, t_x], [0, r, -crop_h], [0, 0, 1]], t_x = -crop_w or, under
    flip, crop_w + fW (so ``K' = A K`` has a negative fx after a flip, as officially)."""
    x0, y0, x1, _ = p.crop
    a = np.eye(3)
    a[0, 0] = a[1, 1] = p.resize
    a[0, 2], a[1, 2] = -x0, -y0
    if p.flip:
        a[0, 0] = -p.resize
        a[0, 2] = x0 + (x1 - x0)
    return a


def apply_image_aug(img: Image.Image, p: ImageAugParams, fast: bool = True) -> Image.Image:
    """PIL ops of the official transform: bicubic resize to ``resize_dims`` -> crop (regions outside
    the resized image become 0 = black) -> optional left-right flip.

    ``fast=True`` resamples only the part of the resized image that survives the crop (PIL
    ``resize(box=...)``: the same filter centres and support, ~2.3x less work). Its pixels equal the
    resize-then-crop reference up to the fixed-point rounding of PIL's coefficients: at most 1 grey
    level on < 0.05 % of the pixels (measured; see tests). ``fast=False`` is the literal official
    sequence. ``img`` may be a JPEG already DCT-decoded at a reduced size (``draft``): the source
    coordinates are scaled by ``img.width / W'``, which keeps the geometry because the reduction
    factor divides 1600x900 exactly."""
    newW, newH = p.resize_dims
    x0, y0, x1, y1 = p.crop
    if not fast:
        img = img.resize(p.resize_dims, _BICUBIC).crop(p.crop)
    else:
        vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x1, newW), min(y1, newH)
        sx, sy = img.width / newW, img.height / newH
        if vx1 > vx0 and vy1 > vy0:
            part = img.resize((vx1 - vx0, vy1 - vy0), _BICUBIC,
                              box=(vx0 * sx, vy0 * sy, vx1 * sx, vy1 * sy))
        else:
            part = None
        if (vx0, vy0, vx1, vy1) == (x0, y0, x1, y1):
            img = part
        else:  # crop reaches past the resized image: black fill, as PIL's crop does
            canvas = Image.new(img.mode, (x1 - x0, y1 - y0), 0)
            if part is not None:
                canvas.paste(part, (vx0 - x0, vy0 - y0))
            img = canvas
    if p.flip:
        img = img.transpose(_FLIP_LR)
    return img


def transform_boxes_2d(bboxes: np.ndarray, centers2d: np.ndarray, labels: np.ndarray,
                       depths: np.ndarray, p: ImageAugParams, final_dim: tuple,
                       min_size: float = 2.0):
    """Official ``_bboxes_transform`` for one camera. ``bboxes`` (k, 4) xyxy and ``centers2d`` (k, 2)
    in original pixels; returns the kept (bboxes, centers2d, labels, depths) in augmented pixels:
    scale by r, shift by -(crop_w, crop_h), clip boxes and centres to [0, fW] x [0, fH], keep boxes
    with clipped w, h >= ``min_size``, then flip x (x' = fW - x)."""
    fH, fW = final_dim
    x0, y0 = p.crop[0], p.crop[1]
    off = np.array([x0, y0, x0, y0], dtype=np.float64)
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4) * p.resize - off
    b[:, 0::2] = np.clip(b[:, 0::2], 0, fW)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, fH)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    c = np.asarray(centers2d, dtype=np.float64).reshape(-1, 2) * p.resize - off[:2]
    c[:, 0] = np.clip(c[:, 0], 0, fW)
    c[:, 1] = np.clip(c[:, 1], 0, fH)
    if p.flip:
        b = np.stack([fW - b[:, 2], b[:, 1], fW - b[:, 0], b[:, 3]], axis=1)
        c[:, 0] = fW - c[:, 0]
    return b[keep], c[keep], np.asarray(labels)[keep], np.asarray(depths, dtype=np.float64)[keep]


def filter_invisible(bboxes: np.ndarray, centers2d: np.ndarray, labels: np.ndarray,
                     depths: np.ndarray, final_dim: tuple):
    """Official ``_filter_invisible`` (occlusion filter), vectorised.

    Officially: sort by depth descending (stable), paint the integer box regions
    ``[ceil(y1):floor(y2), ceil(x1):floor(x2)]`` into a zero-initialised (fH, fW) index map in that
    order (near boxes overwrite far ones) and keep the sorted indices present in the map (so index
    0, the farthest box, survives whenever any pixel is left uncovered). We evaluate the same map on
    the grid compressed to the boxes' integer edges (each cell is inside or outside every box), so
    the cost is O(k^3) instead of O(k fH fW). Returns the kept items in far-to-near order."""
    fH, fW = final_dim
    depths = np.asarray(depths, dtype=np.float64)
    k = len(depths)
    if k == 0:
        return bboxes, centers2d, labels, depths
    order = np.argsort(-depths, kind="stable")
    bboxes, centers2d, labels, depths = bboxes[order], centers2d[order], np.asarray(labels)[order], depths[order]
    u1 = np.ceil(bboxes[:, 0]).astype(np.int64)
    v1 = np.ceil(bboxes[:, 1]).astype(np.int64)
    u2 = np.floor(bboxes[:, 2]).astype(np.int64)
    v2 = np.floor(bboxes[:, 3]).astype(np.int64)
    xs = np.unique(np.clip(np.concatenate([[0, fW], u1, u2]), 0, fW))
    ys = np.unique(np.clip(np.concatenate([[0, fH], v1, v2]), 0, fH))
    cx0, cx1 = xs[:-1], xs[1:]  # cells [xs[j], xs[j+1]) of positive width
    cy0, cy1 = ys[:-1], ys[1:]
    in_x = (u1[:, None] <= cx0[None]) & (cx1[None] <= u2[:, None])      # (k, gx)
    in_y = (v1[:, None] <= cy0[None]) & (cy1[None] <= v2[:, None])      # (k, gy)
    cover = in_y[:, :, None] & in_x[:, None, :]                          # (k, gy, gx)
    idx = np.arange(k)[:, None, None]
    top = np.where(cover, idx, 0).max(axis=0)                            # last painter wins
    keep = np.unique(top)
    return bboxes[keep], centers2d[keep], labels[keep], depths[keep]


def sample_global_aug(cfg: AugConfig, rng: np.random.Generator | None) -> GlobalAugParams:
    """θ ~ U(rot_range), s ~ U(scale_range) (training only; identity otherwise)."""
    if not cfg.training:
        return GlobalAugParams()
    rot = float(rng.uniform(*cfg.rot_range))
    scale = float(rng.uniform(*cfg.scale_range))
    return GlobalAugParams(rot, scale)


def global_rot_scale_matrix(g: GlobalAugParams) -> np.ndarray:
    """4x4 float64 M = S · Rθ mapping old LiDAR coordinates to the augmented ones (p' = M p), with
    Rθ = [[c, s, 0], [-s, c, 0], [0, 0, 1]] (rotation by -θ about z) and S = diag(s, s, s)."""
    c, s = math.cos(g.rot), math.sin(g.rot)
    m = np.eye(4)
    m[:3, :3] = g.scale * np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    return m


def apply_global_rot_scale(g: GlobalAugParams, lidar2img: np.ndarray, ego_pose: np.ndarray,
                           ego_pose_inv: np.ndarray, boxes: np.ndarray):
    """Apply ``GlobalRotScaleTransImage``. ``lidar2img`` (N, 4, 4), ``ego_pose``/``ego_pose_inv``
    (4, 4), ``boxes`` (n, 9) gravity-centre LiDAR boxes. Returns the updated
    ``(lidar2img · M⁻¹, ego_pose · M⁻¹, M · ego_pose_inv, boxes')`` where boxes' have centres and
    velocities mapped by M's rotation, yaw -= θ, centre/sizes/velocities × s (mmdet3d ``rotate(-θ)``
    then ``scale(s)``; yaw is not re-wrapped, as officially). Intrinsics/extrinsics are left alone."""
    m = global_rot_scale_matrix(g)
    m_inv = np.linalg.inv(m)
    boxes = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 9)
    rs = m[:3, :3]
    boxes[:, 0:3] = boxes[:, 0:3] @ rs.T
    boxes[:, 3:6] *= g.scale
    boxes[:, 6] -= g.rot
    boxes[:, 7:9] = boxes[:, 7:9] @ rs[:2, :2].T
    return lidar2img @ m_inv, ego_pose @ m_inv, m @ ego_pose_inv, boxes


def limit_yaw(yaw: np.ndarray, offset: float = 0.5, period: float = 2 * np.pi) -> np.ndarray:
    """mmdet3d ``limit_period``: ``yaw - floor(yaw / period + offset) * period`` ∈ [-π, π)."""
    return yaw - np.floor(yaw / period + offset) * period


def filter_boxes_range(boxes: np.ndarray, pc_range) -> np.ndarray:
    """``ObjectRangeFilter`` mask: BEV centre strictly inside (x_min, x_max) x (y_min, y_max)."""
    x, y = boxes[:, 0], boxes[:, 1]
    return (x > pc_range[0]) & (y > pc_range[1]) & (x < pc_range[3]) & (y < pc_range[4])


def normalize_images(imgs_uint8: np.ndarray, mean=IMG_MEAN_RGB, std=IMG_STD_RGB) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 ``(x - mean) / std`` (RGB mean/std), computed
    like mmcv ``imnormalize`` (subtract, then multiply by 1/std in float32)."""
    arr = np.asarray(imgs_uint8)
    if not arr.flags.writeable:
        arr = arr.copy()
    # channel-first copy in uint8 first (4x less memory traffic), then convert in place
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().float()
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    inv = (1.0 / torch.tensor(std, dtype=torch.float64)).float().view(1, 3, 1, 1)
    return x.sub_(m).mul_(inv)


def pad_images(imgs: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """Zero-pad (N, 3, H, W) at the bottom/right to multiples of ``size_divisor`` (no-op if aligned)."""
    h, w = imgs.shape[-2:]
    ph = (-h) % size_divisor if size_divisor else 0
    pw = (-w) % size_divisor if size_divisor else 0
    if ph == 0 and pw == 0:
        return imgs
    return torch.nn.functional.pad(imgs, (0, pw, 0, ph), value=0.0)
