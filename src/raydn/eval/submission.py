"""Decoded LiDAR-frame detections -> nuScenes submission (spec §9.2, mmdet3d v1.0.0rc6
``NuScenesDataset._format_bbox`` + ``output_to_nusc_box`` + ``lidar_nusc_box_to_global``).

Per box (all samples at once, float64 after reading the float32 network outputs):

1. centre = gravity centre (the decoded ``z`` is the box centre; pass ``z_is_bottom=True`` for
   bottom-centre boxes, then ``z + 0.5 h`` is formed in float32 like mmdet3d's ``gravity_center``);
   size ``(w, l, h)`` = dims ``[1, 0, 2]``; orientation ``Quaternion(axis=[0, 0, 1], radians=yaw)``;
   velocity ``(vx, vy, 0)`` (LiDAR frame).
2. LiDAR -> ego: rotate centre, velocity and orientation by ``lidar2ego_rotation``, translate by
   ``lidar2ego_translation``.
3. Drop the box if its ego BEV distance ``|(x, y)|`` exceeds the ``detection_cvpr_2019`` range of
   its class (``>``: a box exactly at the range is kept).
4. Ego -> global with ``ego2global_rotation`` / ``ego2global_translation``.
5. Attribute from the *global* velocity ``sqrt(vx^2 + vy^2) > 0.2`` m/s: moving vehicles
   (car, construction_vehicle, bus, truck, trailer) ``vehicle.moving``, bicycle/motorcycle
   ``cycle.with_rider``; slow pedestrians ``pedestrian.standing``, slow buses ``vehicle.stopped``;
   otherwise mmdet3d's ``DefaultAttribute``.

Records: ``sample_token, translation, size, rotation (w, x, y, z), velocity (vx, vy),
detection_name, detection_score, attribute_name``; ``meta`` = camera-only, external data.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from raydn.core.frames import lidar_boxes_to_global, quat_to_matrix, quat_yaw, rotate_vectors
from raydn.errors import DataError
from raydn.eval.constants import ATTRIBUTE_NAMES, CLASS_RANGE, DEFAULT_ATTRIBUTE, DETECTION_NAMES, SUBMISSION_META
from raydn.eval.fast_eval import EvalArrays
from raydn.geometry import CLASS_NAMES
from raydn.io import atomic_write_json

_ATTR_TO_INDEX = {n: i for i, n in enumerate(ATTRIBUTE_NAMES)}
_DET_TO_LABEL = {n: i for i, n in enumerate(DETECTION_NAMES)}
_MOVING_VEHICLES = ("car", "construction_vehicle", "bus", "truck", "trailer")


def attribute_table() -> tuple[np.ndarray, np.ndarray]:
    """(moving, slow) attribute per class of :data:`DETECTION_NAMES`, as indices into
    :data:`ATTRIBUTE_NAMES` (-1 = '')."""
    def idx(a):
        return _ATTR_TO_INDEX[a] if a else -1
    moving, slow = [], []
    for c in DETECTION_NAMES:
        if c in _MOVING_VEHICLES:
            moving.append(idx("vehicle.moving"))
        elif c in ("bicycle", "motorcycle"):
            moving.append(idx("cycle.with_rider"))
        else:
            moving.append(idx(DEFAULT_ATTRIBUTE[c]))
        if c == "pedestrian":
            slow.append(idx("pedestrian.standing"))
        elif c == "bus":
            slow.append(idx("vehicle.stopped"))
        else:
            slow.append(idx(DEFAULT_ATTRIBUTE[c]))
    return np.array(moving, dtype=np.int64), np.array(slow, dtype=np.int64)


@dataclass
class GlobalDetections:
    """Detections of many samples in the global frame, as columns (N boxes, S samples).

    ``sample_idx`` (N,) into ``sample_tokens``; ``translation`` (N, 3) m; ``size`` (N, 3) ``w, l, h``;
    ``rotation`` (N, 4) ``w, x, y, z``; ``velocity`` (N, 2) m/s; ``label`` (N,) index into
    :data:`DETECTION_NAMES`; ``score`` (N,); ``attribute`` (N,) index into ``ATTRIBUTE_NAMES``
    (-1 = ''); ``ego_translation`` (S, 3) ego position of each sample (for ego distances)."""

    sample_tokens: tuple[str, ...]
    sample_idx: np.ndarray
    translation: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    velocity: np.ndarray
    label: np.ndarray
    score: np.ndarray
    attribute: np.ndarray
    ego_translation: np.ndarray

    def to_eval_arrays(self) -> EvalArrays:
        """The predictions for :func:`raydn.eval.fast_eval.evaluate` (ego distance as the devkit's
        ``add_center_dist``: global centre minus the sample's ego position)."""
        d = self.translation[:, :2] - self.ego_translation[self.sample_idx, :2]
        n = len(self.sample_idx)
        return EvalArrays(self.sample_tokens, self.sample_idx, self.translation, self.size,
                          quat_yaw(self.rotation) if n else np.zeros(0), self.velocity, self.label,
                          self.score, self.attribute, np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2),
                          np.full(n, -1, dtype=np.int64))


def as_numpy(x, dtype) -> np.ndarray:
    """A tensor (any device) or array-like -> numpy array of ``dtype``."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _get(det: Mapping, keys: Sequence[str], i: int):
    for k in keys:
        if k in det:
            return det[k]
    raise DataError(f"detections[{i}]: missing field {keys[0]!r} (or {', '.join(keys[1:])})")


def detections_to_global(detections: Sequence[Mapping], infos: Sequence[Mapping], *,
                         class_names: Sequence[str] = CLASS_NAMES,
                         class_range: Mapping[str, float] = CLASS_RANGE,
                         z_is_bottom: bool = False) -> GlobalDetections:
    """Vectorised spec §9.2 conversion of decoded detections.

    ``detections[i]`` (sample ``infos[i]``): ``boxes`` (n, 9) LiDAR ``[x, y, z, l, w, h, yaw, vx, vy]``
    (float32 as decoded; ``z`` = centre unless ``z_is_bottom``), ``scores`` (n,), ``labels`` (n,)
    indices into ``class_names`` (mmdet3d keys ``boxes_3d``/``scores_3d``/``labels_3d`` work too).
    ``infos[i]``: ``token``, ``lidar2ego_translation/rotation``, ``ego2global_translation/rotation``.
    Boxes beyond their class range (ego BEV) are dropped; everything else is kept in order.
    """
    if len(detections) != len(infos):
        raise DataError(f"{len(detections)} detection sets for {len(infos)} info records")
    lut = np.array([_DET_TO_LABEL.get(c, -1) for c in class_names], dtype=np.int64)
    tokens, boxes, scores, labels, sidx = [], [], [], [], []
    l2e_t, l2e_q, e2g_t, e2g_q = [], [], [], []
    for i, (det, info) in enumerate(zip(detections, infos)):
        try:
            tokens.append(str(info["token"]))
            l2e_t.append(info["lidar2ego_translation"]), l2e_q.append(info["lidar2ego_rotation"])
            e2g_t.append(info["ego2global_translation"]), e2g_q.append(info["ego2global_rotation"])
        except KeyError as e:
            raise DataError(f"info record {i}: missing field {e.args[0]!r}") from None
        b = as_numpy(_get(det, ("boxes", "boxes_3d", "bboxes"), i), np.float32)
        if b.ndim != 2 or b.shape[1] < 9:
            raise DataError(f"detections[{i}].boxes: expected (n, 9) [x, y, z, l, w, h, yaw, vx, vy], got {b.shape}")
        s = as_numpy(_get(det, ("scores", "scores_3d"), i), np.float32).reshape(-1)
        lb = as_numpy(_get(det, ("labels", "labels_3d"), i), np.int64).reshape(-1)
        if not (s.shape[0] == lb.shape[0] == b.shape[0]):
            raise DataError(f"detections[{i}]: boxes {b.shape[0]}, scores {s.shape[0]}, labels {lb.shape[0]}")
        boxes.append(b[:, :9]), scores.append(s), labels.append(lb)
        sidx.append(np.full(b.shape[0], i, dtype=np.int64))
    n_s = len(tokens)
    b = np.concatenate(boxes) if n_s else np.zeros((0, 9), np.float32)
    score32 = np.concatenate(scores) if n_s else np.zeros(0, np.float32)
    lab = np.concatenate(labels) if n_s else np.zeros(0, np.int64)
    sidx = np.concatenate(sidx) if n_s else np.zeros(0, np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
        raise DataError(f"detections: labels must index class_names ({len(class_names)} classes)")
    det_label = lut[lab]
    if (det_label < 0).any():
        raise DataError(f"detections: class {class_names[int(lab[det_label < 0][0])]!r} is not a nuScenes detection class")
    l2e_t = np.asarray(l2e_t, dtype=np.float64).reshape(n_s, 3)
    l2e_q = np.asarray(l2e_q, dtype=np.float64).reshape(n_s, 4)
    e2g_t = np.asarray(e2g_t, dtype=np.float64).reshape(n_s, 3)
    e2g_q = np.asarray(e2g_q, dtype=np.float64).reshape(n_s, 4)

    z = b[:, 2] + b[:, 5] * np.float32(0.5) if z_is_bottom else b[:, 2]      # float32, as mmdet3d
    centre = np.stack([b[:, 0], b[:, 1], z], 1).astype(np.float64)
    wlh = b[:, [4, 3, 5]].astype(np.float64)
    yaw = b[:, 6].astype(np.float64)
    vel = np.c_[b[:, 7:9].astype(np.float64), np.zeros(len(b))]

    # LiDAR -> ego, class-range filter in ego BEV, then -> global (Box.rotate / translate order).
    r_l2e = quat_to_matrix(l2e_q)[sidx]
    c_ego = rotate_vectors(r_l2e, centre) + l2e_t[sidx]
    rng = np.array([float(class_range[c]) for c in DETECTION_NAMES])[det_label]
    keep = ~(np.sqrt(c_ego[:, 0] ** 2 + c_ego[:, 1] ** 2) > rng)
    sidx, det_label, score32 = sidx[keep], det_label[keep], score32[keep]
    c_g, q_g, v_g = lidar_boxes_to_global(centre[keep], yaw[keep], vel[keep], sidx,
                                          l2e_t, l2e_q, e2g_t, e2g_q)
    moving_attr, slow_attr = attribute_table()
    speed = np.sqrt(v_g[:, 0] ** 2 + v_g[:, 1] ** 2)
    attr = np.where(speed > 0.2, moving_attr[det_label], slow_attr[det_label])
    return GlobalDetections(tuple(tokens), sidx, c_g, wlh[keep], q_g, v_g[:, :2], det_label,
                            score32.astype(np.float64), attr, e2g_t)


def to_records(dets: GlobalDetections) -> dict[str, list[dict]]:
    """Submission ``results``: sample token -> list of records (every sample present, possibly
    with an empty list; boxes in their original order)."""
    results: dict[str, list[dict]] = {t: [] for t in dets.sample_tokens}
    names = [DETECTION_NAMES[i] for i in dets.label.tolist()]
    attrs = [ATTRIBUTE_NAMES[i] if i >= 0 else "" for i in dets.attribute.tolist()]
    for s, t, sz, r, v, n, sc, a in zip(dets.sample_idx.tolist(), dets.translation.tolist(),
                                         dets.size.tolist(), dets.rotation.tolist(),
                                         dets.velocity.tolist(), names, dets.score.tolist(), attrs):
        tok = dets.sample_tokens[s]
        results[tok].append({"sample_token": tok, "translation": t, "size": sz, "rotation": r,
                             "velocity": v, "detection_name": n, "detection_score": sc,
                             "attribute_name": a})
    return results


def build_submission(detections: Sequence[Mapping], infos: Sequence[Mapping], **kwargs) -> dict[str, list[dict]]:
    """Decoded detections + info records -> submission ``results`` dict (spec §9.2).
    Keyword arguments go to :func:`detections_to_global`."""
    return to_records(detections_to_global(detections, infos, **kwargs))


def write_results_json(path: str | os.PathLike, results: Mapping[str, list], meta: Mapping | None = None) -> str:
    """Write ``{"meta": meta, "results": results}`` atomically (temp file + ``os.replace``).
    ``meta`` defaults to the official camera-only block. Returns the path."""
    atomic_write_json(path, {"meta": dict(SUBMISSION_META if meta is None else meta), "results": results})
    return os.fspath(path)


def load_results_arrays(result_path: str | os.PathLike, ego_translation: Mapping[str, Sequence[float]],
                        max_boxes_per_sample: int = 500) -> EvalArrays:
    """A submission JSON -> prediction :class:`EvalArrays` (file order kept: it is the devkit's
    tie-break order). ``ego_translation``: ego position (global) of each sample, e.g. from
    :func:`raydn.eval.gt.gt_from_nusc` or :func:`raydn.eval.gt.gt_from_infos`."""
    try:
        with open(result_path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{result_path}: cannot read a results JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise DataError(f"{result_path}: expected an object with a 'results' dict (and 'meta')")
    return results_to_arrays(data["results"], ego_translation, max_boxes_per_sample, str(result_path))


def results_to_arrays(results: Mapping[str, list], ego_translation: Mapping[str, Sequence[float]],
                      max_boxes_per_sample: int = 500, where: str = "results") -> EvalArrays:
    """Submission ``results`` dict -> prediction :class:`EvalArrays` (see :func:`load_results_arrays`)."""
    tokens = list(results.keys())
    sidx, trans, size, rot, vel, names, score, attrs = ([] for _ in range(8))
    for i, tok in enumerate(tokens):
        recs = results[tok]
        if len(recs) > max_boxes_per_sample:
            raise DataError(f"{where}: sample {tok!r} has {len(recs)} boxes, at most "
                            f"{max_boxes_per_sample} allowed")
        for r in recs:
            try:
                sidx.append(i), trans.append(r["translation"]), size.append(r["size"])
                rot.append(r["rotation"]), vel.append(r["velocity"]), names.append(r["detection_name"])
                score.append(float(r.get("detection_score", -1.0))), attrs.append(r["attribute_name"])
            except KeyError as e:
                raise DataError(f"{where}: a record of sample {tok!r} lacks field {e.args[0]!r}") from None
    missing = [t for t in tokens if t not in ego_translation]
    if missing:
        raise DataError(f"{where}: no ego pose for samples {missing[:3]} (not in the evaluated split?)")
    n = len(sidx)
    sidx = np.asarray(sidx, dtype=np.int64)
    trans = np.asarray(trans, dtype=np.float64).reshape(n, 3)
    ego = np.asarray([ego_translation[t] for t in tokens], dtype=np.float64).reshape(len(tokens), 3)
    ex = trans[:, 0] - ego[sidx, 0]
    ey = trans[:, 1] - ego[sidx, 1]
    rot = np.asarray(rot, dtype=np.float64).reshape(n, 4)
    return EvalArrays.build(tokens, sidx, trans, np.asarray(size, dtype=np.float64).reshape(n, 3),
                            quat_yaw(rot) if n else np.zeros(0),
                            np.asarray(vel, dtype=np.float64).reshape(n, 2), names=names, score=score,
                            attribute_names=attrs, ego_dist=np.sqrt(ex ** 2 + ey ** 2))


__all__ = ["GlobalDetections", "attribute_table", "build_submission", "detections_to_global",
           "load_results_arrays", "results_to_arrays", "to_records", "write_results_json"]
