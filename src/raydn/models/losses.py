"""Functional losses of the RayDN head (spec §8), numerically equal to the mmdet 2.x versions the
official code uses (``FocalLoss(use_sigmoid=True)`` on its pure-PyTorch path, ``L1Loss``).

All functions return **element-wise** losses (no reduction) so the caller chooses how to reduce;
:func:`reduce_by_avg_factor` reproduces mmdet's ``weight_reduce_loss(reduction='mean',
avg_factor=...)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: mmdet adds float32 machine epsilon to every ``avg_factor`` (``weight_reduce_loss``).
AVG_FACTOR_EPS = float(torch.finfo(torch.float32).eps)


def one_hot_without_background(labels: Tensor, num_classes: int, dtype=torch.float32) -> Tensor:
    """Labels (...,) int64 in ``[0, num_classes]`` -> one-hot (..., num_classes) of ``dtype``;
    label ``num_classes`` (background) gives an all-zero row."""
    return F.one_hot(labels.long(), num_classes + 1)[..., :num_classes].to(dtype)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (mmdet ``py_sigmoid_focal_loss`` without reduction).

    Args:
        logits: (..., C) raw class logits.
        targets: (..., C) binary targets (one-hot, background = all zeros), any float dtype.
        alpha, gamma: focal parameters (official 0.25, 2).

    Returns:
        (..., C) loss: ``BCEWithLogits(x, t) * (alpha t + (1 - alpha)(1 - t)) * pt ** gamma`` with
        ``pt = (1 - p) t + p (1 - t)``, ``p = sigmoid(x)``.
    """
    targets = targets.type_as(logits)
    p = logits.sigmoid()
    pt = (1 - p) * targets + p * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight


def weighted_l1_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Element-wise ``|pred - target| * weight`` (weight broadcast over the leading dims, e.g.
    the (10,) code weights). Shapes: pred, target (..., D); weight (D,) or (..., D)."""
    loss = (pred - target).abs()
    return loss if weight is None else loss * weight


def reduce_by_avg_factor(loss: Tensor, avg_factor: float | Tensor, dim=None) -> Tensor:
    """mmdet ``weight_reduce_loss(reduction='mean', avg_factor)``: ``sum / (avg_factor + eps)``
    with eps = float32 machine epsilon. ``dim``: dimensions to sum (None = all)."""
    total = loss.sum() if dim is None else loss.sum(dim=dim)
    return total / (avg_factor + AVG_FACTOR_EPS)


def focal_match_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                     eps: float = 1e-12) -> Tensor:
    """mmdet ``FocalLossCost`` (unweighted), batched.

    Args:
        logits: (..., N, C) class logits of N predictions.
        labels: (..., G) int64 class of G targets, each in ``[0, C)``.

    Returns:
        (..., N, G) cost ``pos[label] - neg[label]`` with
        ``pos = -log(p + eps) alpha (1 - p)^gamma`` and ``neg = -log(1 - p + eps)(1 - alpha) p^gamma``.
    """
    p = logits.sigmoid()
    neg_cost = -(1 - p + eps).log() * (1 - alpha) * p.pow(gamma)
    pos_cost = -(p + eps).log() * alpha * (1 - p).pow(gamma)
    index = labels.long().unsqueeze(-2).expand(*logits.shape[:-1], labels.shape[-1])
    return torch.gather(pos_cost, -1, index) - torch.gather(neg_cost, -1, index)
