"""Duplicates along camera rays: the failure ray denoising is meant to remove.

A camera sees an object and, because depth from one image is ambiguous, a DETR-style detector
tends to fire several queries along the same viewing ray at different depths. None of the
standard nuScenes numbers isolates this; this module counts it.

Definition (all in the LiDAR frame of each sample; predictions with ``score >= score_threshold``):

1. **Matching.** Per sample and class, predictions in descending score take the nearest free GT
   box whose BEV centre distance is ``< match_dist`` (2 m, the nuScenes threshold at which TP
   errors are computed; the devkit's strict rule, :func:`raydn.eval.fast_eval.greedy_match_groups`).
   Predictions that take a GT are true positives, the others false positives.
2. **Camera rays.** For every GT box and every camera in which the box centre projects inside the
   image (positive depth), the ray is the half-line from that camera's optical centre through the
   box centre.
3. **Ray duplicate.** A false positive ``p`` is a ray duplicate when some GT box ``g`` *of the same
   class in the same sample* and some camera ``k`` that sees ``g`` satisfy
   ``angle(p - c_k, g - c_k) <= max_angle_deg`` (3D angle at the optical centre ``c_k``) **and**
   ``| |p - c_k| - |g - c_k| | >= min_depth_gap`` (the wrong depth: further than the matching
   distance along the ray). A false positive sitting on top of an already matched GT (a plain
   duplicate at the right depth) is *not* a ray duplicate.

Reported: ``ray_duplicates`` (count), ``ray_duplicates_per_gt`` (count / GT boxes),
``ray_duplicate_fp_share`` (count / false positives), plus ``false_positives``, ``true_positives``
and ``gt_boxes`` with the thresholds used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from raydn.core.frames import camera_matrices, invert_rigid, pose_matrix
from raydn.errors import DataError
from raydn.eval.fast_eval import greedy_match_groups
from raydn.eval.submission import as_numpy
from raydn.geometry import CAMERA_NAMES, CLASS_NAMES


@dataclass(frozen=True)
class RayDuplicateConfig:
    score_threshold: float = 0.3
    match_dist: float = 2.0          # metres, BEV centre distance (nuScenes TP threshold)
    max_angle_deg: float = 2.0       # angular distance to the GT ray at the camera centre
    min_depth_gap: float = 2.0       # metres along the ray
    image_size: tuple = (900, 1600)  # (H, W) of the raw camera images the intrinsics refer to


def greedy_match_bev(gt_xy: np.ndarray, gt_label: np.ndarray, pred_xy: np.ndarray,
                     pred_label: np.ndarray, pred_score: np.ndarray, max_dist: float) -> np.ndarray:
    """One sample: predictions in descending score (stable) take the nearest free same-class GT
    closer than ``max_dist`` (BEV, metres; the devkit's strict ``<``) -- the evaluator's matcher
    :func:`raydn.eval.fast_eval.greedy_match_groups` with the class as the group. Returns (N_pred,)
    GT index or -1."""
    order = np.argsort(-np.asarray(pred_score, np.float64), kind="stable")
    return greedy_match_groups(gt_label, gt_xy, pred_label, pred_xy, order, (float(max_dist),))[:, 0]


def camera_geometry(info: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Official info record -> camera centres (6, 3) in the LiDAR frame and ``lidar2img`` (6, 4, 4)
    of the raw images (:func:`raydn.core.frames.camera_matrices` with no image transform)."""
    try:
        cams = [info["cams"][c] for c in CAMERA_NAMES]
        r_c2l = np.stack([np.asarray(c["sensor2lidar_rotation"], np.float64).reshape(3, 3) for c in cams])
        t_c2l = np.stack([np.asarray(c["sensor2lidar_translation"], np.float64).reshape(3) for c in cams])
        k = np.stack([np.asarray(c["cam_intrinsic"], np.float64).reshape(3, 3) for c in cams])
    except KeyError as e:
        raise DataError(f"info record {info.get('token', '?')}: missing camera field {e.args[0]!r}") from None
    _, lidar2img = camera_matrices(k, invert_rigid(pose_matrix(r_c2l, t_c2l)), np.eye(3))
    return t_c2l, lidar2img


def sample_ray_duplicates(pred_boxes: np.ndarray, pred_labels: np.ndarray, pred_scores: np.ndarray,
                          gt_boxes: np.ndarray, gt_labels: np.ndarray, info: Mapping,
                          cfg: RayDuplicateConfig = RayDuplicateConfig()) -> dict:
    """One sample (LiDAR frame boxes ``(n, >=3)`` centres first). Returns counts; the boolean
    masks ``is_fp`` / ``is_ray_duplicate`` and ``matched`` (the GT index each took, -1: none) over the
    predictions kept by the score threshold (``kept``, a mask over all ``n``); and
    ``gt_ray_duplicated`` (G,): the GT boxes with at least one ray duplicate."""
    keep = pred_scores >= cfg.score_threshold
    p, pl, ps = pred_boxes[keep, :3].astype(np.float64), pred_labels[keep], pred_scores[keep]
    g, gl = gt_boxes[:, :3].astype(np.float64), gt_labels
    matched = greedy_match_bev(g[:, :2], gl, p[:, :2], pl, ps, cfg.match_dist)
    is_fp = matched < 0
    is_dup = np.zeros(len(p), dtype=bool)
    gt_dup = np.zeros(len(g), dtype=bool)
    if is_fp.any() and len(g):
        centres, l2i = camera_geometry(info)                                # (6, 3), (6, 4, 4)
        # which cameras see each GT centre: project into every image
        uvw = np.einsum("kij,nj->nki", l2i[:, :3, :3], g) + l2i[None, :, :3, 3]  # (G, 6, 3)
        depth = uvw[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u, v = uvw[..., 0] / depth, uvw[..., 1] / depth
        H, W = cfg.image_size
        sees = (depth > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)       # (G, 6)
        fp = p[is_fp]
        dg = g[:, None, :] - centres[None]                                   # (G, 6, 3)
        dp = fp[:, None, :] - centres[None]                                  # (F, 6, 3)
        ng, npd = np.linalg.norm(dg, axis=-1), np.linalg.norm(dp, axis=-1)
        cos = np.einsum("gkc,fkc->fgk", dg, dp) / np.maximum(npd[:, None, :] * ng[None], 1e-9)
        angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))              # (F, G, 6)
        gap = np.abs(npd[:, None, :] - ng[None])
        same = pl[is_fp][:, None] == gl[None, :]                              # (F, G)
        hit = (angle <= cfg.max_angle_deg) & (gap >= cfg.min_depth_gap) & sees[None] & same[..., None]
        is_dup[np.flatnonzero(is_fp)] = hit.any(axis=(1, 2))
        gt_dup = hit.any(axis=(0, 2))
    return {"gt_boxes": int(len(g)), "true_positives": int((~is_fp).sum()),
            "false_positives": int(is_fp.sum()), "ray_duplicates": int(is_dup.sum()),
            "is_fp": is_fp, "is_ray_duplicate": is_dup, "matched": matched, "kept": keep,
            "gt_ray_duplicated": gt_dup}


def gt_of_info(info: Mapping, class_names: Sequence[str], with_index: bool = False):
    """The info record's GT boxes (G, 7) and labels (G,) of ``class_names`` (others dropped), and
    with ``with_index`` their row indices in ``gt_boxes`` (the sample's annotation order)."""
    boxes = np.asarray(info.get("gt_boxes", np.zeros((0, 7))), dtype=np.float64).reshape(-1, 7)
    names = np.asarray(info.get("gt_names", np.zeros(0, str))).reshape(-1).astype(str)
    if len(names) != len(boxes):
        raise DataError(f"info record {info.get('token', '?')}: gt_names has {len(names)} entries, "
                        f"gt_boxes {len(boxes)}")
    labels = np.full(len(names), -1, dtype=np.int64)
    for ci, c in enumerate(class_names):  # loop over classes
        labels[names == c] = ci
    keep = labels >= 0
    if with_index:
        return boxes[keep], labels[keep], np.flatnonzero(keep)
    return boxes[keep], labels[keep]


def ray_duplicates(detections: Sequence[Mapping], infos: Sequence[Mapping],
                   cfg: RayDuplicateConfig = RayDuplicateConfig(),
                   class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Duplicates along rays over a set of samples (see the module docstring).

    ``detections[i]`` for ``infos[i]``: ``boxes`` (n, 9) LiDAR frame, ``scores`` (n,), ``labels``
    (n,) into ``class_names`` (tensors or arrays); ``infos``: official info records (GT boxes in
    the LiDAR frame, camera calibration)."""
    if len(detections) != len(infos):
        raise DataError(f"{len(detections)} detection sets for {len(infos)} info records")
    tot = {"gt_boxes": 0, "true_positives": 0, "false_positives": 0, "ray_duplicates": 0}
    for det, info in zip(detections, infos):  # loop over samples; everything inside is vectorised
        b = as_numpy(det["boxes"], np.float64)
        b = b.reshape(len(b), -1) if b.size else np.zeros((0, 9))
        s = as_numpy(det["scores"], np.float64).reshape(-1)
        lb = as_numpy(det["labels"], np.int64).reshape(-1)
        gb, gl = gt_of_info(info, class_names)
        r = sample_ray_duplicates(b, lb, s, gb, gl, info, cfg)
        for k in tot:
            tot[k] += r[k]
    tot["ray_duplicates_per_gt"] = tot["ray_duplicates"] / max(tot["gt_boxes"], 1)
    tot["ray_duplicate_fp_share"] = tot["ray_duplicates"] / max(tot["false_positives"], 1)
    tot["config"] = asdict(cfg)
    return tot


def format_ray_duplicates(r: Mapping) -> str:
    c = r["config"]
    return (f"duplicates along rays (score >= {c['score_threshold']:g}, angle <= {c['max_angle_deg']:g} deg, "
            f"depth gap >= {c['min_depth_gap']:g} m): {r['ray_duplicates']} of {r['false_positives']} false "
            f"positives ({100 * r['ray_duplicate_fp_share']:.1f} %), {r['ray_duplicates_per_gt']:.3f} per GT box")
