"""SimOTA label assignment of the auxiliary YOLOX head (mmdet 2.x ``SimOTAAssigner``), batched.

All images of a call are assigned at once: the GTs of every image are padded to the largest
count ``G`` and a ``gt_valid`` mask marks the real ones. Per image and GT the semantics are those
of mmdet 2.28 (spec §4):

1. A prior (shifted centre ``(x + s/2, y + s/2)``, stride ``s``) is a *candidate* ("valid") if it
   lies strictly inside any GT box or strictly inside any GT's centre square of half-size
   ``center_radius * s``.
2. Cost over candidates: ``cls_weight * sum_c BCE(sqrt(score_c), onehot_c)
   + iou_weight * -log(IoU + 1e-7) + 1e5 * !(inside box AND inside centre square)``,
   where ``score = sigmoid(cls) * sigmoid(obj)`` and BCE's logs are clamped at -100 like
   ``F.binary_cross_entropy``.
3. Dynamic k per GT: ``max(int(sum of the candidate_topk largest IoUs), 1)``; the k cheapest
   candidates are matched.
4. A prior matched to several GTs keeps only the GT of minimum cost.

Only the candidate priors of an image take part; images without GT or without candidates get no
positives. Everything runs without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INF_COST = 100000.0   # mmdet's INF for priors outside (box AND centre region)
IOU_EPS = 1e-7        # -log(IoU + eps)


@dataclass
class SimOTAResult:
    """Assignment of ``I`` images x ``P`` priors.

    * ``gt_inds`` (I, P) int64: index of the assigned GT in ``[0, G)`` or -1 for background.
    * ``pos_ious`` (I, P) float: IoU between the prediction and its assigned GT (0 for background).
    """
    gt_inds: Tensor
    pos_ious: Tensor

    @property
    def pos_mask(self) -> Tensor:
        """(I, P) bool, True for positive priors."""
        return self.gt_inds >= 0


def pairwise_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of every pair, mmdet ``bbox_overlaps`` semantics (union clamped at ``eps``).

    boxes1 (..., P, 4), boxes2 (..., G, 4) xyxy -> (..., P, G)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[..., :, None] + area2[..., None, :] - overlap).clamp(min=eps)
    return overlap / union


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of corresponding boxes, mmdet ``bbox_overlaps(is_aligned=True)``: (..., 4) x (..., 4) -> (...)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - overlap).clamp(min=eps)
    return overlap / union


def _in_box_and_centre(priors: Tensor, gt_boxes: Tensor, center_radius: float
                       ) -> tuple[Tensor, Tensor]:
    """priors (P, 4) [cx, cy, sw, sh] (already shifted by s/2), gt_boxes (I, G, 4) xyxy ->
    ``in_box`` (I, P, G), ``in_ctr`` (I, P, G) bool (strict inequalities as in mmdet)."""
    px = priors[None, :, 0, None]
    py = priors[None, :, 1, None]
    sx = priors[None, :, 2, None] * center_radius
    sy = priors[None, :, 3, None] * center_radius
    x1, y1, x2, y2 = (gt_boxes[:, None, :, k] for k in range(4))
    in_box = torch.stack([px - x1, py - y1, x2 - px, y2 - py], 0).amin(0) > 0
    cx = (x1 + x2) / 2.0
    cy = (y1 + y2) / 2.0
    in_ctr = torch.stack([px - (cx - sx), py - (cy - sy), (cx + sx) - px, (cy + sy) - py], 0).amin(0) > 0
    return in_box, in_ctr


def _cls_cost(scores: Tensor, gt_labels: Tensor) -> Tensor:
    """Sum over classes of BCE(sqrt(score), onehot(label)) without materialising (I, P, G, C).

    scores (I, P, C) probabilities, gt_labels (I, G) int64 -> (I, P, G).
    BCE = -[t log p + (1 - t) log(1 - p)] with logs clamped >= -100, so the sum equals
    ``sum_c L0_c - L0_label + L1_label`` with L0 = -log(1 - p), L1 = -log(p)."""
    p = scores.float().sqrt()
    l1 = -torch.log(p).clamp(min=-100.0)
    l0 = -torch.log(1.0 - p).clamp(min=-100.0)
    idx = gt_labels.clamp(min=0)[:, None, :].expand(-1, p.shape[1], -1)   # (I, P, G)
    return l0.sum(-1, keepdim=True) - l0.gather(2, idx) + l1.gather(2, idx)


@torch.no_grad()
def simota_assign(pred_scores: Tensor, priors: Tensor, decoded_bboxes: Tensor,
                  gt_bboxes: Tensor, gt_labels: Tensor, gt_valid: Tensor | None = None,
                  center_radius: float = 2.5, candidate_topk: int = 10,
                  iou_weight: float = 3.0, cls_weight: float = 1.0) -> SimOTAResult:
    """Batched SimOTA assignment.

    Args:
        pred_scores: (I, P, C) class probabilities ``sigmoid(cls) * sigmoid(obj)``.
        priors: (P, 4) ``[x, y, stride_w, stride_h]`` pixels, **already shifted** by half a stride
            (the caller adds s/2; the same priors are used by every image).
        decoded_bboxes: (I, P, 4) predicted xyxy boxes in pixels.
        gt_bboxes: (I, G, 4) xyxy pixels, padded; gt_labels: (I, G) int64 classes in [0, C).
        gt_valid: (I, G) bool, True for real GTs (default: all real).
    Returns:
        :class:`SimOTAResult` with (I, P) tensors.
    """
    n_img, n_pri = decoded_bboxes.shape[:2]
    n_gt = gt_bboxes.shape[1]
    device = decoded_bboxes.device
    gt_inds = torch.full((n_img, n_pri), -1, dtype=torch.long, device=device)
    pos_ious = decoded_bboxes.new_zeros((n_img, n_pri))
    if n_gt == 0 or n_pri == 0:
        return SimOTAResult(gt_inds, pos_ious)
    if gt_valid is None:
        gt_valid = torch.ones((n_img, n_gt), dtype=torch.bool, device=device)
    gt_bboxes = gt_bboxes.to(decoded_bboxes.dtype)

    in_box, in_ctr = _in_box_and_centre(priors, gt_bboxes, center_radius)
    in_box = in_box & gt_valid[:, None, :]
    in_ctr = in_ctr & gt_valid[:, None, :]
    cand = (in_box | in_ctr).any(-1)                                   # (I, P) "valid_mask"
    pair_valid = cand[:, :, None] & gt_valid[:, None, :]               # (I, P, G)

    ious = pairwise_iou(decoded_bboxes, gt_bboxes)
    ious = torch.where(pair_valid, ious, torch.zeros_like(ious))
    cost = (_cls_cost(pred_scores, gt_labels) * cls_weight
            + (-torch.log(ious + IOU_EPS)) * iou_weight
            + (~(in_box & in_ctr)).to(ious.dtype) * INF_COST)
    cost = torch.where(pair_valid, cost, torch.full_like(cost, float("inf")))

    # dynamic k: sum of the top-k candidate IoUs (non-candidates carry IoU 0, which adds nothing)
    topk = min(candidate_topk, n_pri)
    dyn_k = ious.topk(topk, dim=1).values.sum(1).int().clamp(min=1)    # (I, G)
    k_max = int(min(int(dyn_k.max()), n_pri))
    _, order = cost.topk(k_max, dim=1, largest=False)                  # (I, k_max, G)
    rank_ok = torch.arange(k_max, device=device)[None, :, None] < dyn_k[:, None, :]
    matching = torch.zeros((n_img, n_pri, n_gt), dtype=torch.bool, device=device)
    matching.scatter_(1, order, rank_ok.expand(n_img, k_max, n_gt))
    matching &= pair_valid                                              # never a non-candidate

    # a prior matched to several GTs keeps the GT of minimum cost
    multi = matching.sum(-1) > 1
    if bool(multi.any()):
        best = torch.nn.functional.one_hot(cost.argmin(-1), n_gt).bool()
        matching = torch.where(multi[..., None], best, matching)

    pos = matching.any(-1)
    gt_inds = torch.where(pos, matching.to(ious.dtype).argmax(-1), gt_inds)
    pos_ious = (matching.to(ious.dtype) * ious).sum(-1)
    return SimOTAResult(gt_inds, pos_ious)
