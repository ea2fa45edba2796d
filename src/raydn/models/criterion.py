"""Training criterion of the RayDN head (official ``RayDNHead.loss``, spec §8), separate from the
model (DETR style). It holds no state-dict entries.

Per decoder layer l (names as officially: the last layer has no prefix, layer l < L-1 ``d{l}.``):

* matching losses ``loss_cls`` / ``loss_bbox`` over the Q+P non-DN queries after Hungarian
  matching (:class:`raydn.models.matcher.HungarianMatcher3D`):
  focal(sum over B*(Q+P)*C) / max(n_pos_local, 1) * cls_weight and
  sum_matched sum_d cw_d |pred_d - enc(gt)_d| / max(mean_over_ranks(n_pos), 1) * bbox_weight;
* denoising losses ``dn_loss_cls`` / ``dn_loss_bbox`` over the 15n DN entries:
  focal / max(N_dn * 3.14159 / 6 * split^3, 1) * cls_weight * dn_weight and L1 of **every** entry
  (negatives included) against its original GT box / max(mean_over_ranks(N_dn), 1)
  * bbox_weight * dn_weight.

Rows whose encoded target is not finite are dropped from the L1 sums; both losses go through
``nan_to_num``. Everything runs in float32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from raydn.config import HeadConfig
from raydn.geometry import normalize_bbox
from raydn.models.losses import (
    AVG_FACTOR_EPS,
    one_hot_without_background,
    reduce_by_avg_factor,
    sigmoid_focal_loss,
    weighted_l1_loss,
)
from raydn.models.matcher import HungarianMatcher3D, pad_targets

#: The official code writes pi as this literal in the DN classification normaliser.
OFFICIAL_PI = 3.14159


def reduce_mean_count(count: float, device) -> float:
    """Mean of a per-rank count over all ranks (``torch.distributed`` when initialised, else the
    local value), clamped to >= 1 like the official regression normaliser."""
    value = torch.tensor([float(count)], dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        value = value / dist.get_world_size()
        dist.all_reduce(value)
    return float(value.clamp(min=1).item())


def dn_cls_avg_factor(num_dn: int, split: float) -> float:
    """Official DN classification normaliser ``max(N_dn * 3.14159 / 6 * split^3, 1)`` (same
    left-to-right float evaluation as the official expression)."""
    return max(num_dn * OFFICIAL_PI / 6 * split * split * split, 1)


def layer_key(name: str, layer: int, num_layers: int) -> str:
    """Official loss key: ``name`` for the last layer, ``d{layer}.name`` otherwise."""
    return name if layer == num_layers - 1 else f"d{layer}.{name}"


class RayDNCriterion(nn.Module):
    """Matching + denoising losses of the RayDN head.

    Args:
        cfg: head config; uses ``cfg.loss`` (weights, focal parameters, code weights,
            ``match_with_velo``), ``cfg.denoising`` (``enabled``, ``split``, ``dn_weight``) and
            ``cfg.num_classes``. ``cfg.pc_range`` plays no role: the official encoding keeps
            centres in metres.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        lc = cfg.loss
        self.num_classes = int(cfg.num_classes)
        self.cls_weight = float(lc.cls_weight)
        self.bbox_weight = float(lc.bbox_weight)
        self.alpha = float(lc.focal_alpha)
        self.gamma = float(lc.focal_gamma)
        self.with_dn = bool(cfg.denoising.enabled)
        self.split = float(cfg.denoising.split)
        self.dn_weight = float(cfg.denoising.dn_weight)
        self.register_buffer("code_weights", torch.tensor(lc.code_weights, dtype=torch.float32),
                             persistent=False)
        self.matcher = HungarianMatcher3D(
            cls_weight=lc.cls_weight, bbox_weight=lc.bbox_weight, match_costs=lc.code_weights,
            focal_alpha=lc.focal_alpha, focal_gamma=lc.focal_gamma,
            match_with_velo=lc.match_with_velo)

    # ------------------------------------------------------------------ pieces
    def _cls_loss(self, logits: Tensor, labels: Tensor, avg_factor: float) -> Tensor:
        """logits (L, ..., C), labels (...,) or (L, ...) in [0, C] -> (L,) focal losses."""
        targets = one_hot_without_background(labels, self.num_classes, logits.dtype)
        loss = sigmoid_focal_loss(logits, targets.expand_as(logits), self.alpha, self.gamma)
        dims = tuple(range(1, loss.dim()))
        return torch.nan_to_num(self.cls_weight * reduce_by_avg_factor(loss, avg_factor, dims))

    def _l1_rows(self, pred: Tensor, target: Tensor, layer_idx: Tensor, num_layers: int,
                 avg_factor: float) -> Tensor:
        """Selected rows pred / target (K, 10), their layer (K,) -> (L,) weighted L1 losses;
        rows whose target is not finite are dropped (official ``isnotnan``)."""
        keep = torch.isfinite(target).all(dim=-1)
        pred, target, layer_idx = pred[keep], target[keep], layer_idx[keep]
        cw = self.code_weights.to(pred)[: pred.shape[-1]]
        per_row = weighted_l1_loss(pred, target, cw).sum(dim=-1)
        sums = per_row.new_zeros(num_layers).index_add(0, layer_idx, per_row)
        return torch.nan_to_num(self.bbox_weight * sums / (avg_factor + AVG_FACTOR_EPS))

    def matching_losses(self, cls_scores: Tensor, bbox_preds: Tensor, gt_boxes: list[Tensor],
                        gt_labels: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Matching losses of all layers.

        Args:
            cls_scores: (L, B, N, C) logits; bbox_preds: (L, B, N, 10) official encoding.
            gt_boxes: B tensors (n_b, 9); gt_labels: B tensors (n_b,).

        Returns:
            loss_cls (L,), loss_bbox (L,), assignments (L, B, N) int64 (0 = background,
            j + 1 = GT j of the sample).
        """
        L, B, N, _ = cls_scores.shape
        if len(gt_boxes) != B:
            raise ValueError(f"gt_boxes has {len(gt_boxes)} samples, predictions have batch {B}")
        device = cls_scores.device
        boxes, labels, num_gts = pad_targets(gt_boxes, gt_labels, device=device)
        assigned = self.matcher(cls_scores, bbox_preds, boxes, labels, num_gts)  # (L, B, N)

        matched = assigned > 0
        gt_idx = (assigned - 1).clamp(min=0)
        target_labels = torch.full_like(assigned, self.num_classes)
        if labels.shape[1] > 0:
            bidx = torch.arange(B, device=device).view(1, B, 1).expand_as(assigned)
            target_labels = torch.where(matched, labels[bidx, gt_idx], target_labels)
        num_pos = int(matched[-1].sum()) if L > 0 else 0  # identical for every layer
        loss_cls = self._cls_loss(cls_scores, target_labels, max(float(num_pos), 1.0))

        rows = matched.nonzero()  # (K, 3): layer, sample, query
        pred = bbox_preds[rows[:, 0], rows[:, 1], rows[:, 2]]
        target = normalize_bbox(boxes[rows[:, 1], gt_idx[rows[:, 0], rows[:, 1], rows[:, 2]]])
        loss_bbox = self._l1_rows(pred, target, rows[:, 0], L, reduce_mean_count(num_pos, device))
        return loss_cls, loss_bbox, assigned

    def dn_losses(self, dn_cls_scores: Tensor, dn_bbox_preds: Tensor, dn) -> tuple[Tensor, Tensor]:
        """Denoising losses of all layers.

        Args:
            dn_cls_scores: (L, B, D, C) logits of the DN slots; dn_bbox_preds: (L, B, D, 10).
            dn: :class:`raydn.models.denoising.DenoisingQueries` (``known_bid``,
                ``map_known_indice``, ``known_labels``, ``known_boxes``).

        Returns:
            dn_loss_cls (L,), dn_loss_bbox (L,).
        """
        L = dn_cls_scores.shape[0]
        dev = dn_cls_scores.device
        bid, slot = dn.known_bid.to(dev).long(), dn.map_known_indice.to(dev).long()
        cls = dn_cls_scores[:, bid, slot]          # (L, N_dn, C)
        reg = dn_bbox_preds[:, bid, slot]          # (L, N_dn, 10)
        num_dn = int(dn.known_indice.numel())
        labels = dn.known_labels.to(cls.device).long()
        loss_cls = self._cls_loss(cls, labels, dn_cls_avg_factor(num_dn, self.split))

        target = normalize_bbox(dn.known_boxes.to(reg)[:, :9])  # (N_dn, 10)
        pred = reg.reshape(-1, reg.shape[-1])
        layer_idx = torch.arange(L, device=reg.device).repeat_interleave(reg.shape[1])
        loss_bbox = self._l1_rows(pred, target.repeat(L, 1), layer_idx, L,
                                  reduce_mean_count(num_dn, reg.device))
        return self.dn_weight * loss_cls, self.dn_weight * loss_bbox

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: dict, gt_boxes: list[Tensor], gt_labels: list[Tensor],
                return_assignments: bool = False):
        """Official loss dictionary of one frame.

        Args:
            outputs: head outputs: ``all_cls_scores`` (L, B, Q+P, C) logits, ``all_bbox_preds``
                (L, B, Q+P, 10) (official encoding, centre in metres), ``dn``
                (``DenoisingQueries`` or None), ``dn_cls_scores`` / ``dn_bbox_preds``
                (L, B, D, C / 10) or None.
            gt_boxes: B tensors (n_b, 9) gravity-centre LiDAR boxes.
            gt_labels: B tensors (n_b,) int64 in [0, num_classes).
            return_assignments: also return the Hungarian assignment.

        Returns:
            ``losses``: dict of 2L scalar tensors (``loss_cls``, ``loss_bbox``, ``d{l}.loss_*``)
            plus 2L DN terms (``dn_loss_cls``, ``dn_loss_bbox``, ``d{l}.dn_loss_*``) when
            denoising is configured; the total loss is ``sum(losses.values())``.
            With ``return_assignments``: ``(losses, assignments)``, assignments (L, B, Q+P) int64
            (0 = background, j + 1 = GT j); ``assignments.flatten(0, 1)`` lists them in the
            official call order (layer-major, then sample).
        """
        cls_scores = outputs["all_cls_scores"].float()
        bbox_preds = outputs["all_bbox_preds"].float()
        L = cls_scores.shape[0]
        loss_cls, loss_bbox, assigned = self.matching_losses(cls_scores, bbox_preds,
                                                             gt_boxes, gt_labels)
        losses: dict[str, Tensor] = {}
        for l in range(L):  # naming only
            losses[layer_key("loss_cls", l, L)] = loss_cls[l]
            losses[layer_key("loss_bbox", l, L)] = loss_bbox[l]

        dn = outputs.get("dn")
        dn_active = dn is not None and int(dn.pad_size) > 0 and outputs.get("dn_cls_scores") is not None
        if dn_active:
            dn_cls, dn_bbox = self.dn_losses(outputs["dn_cls_scores"].float(),
                                             outputs["dn_bbox_preds"].float(), dn)
        elif self.with_dn:  # batch without boxes: log-only copies of the matching losses
            dn_cls, dn_bbox = loss_cls.detach(), loss_bbox.detach()
        if dn_active or self.with_dn:
            for l in range(L):
                losses[layer_key("dn_loss_cls", l, L)] = dn_cls[l]
                losses[layer_key("dn_loss_bbox", l, L)] = dn_bbox[l]
        # official order: last-layer terms first, then d0..d{L-2}
        losses = _official_order(losses, L)
        if outputs.get("group_cls_scores") is not None:  # Group-DETR training groups (not official)
            gc, gb = outputs["group_cls_scores"].float(), outputs["group_bbox_preds"].float()
            Lg, B, Gm, Q = gc.shape[:4]
            # groups folded into the layer axis: each (layer, group) is matched on its own
            g_cls, g_box, _ = self.matching_losses(gc.permute(0, 2, 1, 3, 4).reshape(Lg * Gm, B, Q, -1),
                                                   gb.permute(0, 2, 1, 3, 4).reshape(Lg * Gm, B, Q, -1),
                                                   gt_boxes, gt_labels)
            losses["group_loss_cls"] = g_cls.sum()
            losses["group_loss_bbox"] = g_box.sum()
        if return_assignments:
            return losses, assigned
        return losses


def _official_order(losses: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Reorder keys as the official dict: loss_cls, loss_bbox, d0..., then dn_loss_cls,
    dn_loss_bbox, d0.dn_...."""
    ordered: dict[str, Tensor] = {}
    for prefix in ("", "dn_"):
        names = [f"{prefix}loss_cls", f"{prefix}loss_bbox"]
        for key in names:
            if key in losses:
                ordered[key] = losses[key]
        for l in range(num_layers - 1):
            for key in names:
                k = f"d{l}.{key}"
                if k in losses:
                    ordered[k] = losses[k]
    return ordered
