"""Hungarian matching of predictions to GT boxes (official ``HungarianAssigner3D``, spec §8.2).

cost[q, j] = cls_weight * FocalCost(logit_q, label_j)
           + bbox_weight * sum_{d < 8} |mc_d * pred_q,d - mc_d * enc(gt_j)_d|

with ``mc`` the match costs (= the code weights officially), ``enc`` the official box encoding
(:func:`raydn.geometry.normalize_bbox`, centre in metres). Velocity dims (8, 9) join the cost only
with ``match_with_velo``. Costs go to the CPU once, ``nan_to_num(100, 100, -100)``, then
``scipy.optimize.linear_sum_assignment`` per (layer, sample); unmatched predictions are background.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from raydn.geometry import normalize_bbox
from raydn.models.losses import focal_match_cost


def pad_targets(gt_boxes: list[Tensor], gt_labels: list[Tensor], device=None,
                dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ragged per-sample targets.

    Args:
        gt_boxes: B tensors (n_b, 9) LiDAR boxes (gravity centre).
        gt_labels: B tensors (n_b,) int64.

    Returns:
        boxes (B, G, 9) zero-padded, labels (B, G) int64 zero-padded, num_gts (B,) int64,
        with G = max_b n_b (0 when no sample has a box).
    """
    if len(gt_boxes) != len(gt_labels):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} samples but gt_labels has {len(gt_labels)}")
    if device is None:
        device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    num = [int(b.shape[0]) for b in gt_boxes]
    for i, (b, lab) in enumerate(zip(gt_boxes, gt_labels)):
        if b.dim() != 2 or b.shape[-1] < 9:
            raise ValueError(f"gt_boxes[{i}] must have shape (n, 9), got {tuple(b.shape)}")
        if lab.shape != (b.shape[0],):
            raise ValueError(f"gt_labels[{i}] must have shape ({b.shape[0]},), got {tuple(lab.shape)}")
    B, G = len(gt_boxes), max(num, default=0)
    boxes = torch.zeros(B, G, 9, device=device, dtype=dtype)
    labels = torch.zeros(B, G, device=device, dtype=torch.long)
    if G > 0:
        cat_boxes = torch.cat([b[:, :9] for b in gt_boxes]).to(device=device, dtype=dtype)
        cat_labels = torch.cat(list(gt_labels)).to(device=device, dtype=torch.long)
        counts = torch.tensor(num, device=device)
        bid = torch.repeat_interleave(torch.arange(B, device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(cat_boxes.shape[0], device=device) - starts[bid]
        boxes[bid, local] = cat_boxes
        labels[bid, local] = cat_labels
    return boxes, labels, torch.tensor(num, dtype=torch.long)


class HungarianMatcher3D(nn.Module):
    """Official 3D Hungarian assigner, vectorised over layers and samples (only the scipy call is
    per sample). Holds no state-dict entries."""

    def __init__(self, cls_weight: float = 2.0, bbox_weight: float = 0.25,
                 match_costs=(2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 match_with_velo: bool = False):
        super().__init__()
        self.cls_weight = float(cls_weight)
        self.bbox_weight = float(bbox_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.match_with_velo = bool(match_with_velo)
        self.register_buffer("match_costs", torch.tensor(match_costs, dtype=torch.float32),
                             persistent=False)

    @torch.no_grad()
    def cost_matrix(self, cls_logits: Tensor, bbox_preds: Tensor, gt_boxes: Tensor,
                    gt_labels: Tensor) -> Tensor:
        """Batched matching cost.

        Args:
            cls_logits: (..., N, C) logits; bbox_preds: (..., N, 10) official encoding.
            gt_boxes: (..., G, 9) LiDAR boxes; gt_labels: (..., G) int64 (leading dims broadcast
                against the predictions', e.g. (1, B, G, 9) for all layers).

        Returns:
            (..., N, G) float32 cost (before ``nan_to_num``).
        """
        cls_cost = focal_match_cost(cls_logits, gt_labels.expand(*cls_logits.shape[:-2], -1),
                                    self.focal_alpha, self.focal_gamma) * self.cls_weight
        mc = self.match_costs.to(bbox_preds)
        pred = bbox_preds * mc[: bbox_preds.shape[-1]]
        tgt = normalize_bbox(gt_boxes) * mc[:10]
        d = 10 if self.match_with_velo else 8
        tgt = tgt[..., :d].expand(*pred.shape[:-2], -1, -1).contiguous()
        reg_cost = torch.cdist(pred[..., :d].contiguous(), tgt, p=1) * self.bbox_weight
        return cls_cost + reg_cost

    @torch.no_grad()
    def forward(self, cls_logits: Tensor, bbox_preds: Tensor, gt_boxes: Tensor,
                gt_labels: Tensor, num_gts: Tensor) -> Tensor:
        """Assign every prediction of every (layer, sample).

        Args:
            cls_logits: (L, B, N, C); bbox_preds: (L, B, N, 10).
            gt_boxes: (B, G, 9) padded; gt_labels: (B, G) padded; num_gts: (B,) valid counts
                (see :func:`pad_targets`).

        Returns:
            (L, B, N) int64 on the predictions' device: 0 = background, j + 1 = GT j of the sample.
        """
        L, B, N = cls_logits.shape[:3]
        assigned = np.zeros((L, B, N), dtype=np.int64)
        counts = [int(n) for n in num_gts.tolist()]
        if N > 0 and max(counts, default=0) > 0:
            cost = self.cost_matrix(cls_logits.float(), bbox_preds.float(),
                                    gt_boxes.unsqueeze(0).float(), gt_labels.unsqueeze(0))
            cost = torch.nan_to_num(cost.cpu(), nan=100.0, posinf=100.0, neginf=-100.0).numpy()
            for l in range(L):
                for b in range(B):
                    if counts[b] == 0:
                        continue
                    rows, cols = linear_sum_assignment(cost[l, b, :, : counts[b]])
                    assigned[l, b, rows] = cols + 1
        return torch.from_numpy(assigned).to(cls_logits.device)
