"""Pictures: six camera views with projected 3D boxes, a bird's-eye view, and training curves.

No nuScenes SDK needed: everything is drawn from a ``FrameBatch`` (images + ``lidar2img``) and
LiDAR-frame boxes ``(n, 9)``, so it works on your own cameras too. Predictions are drawn in the
class colour (solid), ground truth in white (thin); the front face of a box is marked with an X.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from raydn.geometry import CAMERA_NAMES, CLASS_NAMES, box_corners

#: one RGB colour per class (CLASS_NAMES order)
CLASS_COLORS = (
    (255, 158, 0), (255, 99, 71), (233, 150, 70), (255, 69, 0), (255, 140, 0),
    (112, 128, 144), (255, 61, 99), (220, 20, 60), (0, 0, 230), (47, 79, 79),
)
_EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


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


def render_cameras(images: np.ndarray, lidar2img: torch.Tensor, pred_boxes=None, pred_labels=None,
                   gt_boxes=None, cols: int = 3, camera_names=CAMERA_NAMES) -> Image.Image:
    """Grid of camera views (N, H, W, 3) uint8 with projected boxes (LiDAR frame).

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
            labels = torch.as_tensor(pred_labels).tolist()
            _draw_boxes_on_camera(draw, torch.as_tensor(pred_boxes), lidar2img[cam], (W, H),
                                  [CLASS_COLORS[int(l) % len(CLASS_COLORS)] for l in labels], 2)
        draw.text((4, 2), camera_names[cam] if cam < len(camera_names) else f"cam{cam}", fill=(255, 255, 0))
        canvas.paste(im, ((slot % cols) * W, (slot // cols) * H))
    return canvas


def render_bev(pred_boxes=None, pred_labels=None, gt_boxes=None, extent: float = 55.0,
               size: int = 600, title: str | None = None) -> Image.Image:
    """Bird's-eye view (LiDAR frame, x forward = up, y left = left) of boxes, pixels per metre
    ``size / (2 * extent)``; rings every 10 m."""
    im = Image.new("RGB", (size, size), (20, 20, 24))
    d = ImageDraw.Draw(im)
    s = size / (2 * extent)

    def to_px(x, y):
        return (size / 2 - y * s, size / 2 - x * s)

    for r in range(10, int(extent) + 1, 10):
        d.ellipse([size / 2 - r * s, size / 2 - r * s, size / 2 + r * s, size / 2 + r * s],
                  outline=(60, 60, 70))
    d.polygon([to_px(2.5, 0), to_px(-2, 1), to_px(-2, -1)], fill=(200, 200, 200))  # ego
    for boxes, labels, is_gt in ((gt_boxes, None, True), (pred_boxes, pred_labels, False)):
        if boxes is None or len(boxes) == 0:
            continue
        b = torch.as_tensor(boxes).float()
        corners = box_corners(b)[:, :4, :2].tolist()
        labs = torch.as_tensor(labels).tolist() if labels is not None else [0] * len(b)
        for c, lab in zip(corners, labs):
            pts = [to_px(x, y) for x, y in c]
            col = (255, 255, 255) if is_gt else CLASS_COLORS[int(lab) % len(CLASS_COLORS)]
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
                 camera_names=CAMERA_NAMES) -> Image.Image:
    """Cameras on the left, BEV on the right, one picture. ``images`` (N, H, W, 3) uint8 (any N),
    ``lidar2img`` (N, 4, 4); ``pred``: dict(boxes (k, 9) LiDAR/vehicle frame, scores, labels);
    ``camera_names``: the N view labels (default: the six nuScenes cameras)."""
    pb = pl = None
    if pred is not None:
        keep = pred["scores"] >= score_threshold
        pb, pl = pred["boxes"][keep], pred["labels"][keep]
    cams = render_cameras(images, lidar2img, pb, pl, gt_boxes, cols=min(3, len(images)),
                          camera_names=tuple(camera_names))
    bev = render_bev(pb, pl, gt_boxes, size=cams.height, title=title)
    out = Image.new("RGB", (cams.width + bev.width, cams.height))
    out.paste(cams, (0, 0))
    out.paste(bev, (cams.width, 0))
    return out


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    from raydn.io import atomic_path
    with atomic_path(path) as tmp:
        image.save(tmp)
    return Path(path)


def plot_training_curves(history: list[dict], path: str | os.PathLike) -> Path:
    """Loss curve (and its running mean) from the trainer's history; PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    from raydn.io import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return Path(path)
