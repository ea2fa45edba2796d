"""The nuScenes tracking submission and the official tracking metric (``raydn eval --tracking``).

Format (nuScenes tracking, ``tracking_nips_2019``): ``{"meta": {...}, "results": {sample_token:
[record]}}``, every sample of the evaluated split listed, at most 500 records per sample; a record
has ``sample_token``, ``translation`` (3, global frame, m), ``size`` (3, w l h > 0), ``rotation``
(4, quaternion w x y z), ``velocity`` (2, m/s, global), ``tracking_id`` (a string: one id per track
across the samples of a scene), ``tracking_name`` (one of the seven tracking classes,
:data:`raydn.eval.constants.TRACKING_NAMES`) and ``tracking_score`` (in [0, 1]).

The boxes come from the detection submission's conversion (:func:`raydn.eval.submission.
detections_to_global`, ONE home for LiDAR -> ego -> global), without its class-range filter (the
devkit's tracking evaluation applies the same ranges to the tracks itself); the track ids from a
tracker of :mod:`raydn.engine.tracking`, run per stream in time order
(:func:`raydn.engine.tracking.track_detections`, which writes the file with
:func:`raydn.engine.tracking.write_tracking_submission`). Detections of the other three classes, and
detections the tracker does not report, are left out. This module holds the format
(:func:`build_tracking_submission`, :func:`stream_flags`), its checks and the metric: no tracker.

Scoring: nuscenes-devkit's ``TrackingEval`` (AMOTA, AMOTP, MOTA, recall, IDS, FRAG, ...); it needs
``motmetrics`` and ``pandas`` (``pip install 'raydn[tracking]'``).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from raydn.errors import DataError
from raydn.geometry import CLASS_NAMES
from raydn.eval.constants import DETECTION_NAMES, TRACKING_NAMES
from raydn.eval.ray_duplicates import (  # one matcher for ray duplicates and ID switches along rays
    RayDuplicateConfig,
    greedy_match_bev,
    gt_of_info,
    sample_ray_duplicates,
)
from raydn.eval.submission import as_numpy
from raydn.eval.validate_submission import check_box_fields, validate_submission
from raydn.io import atomic_write_json

__all__ = ["build_tracking_submission", "stream_flags", "check_tracking_record",
           "validate_tracking_submission", "run_tracking_eval", "format_tracking_summary",
           "annotation_instances", "id_switches_along_rays"]

_TRACKED = np.array([n in TRACKING_NAMES for n in DETECTION_NAMES])


def build_tracking_submission(g, ids: np.ndarray) -> dict[str, list[dict]]:
    """``results`` of the tracking submission from the output of
    :func:`raydn.engine.tracking.track_detections` (``g``, ``ids``): tracked
    boxes of the seven tracking classes, every sample present, highest scores first, at most 500
    per sample."""
    results: dict[str, list[dict]] = {t: [] for t in g.sample_tokens}
    keep = (ids >= 0) & _TRACKED[g.label]
    order = np.lexsort((-g.score[keep], g.sample_idx[keep]))
    rows = np.flatnonzero(keep)[order]
    for r in rows.tolist():  # serialisation is per record by nature
        tok = g.sample_tokens[int(g.sample_idx[r])]
        if len(results[tok]) >= 500:
            continue
        results[tok].append({
            "sample_token": tok, "translation": g.translation[r].tolist(), "size": g.size[r].tolist(),
            "rotation": g.rotation[r].tolist(), "velocity": g.velocity[r].tolist(),
            "tracking_id": str(int(ids[r])), "tracking_name": DETECTION_NAMES[int(g.label[r])],
            "tracking_score": float(min(1.0, max(0.0, g.score[r])))})
    return results


def stream_flags(detections: Sequence[Mapping], infos: Sequence[Mapping]) -> tuple[list[float], list[bool]]:
    """Per frame: timestamp (seconds, from the info's ``timestamp`` in microseconds) and whether
    a new sequence starts there (the detection's ``new_sequence`` from ``stream_inference(...,
    with_selection=True)`` where present, else a change of ``scene_token``)."""
    ts, new, prev_scene = [], [], object()
    for i, (det, info) in enumerate(zip(detections, infos)):
        if "timestamp" not in info:
            raise DataError(f"info record {i}: missing field 'timestamp' (tracking needs the frame times)")
        ts.append(float(info["timestamp"]) * 1e-6)
        scene = info.get("scene_token")
        new.append(bool(det["new_sequence"]) if "new_sequence" in det else (i == 0 or scene != prev_scene))
        prev_scene = scene
    return ts, new


def check_tracking_record(where: str, token: str, rec) -> None:
    """One tracking record (see the module docstring); raises :class:`DataError`."""
    check_box_fields(where, token, rec, ("tracking_id", "tracking_name", "tracking_score"))
    tid = rec["tracking_id"]
    if not isinstance(tid, str) or not tid:
        raise DataError(f"{where}: field 'tracking_id' is {tid!r}; expected a non-empty string")
    name = rec["tracking_name"]
    if name not in TRACKING_NAMES:
        raise DataError(f"{where}: field 'tracking_name' is {name!r}; expected one of {', '.join(TRACKING_NAMES)}")
    score = rec["tracking_score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not (0.0 <= float(score) <= 1.0):
        raise DataError(f"{where}: field 'tracking_score' is {score!r}; expected a number in [0, 1]")


def validate_tracking_submission(path: str | os.PathLike, sample_tokens: Collection[str],
                                 ego_translation: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Read and check the tracking submission at ``path`` against the evaluated split's
    ``sample_tokens`` (same file-level rules and messages as
    :func:`raydn.eval.validate_submission.validate_submission`: file size, JSON, ``meta``, every
    sample, <= 500 boxes, global frame). Returns the parsed JSON."""
    return validate_submission(path, sample_tokens, ego_translation=ego_translation,
                               check=check_tracking_record, kind="tracking submission", items="tracks")


#: The summary numbers printed (devkit ``metrics_summary.json`` keys).
SUMMARY_KEYS = ("amota", "amotp", "recall", "motar", "mota", "motp", "ids", "frag", "tp", "fp", "fn")


def run_tracking_eval(result_path: str | os.PathLike, dataroot: str | os.PathLike, version: str,
                      eval_set: str, out_dir: str | os.PathLike, *, nusc=None, quiet: bool = False,
                      config_name: str = "tracking_nips_2019") -> dict:
    """Score a tracking submission with nuscenes-devkit's ``TrackingEval``; writes
    ``tracking_metrics_summary.json`` / ``tracking_metrics_details.json`` into ``out_dir``
    (atomically). The file is checked first (:func:`validate_tracking_submission`). Returns the
    devkit's summary dict (``amota``, ``amotp``, ``mota``, ``recall``, ``ids``, ``frag``,
    ``label_metrics``, ...)."""
    try:
        from nuscenes import NuScenes  # optional: raydn[nuscenes]
        from nuscenes.eval.common.config import (
            config_factory,  # optional: raydn[nuscenes]
        )
        from nuscenes.eval.tracking.evaluate import (
            TrackingEval,  # optional: raydn[nuscenes]
        )
        from nuscenes.utils.splits import (
            create_splits_scenes,  # optional: raydn[nuscenes]
        )
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(f"the tracking metric needs nuscenes-devkit, motmetrics and pandas ({e}); "
                        "pip install 'raydn[nuscenes,tracking]'") from None

    result_path, out_dir = os.fspath(result_path), os.fspath(out_dir)
    if nusc is None:
        if not os.path.isdir(os.path.join(os.fspath(dataroot), version)):
            raise DataError(f"{dataroot}: no nuScenes tables for version {version!r}")
        nusc = NuScenes(version=version, dataroot=os.fspath(dataroot), verbose=False)
    scenes = set(create_splits_scenes().get(eval_set, ()))
    tokens, ego = [], {}
    for s in nusc.sample:  # the split's samples and their ego positions (frame check)
        if nusc.get("scene", s["scene_token"])["name"] in scenes:
            tokens.append(s["token"])
            sd = nusc.get("sample_data", s["data"]["LIDAR_TOP"])
            ego[s["token"]] = nusc.get("ego_pose", sd["ego_pose_token"])["translation"]
    validate_tracking_submission(result_path, tokens, ego)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tracking-eval-") as tmp:
        try:
            ev = TrackingEval(config=config_factory(config_name), result_path=result_path,
                              eval_set=eval_set, output_dir=tmp, nusc_version=version,
                              nusc_dataroot=os.fspath(dataroot), verbose=False)
        except (AssertionError, KeyError, ValueError) as e:
            raise DataError(f"{result_path}: rejected by the nuScenes devkit: {e}") from None
        summary = ev.main(render_curves=False)
        details = json.loads(Path(tmp, "metrics_details.json").read_text())
    atomic_write_json(os.path.join(out_dir, "tracking_metrics_summary.json"), summary, indent=2)
    atomic_write_json(os.path.join(out_dir, "tracking_metrics_details.json"), details, indent=2)
    if not quiet:
        print(format_tracking_summary(summary))
    return summary


def format_tracking_summary(summary: Mapping) -> str:
    """One line per summary number, then AMOTA per class."""
    lines = [f"{k.upper():7s} {summary[k]:.4f}" if isinstance(summary.get(k), float) else f"{k.upper():7s} {summary.get(k)}"
             for k in SUMMARY_KEYS if k in summary]
    per = summary.get("label_metrics", {}).get("amota", {})
    if per:
        lines.append("AMOTA per class: " + ", ".join(f"{c} {v:.3f}" for c, v in per.items()))
    return "\n".join(lines)


# ----------------------------------------------- ID switches of objects with duplicates along rays

def annotation_instances(dataroot: str | os.PathLike, version: str) -> dict[str, list[str]]:
    """Sample token -> the instance token (the ground-truth track) of each of its annotations, in
    the order of the info records' ``gt_boxes`` (``raydn prepare`` follows the devkit's
    ``sample['anns']``, which is ``sample_annotation.json``'s order). Reads the table directly: no
    devkit needed."""
    path = Path(dataroot, version, "sample_annotation.json")
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (the nuScenes tables of {version!r} under {dataroot})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    out: dict[str, list[str]] = {}
    for i, r in enumerate(rows):  # one pass over the table
        try:
            out.setdefault(r["sample_token"], []).append(r["instance_token"])
        except (KeyError, TypeError):
            raise DataError(f"{path}: row {i} lacks 'sample_token' / 'instance_token'") from None
    return out


def _clear_mot_match(gt_xy: np.ndarray, gt_label: np.ndarray, gt_prev: Sequence[int], pred_xy: np.ndarray,
                     pred_label: np.ndarray, pred_score: np.ndarray, pred_track: np.ndarray,
                     max_dist: float) -> np.ndarray:
    """One frame's GT -> prediction correspondence, CLEAR MOT style (Bernardin & Stiefelhagen 2008):
    first each GT box keeps its previous track (``gt_prev``, -2: none) when a prediction of that
    track and of its class lies within ``max_dist`` (BEV, strict <; the nearest such); then the free
    predictions take the free GT boxes greedily in descending score
    (:func:`raydn.eval.ray_duplicates.greedy_match_bev`). Returns (G,) prediction index, -1: none."""
    n_g, n_p = len(gt_xy), len(pred_xy)
    match = np.full(n_g, -1, dtype=np.int64)
    if n_g == 0 or n_p == 0:
        return match
    d = np.linalg.norm(np.asarray(gt_xy, np.float64)[:, None] - np.asarray(pred_xy, np.float64)[None], axis=-1)
    keep = ((np.asarray(gt_prev, np.int64)[:, None] == np.asarray(pred_track, np.int64)[None])
            & (np.asarray(gt_label)[:, None] == np.asarray(pred_label)[None]) & (d < max_dist))
    used = np.zeros(n_p, dtype=bool)
    for gj in np.flatnonzero(keep.any(axis=1)).tolist():  # GT boxes whose track is still there
        cand = np.flatnonzero(keep[gj] & ~used)
        if cand.size:
            match[gj] = cand[np.argmin(d[gj, cand])]
            used[match[gj]] = True
    free_g, free_p = np.flatnonzero(match < 0), np.flatnonzero(~used)
    m = greedy_match_bev(np.asarray(gt_xy)[free_g], np.asarray(gt_label)[free_g], np.asarray(pred_xy)[free_p],
                         np.asarray(pred_label)[free_p], np.asarray(pred_score)[free_p], max_dist)
    hit = m >= 0
    match[free_g[m[hit]]] = free_p[hit]
    return match


def id_switches_along_rays(detections: Sequence[Mapping], infos: Sequence[Mapping], ids: np.ndarray,
                           instances: Mapping[str, Sequence[str]], cfg=None) -> dict:
    """ID switches of ground-truth tracks, all of them and those whose object has a duplicate along
    its camera ray -- the failure ray denoising targets, seen through a tracker.

    ``detections[i]`` / ``infos[i]``: frame i in time order (LiDAR-frame ``boxes`` (n, 9),
    ``scores``, ``labels`` into :data:`raydn.geometry.CLASS_NAMES`); ``ids``: the track id of every
    detection, concatenated in that order (:func:`raydn.engine.tracking.track_detections`, -1: not
    reported); ``instances``: :func:`annotation_instances`. Per frame, reported detections of the
    seven tracking classes with score >= ``cfg.score_threshold`` are matched to the GT boxes the
    CLEAR MOT way (:func:`_clear_mot_match`: a GT box keeps the track it was matched to before while
    that track is still within 2 m (BEV centres, same class); the others are matched greedily by
    score as in :func:`raydn.eval.ray_duplicates.sample_ray_duplicates`, which also flags the GT
    boxes that have a ray duplicate: a false positive of their class on one of their camera rays,
    >= 2 m off in depth). An **ID switch** (CLEAR MOT): a GT track is matched to another track id
    than at its previous matched frame. A GT track **has a duplicate along its ray** when one of its
    frames flags it.

    Returns ``id_switches`` / ``tracks`` (all GT tracks seen), ``ray_duplicate_id_switches`` /
    ``ray_duplicate_tracks`` (those with a ray duplicate), ``ray_duplicate_frames`` and the
    thresholds (``config``)."""
    cfg = cfg or RayDuplicateConfig()
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    tracked_label = np.array([c in TRACKING_NAMES for c in CLASS_NAMES])
    last: dict[str, int] = {}          # GT instance -> track id at its last matched frame
    switches: dict[str, int] = {}      # GT instance -> ID switches
    dup_tracks: set[str] = set()
    dup_frames, start = 0, 0
    for i, (det, info) in enumerate(zip(detections, infos)):  # frames in time order: switches are sequential
        b = as_numpy(det["boxes"], np.float64)
        b = b.reshape(len(b), -1) if b.size else np.zeros((0, 9))
        n = len(b)
        tid = ids[start:start + n]
        start += n
        if len(tid) != n:
            raise DataError(f"id_switches_along_rays: {len(ids)} track ids for more detections (frame {i})")
        s = as_numpy(det["scores"], np.float64).reshape(-1)
        lb = as_numpy(det["labels"], np.int64).reshape(-1)
        keep = (tid >= 0) & tracked_label[lb]
        gb, gl, gidx = gt_of_info(info, CLASS_NAMES, with_index=True)
        gt_keep = tracked_label[gl]
        gb, gl, gidx = gb[gt_keep], gl[gt_keep], gidx[gt_keep]
        token = str(info.get("token"))
        inst = instances.get(token)
        if inst is None:
            raise DataError(f"sample {token}: not in the annotation table (wrong --dataroot / version?)")
        r = sample_ray_duplicates(b[keep], lb[keep], s[keep], gb, gl, info, cfg)
        sel = np.flatnonzero(keep)[r["kept"]]          # the predictions scored (rows of b)
        keys = [inst[int(j)] for j in gidx]
        match = _clear_mot_match(gb[:, :2], gl, [last.get(k, -2) for k in keys], b[sel, :2], lb[sel],
                                 s[sel], tid[sel], cfg.match_dist)
        for gj, pj in enumerate(match.tolist()):  # per GT box of the frame
            key = keys[gj]
            switches.setdefault(key, 0)  # GT tracks seen but never matched still count as tracks
            if pj < 0:
                continue
            track = int(tid[sel[pj]])
            if key in last and last[key] != track:
                switches[key] += 1
            last[key] = track
        for gj in np.flatnonzero(r["gt_ray_duplicated"]).tolist():
            dup_tracks.add(keys[gj])
            dup_frames += 1
    if start != len(ids):
        raise DataError(f"id_switches_along_rays: {len(ids)} track ids for {start} detections")
    return {"id_switches": int(sum(switches.values())), "tracks": len(switches),
            "ray_duplicate_id_switches": int(sum(switches[k] for k in dup_tracks)),
            "ray_duplicate_tracks": len(dup_tracks), "ray_duplicate_frames": dup_frames,
            "config": {"score_threshold": cfg.score_threshold, "match_dist": cfg.match_dist,
                       "max_angle_deg": cfg.max_angle_deg, "min_depth_gap": cfg.min_depth_gap}}
