"""Pictures: six camera views with projected 3D boxes, a bird's-eye view, and training curves.

No nuScenes SDK needed: everything is drawn from a ``FrameBatch`` (images + ``lidar2img``) and
LiDAR-frame boxes ``(n, 9)``, so it works on your own cameras too. Predictions are drawn in the
class colour (solid) -- or, with track ids, in their track's colour (:func:`track_color`) with the
track's recent path in the bird's-eye view (:class:`TrackPaths`) --, ground truth in white (thin);
the front face of a box is marked with an X.
"""
from __future__ import annotations

import colorsys
import math
import os
from collections import deque
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from raydn.geometry import CAMERA_NAMES, CLASS_NAMES, box_corners
from raydn.io import atomic_path

#: one RGB colour per class (CLASS_NAMES order)
CLASS_COLORS = (
    (255, 158, 0), (255, 99, 71), (233, 150, 70), (255, 69, 0), (255, 140, 0),
    (112, 128, 144), (255, 61, 99), (220, 20, 60), (0, 0, 230), (47, 79, 79),
)
_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


def track_color(track_id: int) -> tuple[int, int, int]:
    """A bright RGB colour per track id (golden-ratio hue steps: neighbouring ids differ)."""
    h = (int(track_id) * 0.6180339887498949) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


class TrackPaths:
    """Recent global positions of the live tracks of one stream, for drawing.

    :meth:`update` once per frame with the reported ``ids`` (None: no track) and their global
    ``xy`` (metres); a track keeps its last ``length`` positions and is forgotten after
    ``forget`` frames without a detection (or at a new sequence)."""

    def __init__(self, length: int = 12, forget: int = 4):
        self.length, self.forget = int(length), int(forget)
        self.points: dict[int, deque] = {}
        self.last_seen: dict[int, int] = {}
        self.frame = 0

    def update(self, new_sequence: bool, ids, xy) -> None:
        if new_sequence:
            self.points.clear()
            self.last_seen.clear()
        self.frame += 1
        for i, p in zip(ids, xy):  # per reported detection (a few dozen)
            if i is None:
                continue
            self.points.setdefault(int(i), deque(maxlen=self.length)).append((float(p[0]), float(p[1])))
            self.last_seen[int(i)] = self.frame
        for i in [i for i, f in self.last_seen.items() if self.frame - f >= self.forget]:
            del self.points[i], self.last_seen[i]

    def in_frame(self, ids, world_to_vehicle: torch.Tensor) -> dict:
        """``{"ids": ids, "paths": {id: (n, 2) array}}`` with the paths of ``ids`` moved into the
        vehicle frame by ``world_to_vehicle`` (4, 4) (for :func:`render_frame`'s ``tracks``)."""
        T = torch.as_tensor(world_to_vehicle, dtype=torch.float64)
        out = {}
        for i in {int(i) for i in ids if i is not None and int(i) in self.points}:
            p = torch.tensor(list(self.points[i]), dtype=torch.float64)
            # the path lies at the ego's height: only x, y matter in the bird's-eye view
            out[i] = (p @ T[:2, :2].T + T[:2, 3]).numpy()
        return {"ids": list(ids), "paths": out}


def denormalize_images(images: torch.Tensor, mean, std) -> np.ndarray:
    """(N, 3, H, W) normalised RGB -> (N, H, W, 3) uint8."""
    m = torch.as_tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    x = (images.detach().cpu() * s + m).clamp(0, 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _draw_boxes_on_camera(draw: ImageDraw.ImageDraw, boxes: torch.Tensor, lidar2img: torch.Tensor,
                          size: tuple[int, int], colors, width: int) -> None:
    if boxes.numel() == 0:
        return
    corners = box_corners(boxes.float())                                 # (n, 8, 3)
    hom = corners @ lidar2img[:3, :3].T.float() + lidar2img[:3, 3].float()
    depth = hom[..., 2]
    uv = hom[..., :2] / depth.clamp(min=1e-5)[..., None]
    W, H = size
    for i in range(len(boxes)):  # drawing is per box by nature (PIL)
        if (depth[i] <= 0.1).any():
            continue
        pts = uv[i].tolist()
        xs, ys = uv[i, :, 0], uv[i, :, 1]
        if xs.max() < 0 or xs.min() > W or ys.max() < 0 or ys.min() > H:
            continue
        col = tuple(colors[i])
        for a, b in _EDGES:
            draw.line([tuple(pts[a]), tuple(pts[b])], fill=col, width=width)
        draw.line([tuple(pts[0]), tuple(pts[7])], fill=col, width=max(1, width - 1))  # front face X
        draw.line([tuple(pts[3]), tuple(pts[4])], fill=col, width=max(1, width - 1))


def _pred_colors(labels, ids=None) -> list:
    """Per prediction: its track's colour where ``ids[i]`` is not None, else its class colour."""
    labels = torch.as_tensor(labels).tolist()
    ids = ids if ids is not None else [None] * len(labels)
    return [CLASS_COLORS[int(l) % len(CLASS_COLORS)] if i is None else track_color(i)
            for l, i in zip(labels, ids)]


def render_cameras(images: np.ndarray, lidar2img: torch.Tensor, pred_boxes=None, pred_labels=None,
                   gt_boxes=None, cols: int = 3, camera_names=CAMERA_NAMES, pred_ids=None) -> Image.Image:
    """Grid of camera views (N, H, W, 3) uint8 with projected boxes (LiDAR frame); ``pred_ids``:
    track id per prediction (None: class colour).

    Cameras are laid out FRONT_LEFT, FRONT, FRONT_RIGHT / BACK_LEFT, BACK, BACK_RIGHT when the
    six nuScenes cameras are given in the standard order."""
    N, H, W, _ = images.shape
    order = list(range(N))
    if N == 6 and tuple(camera_names) == CAMERA_NAMES:
        order = [2, 0, 1, 4, 3, 5]
    rows = math.ceil(N / cols)
    canvas = Image.new("RGB", (cols * W, rows * H), (0, 0, 0))
    for slot, cam in enumerate(order):
        im = Image.fromarray(images[cam])
        draw = ImageDraw.Draw(im)
        if gt_boxes is not None and len(gt_boxes):
            _draw_boxes_on_camera(draw, torch.as_tensor(gt_boxes), lidar2img[cam], (W, H),
                                  [(255, 255, 255)] * len(gt_boxes), 1)
        if pred_boxes is not None and len(pred_boxes):
            _draw_boxes_on_camera(draw, torch.as_tensor(pred_boxes), lidar2img[cam], (W, H),
                                  _pred_colors(pred_labels, pred_ids), 2)
        draw.text((4, 2), camera_names[cam] if cam < len(camera_names) else f"cam{cam}", fill=(255, 255, 0))
        canvas.paste(im, ((slot % cols) * W, (slot // cols) * H))
    return canvas


def render_bev(pred_boxes=None, pred_labels=None, gt_boxes=None, extent: float = 55.0,
               size: int = 600, title: str | None = None, pred_ids=None,
               paths: dict | None = None) -> Image.Image:
    """Bird's-eye view (LiDAR frame, x forward = up, y left = left) of boxes, pixels per metre
    ``size / (2 * extent)``; rings every 10 m. ``pred_ids``: track id per prediction (its colour);
    ``paths``: track id -> (n, 2) recent centres (LiDAR frame, oldest first), drawn as lines."""
    im = Image.new("RGB", (size, size), (20, 20, 24))
    d = ImageDraw.Draw(im)
    s = size / (2 * extent)

    def to_px(x, y):
        return (size / 2 - y * s, size / 2 - x * s)

    for r in range(10, int(extent) + 1, 10):
        d.ellipse([size / 2 - r * s, size / 2 - r * s, size / 2 + r * s, size / 2 + r * s],
                  outline=(60, 60, 70))
    d.polygon([to_px(2.5, 0), to_px(-2, 1), to_px(-2, -1)], fill=(200, 200, 200))  # ego
    for tid, p in (paths or {}).items():  # per track: its recent path
        if len(p) >= 2:
            d.line([to_px(float(x), float(y)) for x, y in p], fill=track_color(tid), width=2)
    for boxes, labels, is_gt in ((gt_boxes, None, True), (pred_boxes, pred_labels, False)):
        if boxes is None or len(boxes) == 0:
            continue
        b = torch.as_tensor(boxes).float()
        corners = box_corners(b)[:, :4, :2].tolist()
        cols = [(255, 255, 255)] * len(b) if is_gt else _pred_colors(
            labels if labels is not None else [0] * len(b), pred_ids)
        for c, col in zip(corners, cols):
            pts = [to_px(x, y) for x, y in c]
            d.polygon(pts, outline=col, width=1 if is_gt else 2)
            d.line([pts[0], pts[3]], fill=col, width=3 if not is_gt else 1)  # front edge
    if title:
        d.text((6, 6), title, fill=(255, 255, 0))
    y = size - 14 * (len(CLASS_NAMES) + 1) - 4
    for i, name in enumerate(CLASS_NAMES):
        d.text((6, y + 14 * i), name, fill=CLASS_COLORS[i])
    d.text((6, y + 14 * len(CLASS_NAMES)), "ground truth", fill=(255, 255, 255))
    return im


def render_frame(images: np.ndarray, lidar2img: torch.Tensor, pred: dict | None, gt_boxes=None,
                 score_threshold: float = 0.3, title: str | None = None,
                 camera_names=CAMERA_NAMES, tracks: dict | None = None) -> Image.Image:
    """Cameras on the left, BEV on the right, one picture. ``images`` (N, H, W, 3) uint8 (any N),
    ``lidar2img`` (N, 4, 4); ``pred``: dict(boxes (k, 9) LiDAR/vehicle frame, scores, labels);
    ``camera_names``: the N view labels (default: the six nuScenes cameras); ``tracks``:
    ``{"ids": track id (or None) of every prediction with score >= score_threshold, "paths":
    {id: (n, 2)}}`` (:meth:`TrackPaths.in_frame`): boxes in track colours, paths in the BEV."""
    pb = pl = None
    if pred is not None:
        keep = pred["scores"] >= score_threshold
        pb, pl = pred["boxes"][keep], pred["labels"][keep]
    ids = tracks["ids"] if tracks is not None else None
    cams = render_cameras(images, lidar2img, pb, pl, gt_boxes, cols=min(3, len(images)),
                          camera_names=tuple(camera_names), pred_ids=ids)
    bev = render_bev(pb, pl, gt_boxes, size=cams.height, title=title, pred_ids=ids,
                     paths=tracks["paths"] if tracks is not None else None)
    out = Image.new("RGB", (cams.width + bev.width, cams.height))
    out.paste(cams, (0, 0))
    out.paste(bev, (cams.width, 0))
    return out


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp)
    return Path(path)


def plot_training_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss curve (and its running mean) from the trainer's history; PNG."""
    import matplotlib  # optional: raydn[train] / raydn[nuscenes]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: raydn[train] / raydn[nuscenes]
    it = np.array([h["iter"] for h in history])
    loss = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(it, loss, lw=0.6, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = max(5, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(it[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("total loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)
