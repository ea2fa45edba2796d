"""Dense depth supervision from LiDAR (NOT official; training only): a light depth head on the image
features and its targets from the sample's LiDAR points.

Design (after Sparse4D v2/v3's ``DenseDepthNet``; written for this package):

* **Head**: one 1x1 convolution ``C -> 1`` per supervised feature level
  (:attr:`raydn.config.DepthSupervisionConfig.levels`, indices into the levels the RayDN head reads,
  0 = finest). The prediction is ``exp(conv(x)) * |fx| / equal_focal``: the network predicts the
  depth a camera of focal length ``equal_focal`` pixels would see and the camera's own focal length
  (of the augmented input: ``intrinsics[..., 0, 0]``, negative after a flip) rescales it, so the
  image resize augmentation does not contradict the targets.
* **Targets** (:func:`depth_targets`): the LiDAR points of each sample (LiDAR frame, already
  through the BEV rotation/scale augmentation, as the boxes) are projected through the augmented
  ``lidar2img`` of every camera; a point with camera depth in ``[min_depth, max_depth]`` that lands
  inside the ``pad_shape`` image falls into the feature cell ``(floor(v H_l / H), floor(u W_l / W))``
  of each level; the target of a cell is the smallest depth that falls into it (the visible
  surface), 0 = no target.
* **Loss** (:meth:`DenseDepthHead.loss`): L1 between the prediction (clipped to ``[0, max_depth]``)
  and the target on the cells that have one, averaged per level and over levels, times
  ``loss_weight`` (Sparse4D v3: 0.2). Reported as ``loss_depth``.

BEVDepth instead classifies depth into bins over a frustum that the view transform then uses; the
RayDN head samples image features sparsely and has no use for a depth distribution, so a regression
that only shapes the features (as in Sparse4D) is the lighter choice. The head never runs outside
:meth:`raydn.models.detector.RayDNDetector.forward_train`: inference and exported graphs do not
contain it, and :func:`raydn.interop.convert.load_model` drops its parameters (``depth_head.*``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from raydn.config import DepthSupervisionConfig
from raydn.geometry import project_points

__all__ = ["DenseDepthHead", "depth_targets"]


@torch.no_grad()
def depth_targets(points: Sequence[Tensor], lidar2img: Tensor, pad_shape: tuple[int, int],
                  level_shapes: Sequence[tuple[int, int]], min_depth: float, max_depth: float
                  ) -> list[Tensor]:
    """Per-cell LiDAR depth targets.

    Args: ``points`` B tensors (P_b, >=3) (x, y, z in metres in the LiDAR frame of ``lidar2img``;
    extra columns ignored); ``lidar2img`` (B, N, 4, 4) LiDAR -> pixel x depth of the network input;
    ``pad_shape`` (H, W) pixels of that input; ``level_shapes`` [(H_l, W_l)] feature grid sizes.
    Returns one (B, N, H_l, W_l) float32 tensor per level: the smallest camera depth (metres) of the
    points in ``[min_depth, max_depth]`` that project into each cell, 0 where none does."""
    B, N = lidar2img.shape[:2]
    H, W = pad_shape
    out = [torch.full((B * N * h * w,), float("inf"), dtype=torch.float32, device=lidar2img.device)
           for h, w in level_shapes]
    for b in range(B):  # per sample: each has its own number of points
        pts = points[b][:, :3].to(device=lidar2img.device, dtype=torch.float32)
        for n in range(N):  # per camera (6): one small matmul each
            uv, d = project_points(pts, lidar2img[b, n].float(), eps=1e-5)
            ok = ((d >= min_depth) & (d <= max_depth) & (uv[:, 0] >= 0) & (uv[:, 0] < W)
                  & (uv[:, 1] >= 0) & (uv[:, 1] < H))
            u, v, d = uv[ok, 0], uv[ok, 1], d[ok]
            for t, (h, w) in zip(out, level_shapes):
                col = torch.floor(u * (w / W)).long().clamp_(0, w - 1)
                row = torch.floor(v * (h / H)).long().clamp_(0, h - 1)
                idx = (b * N + n) * h * w + row * w + col
                t.scatter_reduce_(0, idx, d, reduce="amin")
    return [torch.where(torch.isinf(t), torch.zeros_like(t), t).reshape(B, N, h, w)
            for t, (h, w) in zip(out, level_shapes)]


class DenseDepthHead(nn.Module):
    """1x1-conv depth regression on the feature levels ``cfg.levels`` (see the module docstring).

    ``in_channels``: channels of the feature levels; ``num_levels``: how many levels the detector
    passes (``HeadConfig.num_levels``); a level index outside ``[0, num_levels)`` is a ValueError."""

    def __init__(self, cfg: DepthSupervisionConfig, in_channels: int, num_levels: int):
        super().__init__()
        levels = tuple(int(v) for v in cfg.levels)
        if not levels or len(set(levels)) != len(levels) or min(levels) < 0 or max(levels) >= num_levels:
            raise ValueError(f"DepthSupervisionConfig.levels: expected distinct level indices in "
                             f"[0, {num_levels}), got {tuple(cfg.levels)}")
        if not 0 < cfg.min_depth < cfg.max_depth:
            raise ValueError(f"DepthSupervisionConfig: expected 0 < min_depth < max_depth, got "
                             f"{cfg.min_depth}, {cfg.max_depth}")
        self.cfg = cfg
        self.levels = levels
        self.depth_layers = nn.ModuleList(nn.Conv2d(in_channels, 1, kernel_size=1) for _ in levels)

    def forward(self, feats: Sequence[Tensor], intrinsics: Tensor) -> list[Tensor]:
        """``feats``: the detector's feature levels, each (B, N, C, H_l, W_l) fp32; ``intrinsics``
        (B, N, 4, 4) of the network input -> per supervised level a (B, N, H_l, W_l) depth (m)."""
        scale = intrinsics[..., 0, 0].abs().float() / float(self.cfg.equal_focal)   # (B, N)
        preds = []
        for conv, lvl in zip(self.depth_layers, self.levels):
            f = feats[lvl]
            B, N = f.shape[:2]
            d = conv(f.flatten(0, 1).float()).exp().reshape(B, N, *f.shape[-2:])
            preds.append(d * scale[..., None, None])
        return preds

    def loss(self, preds: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        """L1 on the cells with a target (> 0), prediction clipped to ``[0, max_depth]``; each
        level's sum divided by ``max(1, cells * levels)``, summed, times ``loss_weight``."""
        total = preds[0].new_zeros(())
        for p, t in zip(preds, targets):
            valid = (t > 0) & ~torch.isnan(p)
            err = (p[valid].clamp(0.0, self.cfg.max_depth) - t[valid]).abs().sum()
            total = total + err / max(1, int(valid.sum()) * len(preds))
        return total * self.cfg.loss_weight

    def loss_from_points(self, feats: Sequence[Tensor], points: Sequence[Tensor], lidar2img: Tensor,
                         intrinsics: Tensor, pad_shape: tuple[int, int]) -> Tensor:
        """``loss_depth`` of one training batch: predictions on ``feats`` against the targets of
        ``points`` (:func:`depth_targets`)."""
        preds = self(feats, intrinsics)
        targets = depth_targets(points, lidar2img, pad_shape, [tuple(p.shape[-2:]) for p in preds],
                                self.cfg.min_depth, self.cfg.max_depth)
        return self.loss(preds, targets)
