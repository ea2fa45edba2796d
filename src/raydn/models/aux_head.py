"""Auxiliary YOLOX 2D head (official ``YOLOXHeadCustom``, spec §4), training only.

Its outputs are never fed to the 3D head; the five losses only shape the shared image features.
Module names equal the official ``img_roi_head.*`` checkpoint keys (spec §11.3)::

    multi_level_cls_convs.{l}.{0,1}.conv.weight / .bn.*     (3x3, no bias, BN + Swish)
    multi_level_reg_convs.{l}.{0,1}.*
    multi_level_conv_cls.{l}  (C_cls, F, 1, 1)   multi_level_conv_reg.{l}       (4, F, 1, 1)
    multi_level_conv_obj.{l}  (1, F, 1, 1)       multi_level_conv_centers2d.{l} (2, F, 1, 1)

Frames and units: everything is in **pixels of the network input** (the augmented, cropped
image, e.g. 704 x 256). Priors (mmdet ``MlvlPointGenerator``, offset 0) sit at the top-left corner
``(j * s, i * s)`` of cell (i, j) at stride s; levels are concatenated, each in row-major order.
Image order everywhere is batch-major then camera (image index ``b * N + n``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydn.config import AuxHeadConfig
from raydn.errors import DataError
from raydn.models.simota import aligned_iou, simota_assign

#: keys of the output dict of :meth:`YOLOXAuxHead.forward` (official names)
OUT_CLS = "enc_cls_scores"
OUT_REG = "enc_bbox_preds"
OUT_OBJ = "objectnesses"
OUT_CTR = "pred_centers2d_offset"

LOSS_IOU_WEIGHT = 5.0     # IoULoss(mode='square', eps=1e-16, loss_weight=5.0)
IOU_LOSS_EPS = 1e-16
L1_TARGET_EPS = 1e-8


@dataclass
class AuxTargets:
    """Targets of the positives (n_pos of them, ordered image-major then prior index).

    * ``pos_mask`` (I, P) bool; ``img_idx``, ``prior_idx``, ``gt_idx`` (n_pos,) int64.
    * ``cls`` (n_pos, C): one-hot(label) x IoU(prediction, GT) (IoU-aware).
    * ``obj`` (I, P) float: 1 for positives, 0 elsewhere.
    * ``box`` (n_pos, 4): GT xyxy pixels.
    * ``l1`` (n_pos, 4): ((cx - x)/s, (cy - y)/s, log(w/s + 1e-8), log(h/s + 1e-8)).
    * ``centers`` (n_pos, 2): (c2d - (x, y)) / s.
    """
    pos_mask: Tensor
    img_idx: Tensor
    prior_idx: Tensor
    gt_idx: Tensor
    cls: Tensor
    obj: Tensor
    box: Tensor
    l1: Tensor
    centers: Tensor


class Swish(nn.Module):
    """x * sigmoid(x) (mmcv ``Swish``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class ConvBNSwish(nn.Module):
    """mmcv ``ConvModule(3x3, bias=False, BN(momentum=0.03, eps=1e-3), Swish)``; children named
    ``conv``, ``bn``, ``activate`` like the official module."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.activate = Swish()

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def reduce_mean(t: Tensor) -> Tensor:
    """Mean over all processes when ``torch.distributed`` is initialised (mmdet ``reduce_mean``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t.div_(torch.distributed.get_world_size()))
    return t


def grid_priors(featmap_sizes: list[tuple[int, int]], strides: tuple, dtype=torch.float32,
                device=None) -> Tensor:
    """Multi-level point priors (mmdet ``MlvlPointGenerator(offset=0)``, ``with_stride=True``).

    featmap_sizes: [(H_l, W_l)] -> (sum_l H_l * W_l, 4) rows ``[x, y, s, s]`` in pixels, levels
    concatenated, each level row-major (y outer, x inner)."""
    out = []
    for (h, w), s in zip(featmap_sizes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) * s
        xs = torch.arange(w, device=device, dtype=dtype) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        st = torch.full((h * w,), float(s), dtype=dtype, device=device)
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1), st, st], -1))
    return torch.cat(out, 0)


def decode_boxes(priors: Tensor, bbox_preds: Tensor) -> Tensor:
    """priors (P, 4) [x, y, sw, sh]; bbox_preds (..., P, 4) raw (dx, dy, log w, log h) in stride
    units -> (..., P, 4) xyxy pixels: centre = d * s + (x, y), wh = exp(.) * s."""
    xy = bbox_preds[..., :2] * priors[:, 2:] + priors[:, :2]
    wh = bbox_preds[..., 2:].exp() * priors[:, 2:]
    return torch.cat([xy - wh / 2, xy + wh / 2], -1)


def _pad_per_image(tensors: list[Tensor], width: int | None, dtype, device, field: str
                   ) -> tuple[Tensor, Tensor]:
    """Pad a list of I tensors (k_i, *tail) to (I, G, *tail) (G = max k_i) with zeros, plus the
    (I, G) bool validity mask. Vectorised scatter (no per-image copies)."""
    counts = torch.tensor([int(t.shape[0]) for t in tensors], dtype=torch.long)
    n_img = len(tensors)
    g = int(counts.max()) if n_img else 0
    tail = () if width is None else (width,)
    out = torch.zeros((n_img, g) + tail, dtype=dtype, device=device)
    valid = torch.zeros((n_img, g), dtype=torch.bool, device=device)
    if g == 0:
        return out, valid
    for t in tensors:
        if tuple(t.shape[1:]) != tail:
            raise DataError(f"{field}: expected per-camera tensors of shape (k{', ' if tail else ''}"
                            f"{', '.join(map(str, tail))}), got {tuple(t.shape)}")
    flat = torch.cat([t.to(device=device, dtype=dtype) for t in tensors], 0)
    counts = counts.to(device)
    img = torch.repeat_interleave(torch.arange(n_img, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(flat.shape[0], device=device) - starts[img]
    out[img, pos] = flat
    valid[img, pos] = True
    return out, valid


def _flatten_nested(nested, n_img: int, field: str) -> list[Tensor]:
    """list over B of list over N of tensors -> list of B*N tensors (batch-major, then camera)."""
    if nested is None:
        raise DataError(f"{field}: 2D targets are required for the auxiliary head loss")
    flat = [t for per_sample in nested for t in per_sample]
    if len(flat) != n_img:
        raise DataError(f"{field}: expected {n_img} per-camera tensors (B*N images, batch-major), "
                        f"got {len(flat)}")
    out = [torch.as_tensor(t) for t in flat]
    # accept any empty tensor (e.g. torch.zeros(0)) for a camera without objects
    return [t.reshape((0,) + tuple(_row_shape(field))) if t.numel() == 0 else t for t in out]


def _row_shape(field: str) -> tuple:
    """Trailing shape of one target row of ``field``."""
    return {"gt_boxes_2d": (4,), "centers_2d": (2,)}.get(field, ())


class YOLOXAuxHead(nn.Module):
    """YOLOX 2D head on every feature level with separate weights per level.

    Args:
        num_classes: classes in the 2D order of spec §2.1 (10).
        in_channels / feat_channels: input and hidden widths (256).
        strides: stride of each level in pixels ((8, 16, 32, 64) for R50, (4, 8, 16, 32) for EVA).
        stacked_convs: conv layers per branch (2).
        center_radius, candidate_topk, iou_weight, cls_weight: SimOTA settings.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 256, feat_channels: int = 256,
                 strides: tuple = (8, 16, 32, 64), stacked_convs: int = 2,
                 center_radius: float = 2.5, candidate_topk: int = 10,
                 iou_weight: float = 3.0, cls_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.center_radius = center_radius
        self.candidate_topk = candidate_topk
        self.iou_weight = iou_weight
        self.cls_weight = cls_weight

        def stack():
            return nn.Sequential(*[ConvBNSwish(in_channels if i == 0 else feat_channels, feat_channels)
                                   for i in range(stacked_convs)])

        n = len(self.strides)
        self.multi_level_cls_convs = nn.ModuleList([stack() for _ in range(n)])
        self.multi_level_reg_convs = nn.ModuleList([stack() for _ in range(n)])
        self.multi_level_conv_cls = nn.ModuleList([nn.Conv2d(feat_channels, num_classes, 1) for _ in range(n)])
        self.multi_level_conv_reg = nn.ModuleList([nn.Conv2d(feat_channels, 4, 1) for _ in range(n)])
        self.multi_level_conv_obj = nn.ModuleList([nn.Conv2d(feat_channels, 1, 1) for _ in range(n)])
        self.multi_level_conv_centers2d = nn.ModuleList([nn.Conv2d(feat_channels, 2, 1) for _ in range(n)])
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: every Conv2d Kaiming-uniform (a=sqrt(5), fan_in, leaky_relu) with zero
        bias (mmcv ``KaimingInit``), then cls/obj biases = -log(99) (prior prob 0.01). BN: 1/0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), mode="fan_in",
                                         nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        bias_init = -math.log((1 - 0.01) / 0.01)
        for conv_cls, conv_obj in zip(self.multi_level_conv_cls, self.multi_level_conv_obj):
            nn.init.constant_(conv_cls.bias, bias_init)
            nn.init.constant_(conv_obj.bias, bias_init)

    # ------------------------------------------------------------------ forward
    def forward(self, feats: list[Tensor]) -> dict[str, list[Tensor]]:
        """feats: one tensor per level, (B, N, C, H_l, W_l) or (B*N, C, H_l, W_l).

        Returns per-level lists of raw maps on (B*N, ., H_l, W_l):
        ``enc_cls_scores`` (num_classes logits), ``enc_bbox_preds`` (4: dx, dy, log w, log h in
        stride units), ``objectnesses`` (1 logit), ``pred_centers2d_offset`` (2, stride units)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"YOLOXAuxHead: expected {len(self.strides)} feature levels, got {len(feats)}")
        out = {OUT_CLS: [], OUT_REG: [], OUT_OBJ: [], OUT_CTR: []}
        for lvl, x in enumerate(feats):
            if x.dim() == 5:
                x = x.flatten(0, 1)
            cls_feat = self.multi_level_cls_convs[lvl](x)
            reg_feat = self.multi_level_reg_convs[lvl](x)
            out[OUT_CLS].append(self.multi_level_conv_cls[lvl](cls_feat))
            out[OUT_REG].append(self.multi_level_conv_reg[lvl](reg_feat))
            out[OUT_OBJ].append(self.multi_level_conv_obj[lvl](reg_feat))
            out[OUT_CTR].append(self.multi_level_conv_centers2d[lvl](reg_feat))
        return out

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _flatten_levels(maps: list[Tensor]) -> Tensor:
        """[(I, K, H_l, W_l)] -> (I, sum_l H_l W_l, K) fp32, row-major per level."""
        return torch.cat([m.float().permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], 1)

    def priors(self, outputs: dict[str, list[Tensor]]) -> Tensor:
        """(P, 4) unshifted priors ``[x, y, s, s]`` for the maps in ``outputs``."""
        sizes = [tuple(m.shape[-2:]) for m in outputs[OUT_CLS]]
        return grid_priors(sizes, self.strides, dtype=torch.float32, device=outputs[OUT_CLS][0].device)

    # ------------------------------------------------------------------ targets / loss
    def flatten_outputs(self, outputs: dict[str, list[Tensor]]) -> dict[str, Tensor]:
        """Per-image flat fp32 predictions over all P priors: ``cls`` (I, P, C), ``reg`` (I, P, 4),
        ``obj`` (I, P), ``ctr`` (I, P, 2), plus ``priors`` (P, 4) and decoded ``boxes`` (I, P, 4)."""
        flat = {
            "cls": self._flatten_levels(outputs[OUT_CLS]),
            "reg": self._flatten_levels(outputs[OUT_REG]),
            "obj": self._flatten_levels(outputs[OUT_OBJ])[..., 0],
            "ctr": self._flatten_levels(outputs[OUT_CTR]),
            "priors": self.priors(outputs),
        }
        flat["boxes"] = decode_boxes(flat["priors"], flat["reg"])
        return flat

    @torch.no_grad()
    def get_targets(self, flat: dict[str, Tensor], gt_boxes_2d, gt_labels_2d, centers_2d
                    ) -> AuxTargets:
        """SimOTA assignment and regression targets for the I = B*N images of ``flat``
        (see :meth:`flatten_outputs`); GT nesting as in :meth:`loss`."""
        cls, obj, boxes, priors = flat["cls"], flat["obj"], flat["boxes"], flat["priors"]
        n_img = obj.shape[0]
        device = obj.device
        gt_b, gt_valid = _pad_per_image(_flatten_nested(gt_boxes_2d, n_img, "gt_boxes_2d"), 4,
                                        torch.float32, device, "gt_boxes_2d")
        gt_l, l_valid = _pad_per_image(_flatten_nested(gt_labels_2d, n_img, "gt_labels_2d"), None,
                                       torch.long, device, "gt_labels_2d")
        gt_c, c_valid = _pad_per_image(_flatten_nested(centers_2d, n_img, "centers_2d"), 2,
                                       torch.float32, device, "centers_2d")
        if not (torch.equal(gt_valid, l_valid) and torch.equal(gt_valid, c_valid)):
            raise DataError("gt_boxes_2d / gt_labels_2d / centers_2d: per-camera counts differ")
        if bool(((gt_l < 0) | (gt_l >= self.num_classes))[gt_valid].any()):
            raise DataError(f"gt_labels_2d: labels must lie in [0, {self.num_classes})")

        # YOLOX assigns with priors shifted by half a stride but regresses from the unshifted ones
        shifted = torch.cat([priors[:, :2] + priors[:, 2:] * 0.5, priors[:, 2:]], -1)
        scores = torch.sigmoid(cls) * torch.sigmoid(obj)[..., None]
        assign = simota_assign(scores, shifted, boxes, gt_b, gt_l, gt_valid,
                               center_radius=self.center_radius, candidate_topk=self.candidate_topk,
                               iou_weight=self.iou_weight, cls_weight=self.cls_weight)

        pos = assign.pos_mask
        img_idx, pri_idx = pos.nonzero(as_tuple=True)
        gi = assign.gt_inds[img_idx, pri_idx]
        pp = priors[pri_idx]
        box = gt_b[img_idx, gi]
        cxcy = (box[:, :2] + box[:, 2:]) / 2
        wh = box[:, 2:] - box[:, :2]
        return AuxTargets(
            pos_mask=pos, img_idx=img_idx, prior_idx=pri_idx, gt_idx=gi,
            cls=F.one_hot(gt_l[img_idx, gi], self.num_classes).float()
            * assign.pos_ious[img_idx, pri_idx, None],
            obj=pos.float(),
            box=box,
            l1=torch.cat([(cxcy - pp[:, :2]) / pp[:, 2:], torch.log(wh / pp[:, 2:] + L1_TARGET_EPS)], -1),
            centers=(gt_c[img_idx, gi] - pp[:, :2]) / pp[:, 2:],
        )

    def loss(self, outputs: dict[str, list[Tensor]], gt_boxes_2d, gt_labels_2d, centers_2d,
             depths_2d=None) -> dict[str, Tensor]:
        """The five auxiliary losses (official names), each ``sum / max(mean_gpus(#pos), 1)``.

        Args:
            outputs: :meth:`forward` output for I = B*N images.
            gt_boxes_2d: list over B of list over N of (k, 4) xyxy pixels of the network input.
            gt_labels_2d: same nesting, (k,) int in the 2D class order of spec §2.1.
            centers_2d: same nesting, (k, 2) projected 3D centres in pixels.
            depths_2d: accepted and ignored (as officially).
        Returns:
            ``enc_loss_cls`` (BCE on positives, IoU-aware targets), ``enc_loss_iou``
            (5 * sum(1 - IoU^2)), ``enc_loss_obj`` (BCE on all priors), ``enc_loss_bbox`` (L1 on raw
            box outputs), ``enc_loss_centers2d`` (L1 on raw centre offsets).
        """
        del depths_2d
        flat = self.flatten_outputs(outputs)
        detached = {k: v.detach() for k, v in flat.items()}
        t = self.get_targets(detached, gt_boxes_2d, gt_labels_2d, centers_2d)
        i, p = t.img_idx, t.prior_idx

        num_pos = torch.tensor(float(i.numel()), device=flat["obj"].device)
        norm = reduce_mean(num_pos).clamp(min=1.0)
        iou = aligned_iou(flat["boxes"][i, p], t.box).clamp(min=IOU_LOSS_EPS)
        return {
            "enc_loss_cls": F.binary_cross_entropy_with_logits(flat["cls"][i, p], t.cls,
                                                               reduction="sum") / norm,
            "enc_loss_iou": LOSS_IOU_WEIGHT * (1 - iou.pow(2)).sum() / norm,
            "enc_loss_obj": F.binary_cross_entropy_with_logits(flat["obj"], t.obj,
                                                               reduction="sum") / norm,
            "enc_loss_bbox": (flat["reg"][i, p] - t.l1).abs().sum() / norm,
            "enc_loss_centers2d": (flat["ctr"][i, p] - t.centers).abs().sum() / norm,
        }


def build_aux_head(cfg: AuxHeadConfig) -> YOLOXAuxHead:
    """The auxiliary 2D head of a :class:`raydn.config.AuxHeadConfig`."""
    return YOLOXAuxHead(num_classes=cfg.num_classes, in_channels=cfg.in_channels,
                        feat_channels=cfg.feat_channels, strides=cfg.strides,
                        center_radius=cfg.center_radius)
