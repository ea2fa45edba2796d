"""Decoding of the head outputs: NMS-free as officially (``NMSFreeCoder`` + ``get_bboxes``, spec
§9.1), optionally followed by a class-wise bird's-eye-view NMS (``HeadConfig.nms_radius``, not
official; used by the CPU demo presets, whose minutes-long training leaves duplicates)."""
from __future__ import annotations

import torch
from torch import Tensor

from raydn.core.outputs import Selection
from raydn.geometry import POST_CENTER_RANGE, denormalize_bbox

__all__ = ["Selection", "decode_dense", "bev_nms_keep", "decode_single", "apply_bev_nms", "decode",
           "to_bottom_center", "decode_bottom"]


def decode_dense(cls_scores: Tensor, bbox_preds: Tensor, max_num: int = 300,
                 post_center_range=POST_CENTER_RANGE, *, with_query: bool = False) -> tuple[Tensor, ...]:
    """Batched, fixed-size form of :func:`decode_single` (static shapes: the ONNX step graph).

    cls_scores (B, Q, K) logits, bbox_preds (B, Q, 10) official encoding -> ``boxes`` (B, k, 9)
    gravity-centre LiDAR boxes, ``scores`` (B, k) sigmoid, descending, ``labels`` (B, k) int64,
    ``keep`` (B, k) bool (centre inside ``post_center_range``, inclusive), with
    k = min(max_num, Q * K); ``with_query``: also ``query`` (B, k) int64, the query each row was
    decoded from (the index the top-k selected). :func:`decode_single` of sample b is
    ``x[b][keep[b]]`` of these."""
    B, Q, num_classes = cls_scores.shape
    k = min(int(max_num), Q * num_classes)
    scores, idx = cls_scores.sigmoid().reshape(B, Q * num_classes).topk(k, dim=1)
    labels = idx % num_classes
    query = torch.div(idx, num_classes, rounding_mode="floor")
    enc = torch.gather(bbox_preds, 1, query.unsqueeze(-1).expand(-1, -1, bbox_preds.shape[-1]))
    boxes = denormalize_bbox(enc)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if post_center_range is not None:
        r = torch.as_tensor(post_center_range, dtype=boxes.dtype, device=boxes.device)
        keep = (boxes[..., :3] >= r[:3]).all(-1) & (boxes[..., :3] <= r[3:]).all(-1)
    return (boxes, scores, labels, keep, query) if with_query else (boxes, scores, labels, keep)


def bev_nms_keep(centres: Tensor, labels: Tensor, radius) -> Tensor:
    """Greedy class-wise NMS in the bird's-eye view, for detections sorted by descending score.

    centres (k, >=2) metres (x, y used), labels (k,) int64, radius (classes,) metres: a detection
    is dropped when a kept, higher-ranked detection of the same class lies closer than its class
    radius (strict ``<``). Returns keep (k,) bool -- exactly the greedy result, computed without a
    loop over boxes: ``keep[j] = not any(keep[i] and suppresses[i, j] for i < j)`` determines
    ``keep`` rank by rank, so iterating it from all-True is exact after at most k rounds (as many
    as the longest suppression chain, usually 2-3)."""
    k = int(centres.shape[0])
    keep = torch.ones(k, dtype=torch.bool, device=centres.device)
    if k < 2:
        return keep
    r = torch.as_tensor(radius, dtype=centres.dtype, device=centres.device)[labels]
    xy = centres[:, :2]
    close = torch.cdist(xy, xy) < r[:, None]
    earlier = torch.ones(k, k, dtype=torch.bool, device=centres.device).triu(diagonal=1)
    suppresses = close & earlier & (labels[:, None] == labels[None, :])           # (i, j): i drops j
    for _ in range(k):  # rounds of the fixpoint (not a loop over boxes); exits after a few
        new = ~(suppresses & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return keep


def decode_single(cls_scores: Tensor, bbox_preds: Tensor, max_num: int = 300,
                  post_center_range=POST_CENTER_RANGE, score_threshold: float | None = None,
                  nms_radius=None) -> dict:
    """One sample: cls_scores (Q, K) logits, bbox_preds (Q, 10) official encoding ->
    dict(boxes (k, 9) gravity-centre LiDAR boxes ``[x, y, z, l, w, h, yaw, vx, vy]``,
    scores (k,), labels (k,) int64, query (k,) int64: the query (row of cls_scores) each
    detection was decoded from), k <= max_num, sorted by descending score.

    Top-``max_num`` over sigmoid scores flattened query-major (index = query * K + class), then
    keep boxes whose centre lies inside ``post_center_range`` (inclusive), then (``nms_radius``
    given, not official) :func:`bev_nms_keep` over those."""
    boxes, scores, labels, keep, query = (t[0] for t in decode_dense(
        cls_scores[None], bbox_preds[None], max_num, post_center_range, with_query=True))
    if score_threshold is not None:
        keep = keep & (scores > score_threshold)
    det = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep], "query": query[keep]}
    return det if nms_radius is None else apply_bev_nms(det, nms_radius)


def apply_bev_nms(det: dict, radius) -> dict:
    """A decoded detection dict (``boxes`` (k, >=2), ``scores`` (k,) descending, ``labels`` (k,)
    and any other per-detection tensors) -> the rows :func:`bev_nms_keep` keeps."""
    keep = bev_nms_keep(det["boxes"], det["labels"], radius)
    return {name: t[keep] for name, t in det.items()}


def _settings(cfg, max_num, post_center_range):
    if cfg is not None:
        max_num = cfg.max_num if max_num is None else max_num
        post_center_range = cfg.post_center_range if post_center_range is None else post_center_range
    return (300 if max_num is None else max_num,
            POST_CENTER_RANGE if post_center_range is None else post_center_range)


def decode(outputs: dict, cfg=None, *, max_num: int | None = None,
           post_center_range=None) -> list[dict]:
    """Decode the LAST decoder layer of ``outputs`` (``all_cls_scores`` (L, B, Q, K),
    ``all_bbox_preds`` (L, B, Q, 10)) into one dict per sample (see :func:`decode_single`);
    boxes have their z at the gravity centre (official ``NMSFreeCoder.decode``).

    ``cfg``: optional :class:`raydn.config.HeadConfig` supplying ``max_num``,
    ``post_center_range`` (explicit keyword arguments win; defaults 300 / official range) and
    ``nms_radius`` (None: NMS-free, as officially)."""
    max_num, post_center_range = _settings(cfg, max_num, post_center_range)
    nms = getattr(cfg, "nms_radius", None)
    cls, box = outputs["all_cls_scores"][-1], outputs["all_bbox_preds"][-1]
    return [decode_single(cls[b], box[b], max_num, post_center_range, nms_radius=nms)
            for b in range(cls.shape[0])]


def to_bottom_center(boxes: Tensor) -> Tensor:
    """(k, 9) gravity-centre boxes -> bottom-centre (z - h/2), as the official ``get_bboxes``."""
    out = boxes.clone()
    out[:, 2] = boxes[:, 2] - boxes[:, 5] * 0.5
    return out


def decode_bottom(outputs: dict, cfg=None, *, max_num: int | None = None,
                  post_center_range=None) -> list[dict]:
    """Like :func:`decode` but boxes with z at the box bottom (official ``get_bboxes`` /
    mmdet3d ``LiDARInstance3DBoxes`` convention)."""
    res = decode(outputs, cfg, max_num=max_num, post_center_range=post_center_range)
    return [dict(r, boxes=to_bottom_center(r["boxes"])) for r in res]
