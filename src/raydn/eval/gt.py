"""Ground truth (and devkit objects) as :class:`~raydn.eval.fast_eval.EvalArrays`.

Three sources:

* :func:`gt_from_infos` — our info records (``nuscenes2d_temporal_infos_*.pkl`` fields; GT in the
  LiDAR frame, converted to global with the info's lidar2ego and ego2global). No devkit needed;
  used during training.
* :func:`gt_from_nusc` — the devkit's ``load_gt`` on a dataroot (exactly the boxes the devkit
  evaluates), with the ego distances of ``add_center_dist`` and the bike racks of the split.
* :func:`arrays_from_evalboxes` — any devkit ``EvalBoxes`` (GT or predictions).

Loading loops over records once; the metric itself works on the arrays.
"""
from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np

from raydn.core.frames import lidar_boxes_to_global, quat_yaw
from raydn.errors import DataError
from raydn.eval.constants import (
    ATTRIBUTE_NAMES,
    BIKE_RACK_CATEGORY,
    CATEGORY_TO_DETECTION,
    DETECTION_NAMES,
)
from raydn.eval.fast_eval import BikeRacks, EvalArrays

_NAME_TO_LABEL = {n: i for i, n in enumerate(DETECTION_NAMES)}
_ATTR_TO_INDEX = {n: i for i, n in enumerate(ATTRIBUTE_NAMES)}


# ----------------------------------------------------------------------------------------------
# Devkit objects
# ----------------------------------------------------------------------------------------------

def arrays_from_evalboxes(boxes, sample_tokens: Sequence[str] | None = None) -> EvalArrays:
    """Devkit ``EvalBoxes`` of ``DetectionBox`` -> :class:`EvalArrays`, keeping the devkit's order
    (samples in ``boxes.sample_tokens`` order unless ``sample_tokens`` is given, boxes in list
    order). ``ego_dist`` comes from each box's ``ego_translation`` (set by ``add_center_dist``)."""
    tokens = tuple(boxes.sample_tokens) if sample_tokens is None else tuple(sample_tokens)
    index = {t: i for i, t in enumerate(tokens)}
    sidx, trans, size, rot, vel, lab, score, attr, ego, npts = ([] for _ in range(10))
    for tok in boxes.sample_tokens:
        if tok not in index:
            raise DataError(f"EvalBoxes sample {tok!r} is not in the given sample_tokens")
        for b in boxes[tok]:
            sidx.append(index[tok])
            trans.append(b.translation)
            size.append(b.size)
            rot.append(b.rotation)
            vel.append(b.velocity)
            lab.append(_NAME_TO_LABEL[b.detection_name])
            score.append(b.detection_score)
            attr.append(_ATTR_TO_INDEX[b.attribute_name] if b.attribute_name else -1)
            ego.append(b.ego_translation)
            npts.append(b.num_pts)
    n = len(sidx)
    ego = np.asarray(ego, dtype=np.float64).reshape(n, 3)
    rot = np.asarray(rot, dtype=np.float64).reshape(n, 4)
    return EvalArrays(tokens, np.asarray(sidx, dtype=np.int64), np.asarray(trans).reshape(n, 3),
                      np.asarray(size).reshape(n, 3), quat_yaw(rot) if n else np.zeros(0),
                      np.asarray(vel, dtype=np.float64).reshape(n, 2), lab, score, attr,
                      np.sqrt(ego[:, 0] ** 2 + ego[:, 1] ** 2), npts)


# ----------------------------------------------------------------------------------------------
# Dataroot through the devkit
# ----------------------------------------------------------------------------------------------

def ego_translations_from_nusc(nusc, sample_tokens: Sequence[str]) -> dict[str, np.ndarray]:
    """Ego position (global, metres) at each sample's LIDAR_TOP keyframe (``add_center_dist``)."""
    out = {}
    for tok in sample_tokens:
        sd = nusc.get("sample_data", nusc.get("sample", tok)["data"]["LIDAR_TOP"])
        out[tok] = np.asarray(nusc.get("ego_pose", sd["ego_pose_token"])["translation"], dtype=np.float64)
    return out


def racks_from_nusc(nusc, sample_tokens: Sequence[str]) -> BikeRacks:
    """Bike-rack annotations of the given samples (global frame)."""
    toks, trans, size, rot = [], [], [], []
    for tok in sample_tokens:
        for ann in nusc.get("sample", tok)["anns"]:
            rec = nusc.get("sample_annotation", ann)
            if rec["category_name"] == BIKE_RACK_CATEGORY:
                toks.append(tok), trans.append(rec["translation"]), size.append(rec["size"])
                rot.append(rec["rotation"])
    return BikeRacks(toks, np.asarray(trans), np.asarray(size), np.asarray(rot))


def gt_from_nusc(nusc, eval_set: str) -> tuple[EvalArrays, BikeRacks, dict[str, np.ndarray]]:
    """GT of a split exactly as the devkit loads it (``load_gt`` for predefined splits, else the
    custom-split loader), as arrays with ``add_center_dist`` ego distances.

    Returns (gt, bike racks, ego translation per sample token)."""
    from nuscenes.eval.common.loaders import (  # optional: raydn[nuscenes]
        get_samples_of_custom_split,
        load_gt,
        load_gt_of_sample_tokens,
    )
    from nuscenes.eval.detection.data_classes import (
        DetectionBox,  # optional: raydn[nuscenes]
    )
    from nuscenes.utils.splits import is_predefined_split  # optional: raydn[nuscenes]

    with contextlib.redirect_stderr(io.StringIO()):  # the devkit's tqdm bar ignores verbose=False
        if is_predefined_split(split_name=eval_set):
            boxes = load_gt(nusc, eval_set, DetectionBox, verbose=False)
        else:
            tokens = get_samples_of_custom_split(split_name=eval_set, nusc=nusc)
            boxes = load_gt_of_sample_tokens(nusc, tokens, DetectionBox, verbose=False)
    tokens = list(boxes.sample_tokens)
    ego = ego_translations_from_nusc(nusc, tokens)
    for tok in tokens:
        p = ego[tok]
        for b in boxes[tok]:
            b.ego_translation = (b.translation[0] - p[0], b.translation[1] - p[1], b.translation[2] - p[2])
    return arrays_from_evalboxes(boxes), racks_from_nusc(nusc, tokens), ego


# ----------------------------------------------------------------------------------------------
# Info records (no devkit)
# ----------------------------------------------------------------------------------------------

def _info_field(info: Mapping, key: str, i: int):
    try:
        return info[key]
    except KeyError:
        raise DataError(f"info record {i} ({info.get('token', '?')}): missing field {key!r}") from None


def gt_from_infos(infos: Sequence[Mapping]) -> tuple[EvalArrays, BikeRacks, dict[str, np.ndarray]]:
    """GT of info records (official ``nuscenes2d_temporal_infos_*.pkl`` layout) in the global frame.

    Per info: ``token``, ``lidar2ego_translation/rotation``, ``ego2global_translation/rotation``
    (quaternions ``w, x, y, z``), ``gt_boxes`` (n, 7) LiDAR ``[x, y, z_center, l, w, h, yaw]``,
    ``gt_names`` (n,) (mapped names; other names are ignored, ``static_object.bicycle_rack`` boxes
    become bike racks), ``gt_velocity`` (n, 2) LiDAR frame (may be NaN), ``num_lidar_pts`` and
    ``num_radar_pts`` (n,). Optional ``gt_attribute_names`` (n,) strings; without it every GT
    attribute is '' and the attribute error is NaN (mAAE = 1), since the official infos do not
    store attributes.

    Conversions: centre ``R_e2g (R_l2e c + t_l2e) + t_e2g``; rotation ``q_e2g * q_l2e * q(yaw)``;
    velocity ``(vx, vy, 0)`` rotated the same way, keep x, y (the infos dropped the vertical
    component, so this equals the devkit's GT velocity up to that component); ``w, l, h`` =
    ``gt_boxes[:, [4, 3, 5]]``; ``ego_dist`` from the centre minus ``ego2global_translation``
    (the LIDAR_TOP keyframe pose, as ``add_center_dist``).
    Returns (gt, bike racks, ego translation per sample token).
    """
    tokens = []
    cols = {k: [] for k in ("sidx", "box", "name", "vel", "npts", "attr")}
    l2e_t, l2e_q, e2g_t, e2g_q = [], [], [], []
    for i, info in enumerate(infos):
        tokens.append(str(_info_field(info, "token", i)))
        l2e_t.append(_info_field(info, "lidar2ego_translation", i))
        l2e_q.append(_info_field(info, "lidar2ego_rotation", i))
        e2g_t.append(_info_field(info, "ego2global_translation", i))
        e2g_q.append(_info_field(info, "ego2global_rotation", i))
        boxes = np.asarray(_info_field(info, "gt_boxes", i), dtype=np.float64).reshape(-1, 7)
        n = boxes.shape[0]
        names = np.asarray(_info_field(info, "gt_names", i)).reshape(-1).astype(str)
        if names.shape[0] != n:
            raise DataError(f"info record {i}: gt_names has {names.shape[0]} entries, gt_boxes {n}")
        cols["sidx"].append(np.full(n, i, dtype=np.int64))
        cols["box"].append(boxes)
        cols["name"].append(names)
        cols["vel"].append(np.asarray(info.get("gt_velocity", np.full((n, 2), np.nan)),
                                      dtype=np.float64).reshape(n, 2))
        cols["npts"].append(np.asarray(_info_field(info, "num_lidar_pts", i), dtype=np.int64).reshape(n)
                            + np.asarray(_info_field(info, "num_radar_pts", i), dtype=np.int64).reshape(n))
        attrs = info.get("gt_attribute_names")
        cols["attr"].append(np.asarray([""] * n if attrs is None else attrs, dtype=object).reshape(n))
    s = len(tokens)
    sidx = np.concatenate(cols["sidx"]) if s else np.zeros(0, np.int64)
    box = np.concatenate(cols["box"]) if s else np.zeros((0, 7))
    names = np.concatenate(cols["name"]) if s else np.zeros(0, str)
    vel = np.concatenate(cols["vel"]) if s else np.zeros((0, 2))
    npts = np.concatenate(cols["npts"]) if s else np.zeros(0, np.int64)
    attrs = np.concatenate(cols["attr"]) if s else np.zeros(0, object)
    l2e_t = np.asarray(l2e_t, dtype=np.float64).reshape(s, 3)
    e2g_t = np.asarray(e2g_t, dtype=np.float64).reshape(s, 3)
    l2e_q = np.asarray(l2e_q, dtype=np.float64).reshape(s, 4)
    e2g_q = np.asarray(e2g_q, dtype=np.float64).reshape(s, 4)

    centre, quat, vel_g = lidar_boxes_to_global(box[:, :3], box[:, 6], np.c_[vel, np.zeros(len(vel))],
                                                sidx, l2e_t, l2e_q, e2g_t, e2g_q)
    wlh = box[:, [4, 3, 5]]
    label = np.array([_NAME_TO_LABEL.get(CATEGORY_TO_DETECTION.get(n, n), -1) for n in names], dtype=np.int64)
    is_rack = names == BIKE_RACK_CATEGORY
    racks = BikeRacks([tokens[k] for k in sidx[is_rack]], centre[is_rack], wlh[is_rack], quat[is_rack])
    keep = label >= 0
    try:
        attr = np.array([_ATTR_TO_INDEX[a] if a else -1 for a in attrs[keep]], dtype=np.int64)
    except KeyError as e:
        raise DataError(f"info gt_attribute_names: unknown attribute {e.args[0]!r}") from None
    ego_xy = centre[keep, :2] - e2g_t[sidx[keep], :2]
    gt = EvalArrays(tuple(tokens), sidx[keep], centre[keep], wlh[keep], quat_yaw(quat[keep]),
                    vel_g[keep, :2], label[keep], np.full(int(keep.sum()), -1.0), attr,
                    np.sqrt(ego_xy[:, 0] ** 2 + ego_xy[:, 1] ** 2), npts[keep])
    return gt, racks, {t: e2g_t[k] for k, t in enumerate(tokens)}
