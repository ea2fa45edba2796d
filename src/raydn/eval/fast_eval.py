"""A vectorised re-implementation of the nuScenes detection metric (``detection_cvpr_2019``).

It reproduces nuscenes-devkit 1.2.0 (``DetectionEval``: ``filter_eval_boxes``, ``accumulate``,
``calc_ap``, ``calc_tp``, ``DetectionMetrics``) operation for operation, so NDS, mAP, every per-class
AP and TP error agree with the devkit to float rounding (tests check 1e-6; in practice they are
bit-identical), without per-box Python objects:

* Boxes are columns (:class:`EvalArrays`): all samples concatenated, ``sample_idx`` says which
  sample a box belongs to. Everything is in the **global frame** (metres, radians, m/s).
* Matching. The devkit walks the predictions of a class in descending score order (ties: the
  later box first) and matches each to the closest *untaken* GT of its class in its sample if that
  is closer than the threshold (BEV centre distance, strict ``<``; equal distances: the first GT).
  A prediction only competes with predictions of the same (sample, class) group, so we run the
  greedy loop over *rounds*: round ``r`` processes the ``r``-th prediction of every group at once,
  for the four thresholds at once. Only predictions with some GT of their group within the largest
  threshold take part (the others are false positives at every threshold and change nothing), and
  only their (pred, GT) pairs closer than the largest threshold are kept (a farther GT can never be
  the match). The number of rounds is the largest number of such predictions in one group.
* Curves and metrics use exactly the devkit's numpy calls on identically ordered arrays
  (cumulative sums, ``np.interp`` at 101 recall points, the cumulative-mean-then-interpolate TP
  curves, NaN rules, ``nanmean`` over classes, NDS).

Use :func:`evaluate`; adapters from devkit objects, result files and info records are in
:mod:`raydn.eval.gt`. Nothing here imports nuscenes-devkit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from raydn.core.frames import quat_to_matrix
from raydn.errors import DataError
from raydn.eval.constants import ATTRIBUTE_NAMES, CLASS_RANGE, DETECTION_NAMES, TP_METRICS, TP_METRIC_PRINT

_NAME_TO_LABEL = {n: i for i, n in enumerate(DETECTION_NAMES)}
_ATTR_TO_INDEX = {n: i for i, n in enumerate(ATTRIBUTE_NAMES)}
NELEM = 101  # recall points of the devkit's curves


# ----------------------------------------------------------------------------------------------
# Configuration and containers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricConfig:
    """The devkit's ``DetectionConfig`` (defaults = ``detection_cvpr_2019``)."""

    class_names: tuple[str, ...] = DETECTION_NAMES
    class_range: tuple[float, ...] = tuple(CLASS_RANGE[n] for n in DETECTION_NAMES)
    dist_ths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    dist_th_tp: float = 2.0
    min_recall: float = 0.1
    min_precision: float = 0.1
    max_boxes_per_sample: int = 500
    mean_ap_weight: int = 5

    def __post_init__(self):
        if tuple(self.class_names) != DETECTION_NAMES:
            raise ValueError(f"MetricConfig.class_names must be the devkit's {DETECTION_NAMES}")
        if self.dist_th_tp not in self.dist_ths:
            raise ValueError("MetricConfig.dist_th_tp must be one of dist_ths")

    @classmethod
    def from_devkit(cls, cfg) -> "MetricConfig":
        """From a devkit ``DetectionConfig`` (e.g. ``config_factory('detection_cvpr_2019')``)."""
        return cls(class_range=tuple(float(cfg.class_range[n]) for n in DETECTION_NAMES),
                   dist_ths=tuple(float(t) for t in cfg.dist_ths), dist_th_tp=float(cfg.dist_th_tp),
                   min_recall=float(cfg.min_recall), min_precision=float(cfg.min_precision),
                   max_boxes_per_sample=int(cfg.max_boxes_per_sample),
                   mean_ap_weight=int(cfg.mean_ap_weight))

    def serialize(self) -> dict:
        """Same layout as the devkit's ``DetectionConfig.serialize``."""
        return {"class_range": dict(zip(self.class_names, self.class_range)),
                "dist_fcn": "center_distance", "dist_ths": list(self.dist_ths),
                "dist_th_tp": self.dist_th_tp, "min_recall": self.min_recall,
                "min_precision": self.min_precision,
                "max_boxes_per_sample": self.max_boxes_per_sample,
                "mean_ap_weight": self.mean_ap_weight}


def _col(a, dtype, shape_tail: tuple, name: str, n: int | None) -> np.ndarray:
    try:
        arr = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise DataError(f"EvalArrays.{name}: cannot convert to {np.dtype(dtype).name}: {e}") from None
    if arr.size == 0 and n in (None, 0):
        arr = arr.reshape((0,) + shape_tail)
    if arr.shape[1:] != shape_tail or (n is not None and arr.shape[0] != n):
        exp = ("N",) + shape_tail
        raise DataError(f"EvalArrays.{name}: expected shape {exp} with N={n}, got {arr.shape}")
    return arr


@dataclass
class EvalArrays:
    """Boxes of many samples as columns (GT or predictions), **global frame**.

    N boxes; every field is a numpy array with first dimension N:

    * ``sample_idx`` (N,) int64: index into ``sample_tokens``.
    * ``translation`` (N, 3) float64 box centre (metres); ``size`` (N, 3) float64 ``w, l, h`` (> 0).
    * ``yaw`` (N,) float64 radians (devkit ``quaternion_yaw`` of the box rotation).
    * ``velocity`` (N, 2) float64 m/s (GT may be NaN).
    * ``label`` (N,) int64: index into :data:`DETECTION_NAMES` (devkit order!).
    * ``score`` (N,) float64 (GT: -1).
    * ``attribute`` (N,) int64: index into :data:`ATTRIBUTE_NAMES`, -1 = no attribute ('').
    * ``ego_dist`` (N,) float64: BEV distance of the centre to the ego (LIDAR_TOP keyframe pose).
    * ``num_pts`` (N,) int64: LiDAR + radar points (GT); -1 for predictions.

    The order of the boxes matters like in the devkit: within a sample it is the tie-break order
    (predictions with equal scores: the later one is processed first; GT at equal distance: the
    earlier one is matched), and samples are ordered as in ``sample_tokens`` (the result file's
    order).
    """

    sample_tokens: tuple[str, ...]
    sample_idx: np.ndarray
    translation: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    label: np.ndarray
    score: np.ndarray
    attribute: np.ndarray
    ego_dist: np.ndarray
    num_pts: np.ndarray

    def __post_init__(self):
        self.sample_tokens = tuple(self.sample_tokens)
        self.sample_idx = _col(self.sample_idx, np.int64, (), "sample_idx", None)
        n = self.sample_idx.shape[0]
        self.translation = _col(self.translation, np.float64, (3,), "translation", n)
        self.size = _col(self.size, np.float64, (3,), "size", n)
        self.yaw = _col(self.yaw, np.float64, (), "yaw", n)
        self.velocity = _col(self.velocity, np.float64, (2,), "velocity", n)
        self.label = _col(self.label, np.int64, (), "label", n)
        self.score = _col(self.score, np.float64, (), "score", n)
        self.attribute = _col(self.attribute, np.int64, (), "attribute", n)
        self.ego_dist = _col(self.ego_dist, np.float64, (), "ego_dist", n)
        self.num_pts = _col(self.num_pts, np.int64, (), "num_pts", n)
        if n:
            if self.sample_idx.min() < 0 or self.sample_idx.max() >= len(self.sample_tokens):
                raise DataError("EvalArrays.sample_idx: out of range of sample_tokens")
            if self.label.min() < 0 or self.label.max() >= len(DETECTION_NAMES):
                raise DataError(f"EvalArrays.label: expected indices into {DETECTION_NAMES}")
            if self.attribute.min() < -1 or self.attribute.max() >= len(ATTRIBUTE_NAMES):
                raise DataError("EvalArrays.attribute: expected -1 or an index into ATTRIBUTE_NAMES")
            if not np.isfinite(self.translation).all():
                raise DataError("EvalArrays.translation: must be finite")
            if not (self.size > 0).all():
                raise DataError("EvalArrays.size: all sizes must be > 0 (devkit requirement)")
            if np.isnan(self.score).any():
                raise DataError("EvalArrays.score: may not be NaN")

    def __len__(self) -> int:
        return int(self.sample_idx.shape[0])

    def select(self, mask_or_index) -> "EvalArrays":
        """Subset of the boxes (boolean mask or index array); samples are kept."""
        return EvalArrays(self.sample_tokens, *(getattr(self, f)[mask_or_index] for f in _BOX_FIELDS))

    @classmethod
    def empty(cls, sample_tokens: Sequence[str] = ()) -> "EvalArrays":
        z = np.zeros(0)
        return cls(tuple(sample_tokens), z, z, z, z, z, z, z, z, z, z)

    @classmethod
    def build(cls, sample_tokens: Sequence[str], sample_idx, translation, size, yaw, velocity,
              names=None, *, labels=None, label_names: Sequence[str] = DETECTION_NAMES,
              score=None, attribute_names=None, ego_dist=None, ego_translation=None,
              num_pts=None) -> "EvalArrays":
        """Friendly constructor. Classes as ``names`` (strings) or ``labels`` (ints into
        ``label_names``, e.g. ``geometry.CLASS_NAMES`` for model outputs); attributes as strings
        ('' = none); ``ego_dist`` given, or computed from ``ego_translation`` (N, 2+) = box centre
        minus ego position (devkit ``ego_dist``: ``sqrt(dx**2 + dy**2)``)."""
        n = len(np.asarray(sample_idx))
        if names is not None:
            try:
                label = np.array([_NAME_TO_LABEL[str(s)] for s in names], dtype=np.int64)
            except KeyError as e:
                raise DataError(f"unknown detection name {e.args[0]!r}; expected one of {DETECTION_NAMES}") from None
        elif labels is not None:
            lut = np.array([_NAME_TO_LABEL.get(s, -1) for s in label_names], dtype=np.int64)
            label = lut[np.asarray(labels, dtype=np.int64)]
        else:
            raise DataError("EvalArrays.build: give names= or labels=")
        if attribute_names is None:
            attr = np.full(n, -1, dtype=np.int64)
        else:
            try:
                attr = np.array([_ATTR_TO_INDEX[a] if a else -1 for a in attribute_names], dtype=np.int64)
            except KeyError as e:
                raise DataError(f"unknown attribute name {e.args[0]!r}; expected '' or one of {ATTRIBUTE_NAMES}") from None
        if ego_dist is None:
            if ego_translation is None:
                raise DataError("EvalArrays.build: give ego_dist= or ego_translation=")
            et = np.asarray(ego_translation, dtype=np.float64).reshape(n, -1)
            ego_dist = np.sqrt(et[:, 0] ** 2 + et[:, 1] ** 2)
        return cls(tuple(sample_tokens), sample_idx, translation, size, yaw, velocity, label,
                   np.full(n, -1.0) if score is None else score, attr, ego_dist,
                   np.full(n, -1) if num_pts is None else num_pts)


_BOX_FIELDS = ("sample_idx", "translation", "size", "yaw", "velocity", "label", "score",
               "attribute", "ego_dist", "num_pts")


@dataclass
class BikeRacks:
    """``static_object.bicycle_rack`` boxes (global frame) used by the devkit's bike-rack filter.

    ``sample_token`` (R,) str; ``translation`` (R, 3), ``size`` (R, 3) ``w, l, h``, ``rotation``
    (R, 4) quaternion ``w, x, y, z`` — float64.
    """

    sample_token: Sequence[str]
    translation: np.ndarray
    size: np.ndarray
    rotation: np.ndarray

    def __post_init__(self):
        self.sample_token = tuple(self.sample_token)
        r = len(self.sample_token)
        self.translation = np.asarray(self.translation, dtype=np.float64).reshape(r, 3)
        self.size = np.asarray(self.size, dtype=np.float64).reshape(r, 3)
        self.rotation = np.asarray(self.rotation, dtype=np.float64).reshape(r, 4)

    @classmethod
    def empty(cls) -> "BikeRacks":
        return cls((), np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 4)))

    def concat(self, other: "BikeRacks") -> "BikeRacks":
        return BikeRacks(self.sample_token + other.sample_token,
                         np.concatenate([self.translation, other.translation]),
                         np.concatenate([self.size, other.size]),
                         np.concatenate([self.rotation, other.rotation]))


# ----------------------------------------------------------------------------------------------
# Filters (devkit ``filter_eval_boxes``)
# ----------------------------------------------------------------------------------------------

def _expand_groups(query_keys: np.ndarray, ref_keys_sorted: np.ndarray):
    """For each query key, all positions in ``ref_keys_sorted`` with the same key.
    Returns (query index, reference position) pairs, query-major, references ascending."""
    lo = np.searchsorted(ref_keys_sorted, query_keys, side="left")
    hi = np.searchsorted(ref_keys_sorted, query_keys, side="right")
    cnt = hi - lo
    q = np.repeat(np.arange(query_keys.shape[0]), cnt)
    starts = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
    return q, starts + np.arange(q.shape[0])


def in_bike_rack(boxes: EvalArrays, racks: BikeRacks | None) -> np.ndarray:
    """(N,) bool: bicycle/motorcycle boxes whose centre lies inside a bike rack of their sample
    (devkit ``points_in_box`` on the rack box, inclusive bounds)."""
    out = np.zeros(len(boxes), dtype=bool)
    if racks is None or len(racks.sample_token) == 0 or len(boxes) == 0:
        return out
    cyc = np.isin(boxes.label, [_NAME_TO_LABEL["bicycle"], _NAME_TO_LABEL["motorcycle"]])
    if not cyc.any():
        return out
    tok_index = {t: i for i, t in enumerate(boxes.sample_tokens)}
    rack_sample = np.array([tok_index.get(t, -1) for t in racks.sample_token], dtype=np.int64)
    order = np.argsort(rack_sample, kind="stable")
    cand = np.nonzero(cyc)[0]
    q, r = _expand_groups(boxes.sample_idx[cand], rack_sample[order])
    if q.shape[0] == 0:
        return out
    ridx = order[r]
    # Rack corners exactly as nuScenes ``Box.corners``: R @ local + centre; p1 = corner 0,
    # p_x = corner 4, p_y = corner 1, p_z = corner 3.
    w, l, h = racks.size[:, 0], racks.size[:, 1], racks.size[:, 2]
    sx = np.array([1, 1, 1, 1, -1, -1, -1, -1], dtype=np.float64)
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1], dtype=np.float64)
    sz = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float64)
    local = np.stack([(l / 2)[:, None] * sx, (w / 2)[:, None] * sy, (h / 2)[:, None] * sz], 1)
    corners = np.matmul(quat_to_matrix(racks.rotation), local) + racks.translation[:, :, None]
    p1 = corners[:, :, 0]
    i, j, k = corners[:, :, 4] - p1, corners[:, :, 1] - p1, corners[:, :, 3] - p1
    v = boxes.translation[cand[q]] - p1[ridx]

    def dot(a, b):
        return (a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]) + a[..., 2] * b[..., 2]

    inside = np.ones(q.shape[0], dtype=bool)
    for axis in (i, j, k):
        av = dot(axis[ridx], v)
        inside &= (0 <= av) & (av <= dot(axis, axis)[ridx])
    hit = np.zeros(cand.shape[0], dtype=bool)
    np.logical_or.at(hit, q, inside)
    out[cand] = hit
    return out


def filter_boxes(boxes: EvalArrays, cfg: MetricConfig = MetricConfig(),
                 racks: BikeRacks | None = None) -> EvalArrays:
    """Devkit ``filter_eval_boxes``: keep ``ego_dist < class_range[class]``, drop ``num_pts == 0``,
    drop bicycles/motorcycles inside a bike rack of their sample. Order is preserved."""
    return boxes.select(filter_mask(boxes, cfg, racks))


def filter_mask(boxes: EvalArrays, cfg: MetricConfig = MetricConfig(),
                racks: BikeRacks | None = None) -> np.ndarray:
    """(N,) bool: the boxes :func:`filter_boxes` keeps."""
    rng = np.asarray(cfg.class_range, dtype=np.float64)[boxes.label]
    keep = (boxes.ego_dist < rng) & (boxes.num_pts != 0)
    return keep & ~in_bike_rack(boxes, racks)


# ----------------------------------------------------------------------------------------------
# Greedy matching, all classes / samples / thresholds at once
# ----------------------------------------------------------------------------------------------

def score_order(pred: EvalArrays) -> np.ndarray:
    """Devkit processing order: descending score, ties by descending position in the devkit's
    list (:func:`devkit_positions`)."""
    return np.lexsort((devkit_positions(pred), pred.score))[::-1]


def greedy_match(gt: EvalArrays, pred: EvalArrays, dist_ths: Sequence[float], *,
                 order: np.ndarray | None = None, chunk_pairs: int = 4_000_000) -> np.ndarray:
    """Devkit ``accumulate`` matching for every class and threshold.

    ``gt`` and ``pred`` must share ``sample_tokens``; ``order``: processing order of the
    predictions (default :func:`score_order`). Returns (N_pred, T) int64: the index of the
    matched GT box for each prediction and threshold, -1 if it is a false positive.
    """
    n_cls = len(DETECTION_NAMES)
    return greedy_match_groups(gt.sample_idx * n_cls + gt.label, gt.translation[:, :2],
                               pred.sample_idx * n_cls + pred.label, pred.translation[:, :2],
                               score_order(pred) if order is None else order, dist_ths,
                               chunk_pairs=chunk_pairs)


def greedy_match_groups(gt_key: np.ndarray, gt_xy: np.ndarray, pred_key: np.ndarray,
                        pred_xy: np.ndarray, order: np.ndarray, dist_ths: Sequence[float], *,
                        chunk_pairs: int = 4_000_000) -> np.ndarray:
    """The one greedy matcher (the devkit's rule): predictions in ``order`` each take the nearest
    free GT box of their group whose BEV centre distance is **strictly below** the threshold
    (devkit ``min_dist < dist_th``; ties: the first GT in input order).

    ``gt_key`` (G,) / ``pred_key`` (N,) int64 group of each box (e.g. sample x class; boxes match only
    inside their group), ``gt_xy`` (G, 2) / ``pred_xy`` (N, 2) BEV centres in metres, ``order`` (N,)
    processing order of the predictions, ``dist_ths`` T thresholds in metres (matched independently).
    Returns (N, T) int64: the matched GT index per prediction and threshold, -1 = false positive.
    All groups advance together, one round per rank inside a group (vectorised over groups)."""
    gt_key, pred_key = np.asarray(gt_key, np.int64), np.asarray(pred_key, np.int64)
    gt_xy, pred_xy = np.asarray(gt_xy, np.float64), np.asarray(pred_xy, np.float64)
    n_gt, n_pred = gt_key.shape[0], pred_key.shape[0]
    ths = np.asarray(dist_ths, dtype=np.float64)
    n_t = ths.shape[0]
    matched = np.full((n_pred, n_t), -1, dtype=np.int64)
    if n_pred == 0 or n_gt == 0:
        return matched
    pair_p, pair_g, pair_d = _candidate_pairs(gt_key, gt_xy, pred_key, pred_xy, ths.max(), chunk_pairs)
    if pair_p.shape[0] == 0:
        return matched
    cand, dtab, gtab = _candidate_tables(pair_p, pair_g, pair_d, n_gt)
    by_round, bounds = _rounds(pred_key[cand], order, cand, n_pred)

    taken = np.zeros((n_gt + 1, n_t), dtype=bool)
    t_idx = np.broadcast_to(np.arange(n_t), (1, n_t))
    for r in range(bounds.shape[0] - 1):
        rows = by_round[bounds[r]:bounds[r + 1]]
        g = gtab[rows]                                                   # (n, K)
        d = np.where(taken[g], np.inf, dtab[rows][:, :, None])            # (n, K, T)
        j = d.argmin(axis=1)                                              # first minimum
        dmin = np.take_along_axis(d, j[:, None, :], axis=1)[:, 0, :]
        ok = dmin < ths
        gsel = np.take_along_axis(g, j, axis=1)
        tt = np.broadcast_to(t_idx, ok.shape)
        taken[gsel[ok], tt[ok]] = True
        matched[cand[rows]] = np.where(ok, gsel, -1)
    return matched


def _candidate_pairs(gt_key: np.ndarray, gt_xy: np.ndarray, pred_key: np.ndarray, pred_xy: np.ndarray,
                     max_th: float, chunk_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 1 of :func:`greedy_match_groups`: the (pred, gt) pairs of one group whose BEV distance is
    below ``max_th`` metres, built in chunks of about ``chunk_pairs`` pairs. Returns ``(pair_p,
    pair_g, pair_d)`` (P,) each: prediction index, GT index, distance; pred-major, GT in input order."""
    gorder = np.argsort(gt_key, kind="stable")          # GT grouped, original order inside a group
    gkey_sorted = gt_key[gorder]
    lo = np.searchsorted(gkey_sorted, pred_key, side="left")
    cnt = np.searchsorted(gkey_sorted, pred_key, side="right") - lo
    has = np.nonzero(cnt)[0]
    csum = np.cumsum(cnt[has])
    cp, cg, cd = [], [], []
    start = 0
    while start < has.shape[0]:
        base = csum[start - 1] if start else 0
        stop = int(np.searchsorted(csum, base + chunk_pairs, side="right"))
        stop = max(stop, start + 1)
        sel = has[start:stop]
        c = cnt[sel]
        q = np.repeat(sel, c)
        g = gorder[np.repeat(lo[sel] - (np.cumsum(c) - c), c) + np.arange(q.shape[0])]
        d = pred_xy[q] - gt_xy[g]                                  # devkit: pred - gt, xy only
        dist = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
        close = dist < max_th
        cp.append(q[close]), cg.append(g[close]), cd.append(dist[close])
        start = stop
    if not cp:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(cp), np.concatenate(cg), np.concatenate(cd)


def _candidate_tables(pair_p: np.ndarray, pair_g: np.ndarray, pair_d: np.ndarray,
                      n_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 2 of :func:`greedy_match_groups`: dense tables of the candidate pairs. Returns ``cand``
    (C,) the predictions with at least one pair, ``dtab`` (C, K) distances (padding inf) and ``gtab``
    (C, K) GT indices (padding ``n_gt``, a dummy GT row), K = most pairs of one prediction."""
    cand, first, kcount = np.unique(pair_p, return_index=True, return_counts=True)
    kmax = int(kcount.max())
    slot = np.arange(pair_p.shape[0]) - np.repeat(first, kcount)
    row = np.repeat(np.arange(cand.shape[0]), kcount)
    dtab = np.full((cand.shape[0], kmax), np.inf)
    gtab = np.full((cand.shape[0], kmax), n_gt, dtype=np.int64)
    dtab[row, slot] = pair_d
    gtab[row, slot] = pair_g
    return cand, dtab, gtab


def _rounds(ckey: np.ndarray, order: np.ndarray, cand: np.ndarray,
            n_pred: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 of :func:`greedy_match_groups`: the round of each candidate = its rank (in ``order``)
    among the candidates of its group ``ckey`` (C,). Returns ``(by_round, bounds)``: candidate rows
    sorted by round, and the start of each round in it (R + 1,)."""
    rank = np.empty(n_pred, dtype=np.int64)
    rank[np.asarray(order)] = np.arange(n_pred)
    o = np.lexsort((rank[cand], ckey))
    ks = ckey[o]
    new_group = np.r_[True, ks[1:] != ks[:-1]]
    gstart = np.maximum.accumulate(np.where(new_group, np.arange(ks.shape[0]), 0))
    rnd = np.empty(cand.shape[0], dtype=np.int64)
    rnd[o] = np.arange(ks.shape[0]) - gstart
    by_round = np.argsort(rnd, kind="stable")
    bounds = np.searchsorted(rnd[by_round], np.arange(rnd.max() + 2))
    return by_round, bounds


# ----------------------------------------------------------------------------------------------
# Curves and metrics (devkit ``accumulate`` tail, ``calc_ap``, ``calc_tp``, ``DetectionMetrics``)
# ----------------------------------------------------------------------------------------------

def _no_predictions() -> dict:
    return {"recall": np.linspace(0, 1, NELEM), "precision": np.zeros(NELEM),
            "confidence": np.zeros(NELEM), **{k: np.ones(NELEM) for k in TP_METRICS}}


def cummean(x: np.ndarray) -> np.ndarray:
    """Devkit ``cummean`` (NaN-aware cumulative mean; all-NaN -> ones)."""
    if np.isnan(x).sum() == len(x):
        return np.ones(len(x))
    sum_vals = np.nancumsum(x.astype(float))
    count_vals = np.cumsum(~np.isnan(x))
    return np.divide(sum_vals, count_vals, out=np.zeros_like(sum_vals), where=count_vals != 0)


def angle_diff(x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Devkit ``angle_diff`` vectorised: signed smallest difference from y to x."""
    diff = (x - y + period / 2) % period - period / 2
    return np.where(diff > np.pi, diff - 2 * np.pi, diff)


def tp_errors_of_matches(gt: EvalArrays, pred: EvalArrays, gi: np.ndarray, pi: np.ndarray,
                         class_name: str) -> dict:
    """Per-match errors as in ``accumulate`` (match order kept): trans, vel, scale, orient, attr."""
    dp = pred.translation[pi, :2] - gt.translation[gi, :2]
    dv = pred.velocity[pi] - gt.velocity[gi]
    sa, sr = gt.size[gi], pred.size[pi]
    mn = np.minimum(sa, sr)
    inter = mn[:, 0] * mn[:, 1] * mn[:, 2]
    union = sa[:, 0] * sa[:, 1] * sa[:, 2] + sr[:, 0] * sr[:, 1] * sr[:, 2] - inter
    period = np.pi if class_name == "barrier" else 2 * np.pi
    ga, pa = gt.attribute[gi], pred.attribute[pi]
    return {"trans_err": np.sqrt(dp[:, 0] * dp[:, 0] + dp[:, 1] * dp[:, 1]),
            "vel_err": np.sqrt(dv[:, 0] * dv[:, 0] + dv[:, 1] * dv[:, 1]),
            "scale_err": 1 - inter / union,
            "orient_err": np.abs(angle_diff(gt.yaw[gi], pred.yaw[pi], period)),
            "attr_err": np.where(ga == -1, np.nan, 1 - (ga == pa).astype(float))}


def metric_data(gt: EvalArrays, pred: EvalArrays, matched_t: np.ndarray, order_c: np.ndarray,
                npos: int, class_name: str) -> dict:
    """Curves of one class at one threshold (devkit ``accumulate`` after the matching loop).
    ``order_c``: the class's predictions in processing order; ``matched_t`` (N_pred,) GT or -1."""
    if npos == 0:
        return _no_predictions()
    m = matched_t[order_c]
    is_tp = m >= 0
    if not is_tp.any():
        return _no_predictions()
    tp = np.cumsum(is_tp.astype(np.int64)).astype(float)
    fp = np.cumsum((~is_tp).astype(np.int64)).astype(float)
    conf = pred.score[order_c]
    prec = tp / (fp + tp)
    rec = tp / float(npos)
    rec_interp = np.linspace(0, 1, NELEM)
    prec = np.interp(rec_interp, rec, prec, right=0)
    conf = np.interp(rec_interp, rec, conf, right=0)
    pi = order_c[is_tp]
    errs = tp_errors_of_matches(gt, pred, m[is_tp], pi, class_name)
    match_conf = pred.score[pi]
    out = {"recall": rec_interp, "precision": prec, "confidence": conf}
    for key in TP_METRICS:
        tmp = cummean(errs[key])
        out[key] = np.interp(conf[::-1], match_conf[::-1], tmp[::-1])[::-1]
    return out


def calc_ap(md: Mapping, min_recall: float, min_precision: float) -> float:
    """Devkit ``calc_ap``."""
    prec = np.copy(md["precision"])
    prec = prec[round(100 * min_recall) + 1:]
    prec -= min_precision
    prec[prec < 0] = 0
    return float(np.mean(prec)) / (1.0 - min_precision)


def max_recall_ind(md: Mapping) -> int:
    non_zero = np.nonzero(md["confidence"])[0]
    return 0 if len(non_zero) == 0 else int(non_zero[-1])


def calc_tp(md: Mapping, min_recall: float, metric_name: str) -> float:
    """Devkit ``calc_tp``."""
    first_ind = round(100 * min_recall) + 1
    last_ind = max_recall_ind(md)
    if last_ind < first_ind:
        return 1.0
    return float(np.mean(md[metric_name][first_ind: last_ind + 1]))


def summarize(label_aps: dict, label_tp_errors: dict, cfg: MetricConfig, eval_time: float) -> dict:
    """Devkit ``DetectionMetrics.serialize`` from per-class APs and TP errors (same reductions,
    same order)."""
    mean_dist_aps = {c: np.mean(list(d.values())) for c, d in label_aps.items()}
    mean_ap = float(np.mean(list(mean_dist_aps.values())))
    tp_errors = {m: float(np.nanmean([label_tp_errors[c][m] for c in cfg.class_names]))
                 for m in TP_METRICS}
    tp_scores = {m: max(0.0, 1.0 - tp_errors[m]) for m in TP_METRICS}
    total = float(cfg.mean_ap_weight * mean_ap + np.sum(list(tp_scores.values())))
    nd_score = total / float(cfg.mean_ap_weight + len(tp_scores))
    return {"label_aps": label_aps, "mean_dist_aps": mean_dist_aps, "mean_ap": mean_ap,
            "label_tp_errors": label_tp_errors, "tp_errors": tp_errors, "tp_scores": tp_scores,
            "nd_score": nd_score, "eval_time": eval_time, "cfg": cfg.serialize()}


@dataclass
class DetectionResult:
    """``summary``: the devkit's ``metrics_summary`` layout (``nd_score``, ``mean_ap``,
    ``label_aps[class][th]``, ``label_tp_errors[class][metric]``, ``tp_errors``, ...);
    ``metric_data[(class, th)]``: the 101-point curves (recall, precision, confidence, TP errors)."""

    summary: dict
    metric_data: dict = field(repr=False)

    @property
    def nds(self) -> float:
        return self.summary["nd_score"]

    @property
    def mean_ap(self) -> float:
        return self.summary["mean_ap"]


def devkit_positions(pred: EvalArrays) -> np.ndarray:
    """(N,) position of each box in the devkit's flattened list ``EvalBoxes.all``: samples in
    ``sample_tokens`` order, boxes in array order within a sample."""
    pos = np.empty(len(pred), dtype=np.int64)
    pos[np.argsort(pred.sample_idx, kind="stable")] = np.arange(len(pred))
    return pos


def _align_samples(gt: EvalArrays, pred: EvalArrays, strict: bool) -> EvalArrays:
    """Re-index ``pred`` onto ``gt.sample_tokens`` (box order unchanged)."""
    if pred.sample_tokens == gt.sample_tokens:
        return pred
    index = {t: i for i, t in enumerate(gt.sample_tokens)}
    missing = [t for t in pred.sample_tokens if t not in index]
    if missing:
        raise DataError(f"predictions for samples that are not in the GT set, e.g. {missing[:3]}")
    if strict and len(set(pred.sample_tokens)) != len(index):
        absent = sorted(set(index) - set(pred.sample_tokens))[:3]
        raise DataError(f"predictions miss samples of the GT set (e.g. {absent}); the devkit "
                        "requires every sample of the split in the result file (strict=False "
                        "treats them as samples without predictions)")
    lut = np.array([index[t] for t in pred.sample_tokens], dtype=np.int64)
    fields_ = {f: getattr(pred, f) for f in _BOX_FIELDS}
    fields_["sample_idx"] = lut[pred.sample_idx]
    return EvalArrays(gt.sample_tokens, **fields_)


def evaluate(gt: EvalArrays, pred: EvalArrays, cfg: MetricConfig = MetricConfig(), *,
             racks: BikeRacks | None = None, apply_filters: bool = True,
             strict: bool = True) -> DetectionResult:
    """nuScenes detection metric of ``pred`` against ``gt`` (both global frame, see
    :class:`EvalArrays`).

    ``racks``: bike-rack boxes for the bicycle/motorcycle filter (omit if there are none);
    ``apply_filters=False`` if both sets are already filtered (e.g. taken from a ``DetectionEval``);
    ``strict``: like the devkit, require predictions for exactly the GT samples (otherwise GT
    samples missing from ``pred`` count as samples without predictions).
    """
    t0 = time.time()
    if len(pred):
        counts = np.bincount(pred.sample_idx, minlength=len(pred.sample_tokens))
        if counts.max() > cfg.max_boxes_per_sample:
            raise DataError(f"predictions: at most {cfg.max_boxes_per_sample} boxes per sample "
                            f"allowed, sample {pred.sample_tokens[int(counts.argmax())]!r} has "
                            f"{int(counts.max())}")
    pos = devkit_positions(pred)          # tie-break order of the prediction file
    pred = _align_samples(gt, pred, strict)
    if apply_filters:
        gt = filter_boxes(gt, cfg, racks)
        keep = filter_mask(pred, cfg, racks)
        pred, pos = pred.select(keep), pos[keep]
    order = np.lexsort((pos, pred.score))[::-1]
    matched = greedy_match(gt, pred, cfg.dist_ths, order=order)
    labels_sorted = pred.label[order]
    npos_all = np.bincount(gt.label, minlength=len(DETECTION_NAMES))

    mds: dict = {}
    label_aps: dict = {}
    label_tp: dict = {}
    for ci, cname in enumerate(cfg.class_names):
        order_c = order[labels_sorted == ci]
        npos = int(npos_all[ci])
        label_aps[cname] = {}
        for ti, th in enumerate(cfg.dist_ths):
            md = metric_data(gt, pred, matched[:, ti], order_c, npos, cname)
            mds[(cname, th)] = md
            label_aps[cname][th] = calc_ap(md, cfg.min_recall, cfg.min_precision)
        md_tp = mds[(cname, cfg.dist_th_tp)]
        label_tp[cname] = {}
        for m in TP_METRICS:
            if cname == "traffic_cone" and m in ("attr_err", "vel_err", "orient_err"):
                tp = np.nan
            elif cname == "barrier" and m in ("attr_err", "vel_err"):
                tp = np.nan
            else:
                tp = calc_tp(md_tp, cfg.min_recall, m)
            label_tp[cname][m] = tp
    return DetectionResult(summarize(label_aps, label_tp, cfg, time.time() - t0), mds)


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------

def format_summary(summary: Mapping) -> str:
    """Text block like the devkit's printout: mAP, the five TP errors, NDS, per-class table."""
    lines = [f"mAP: {summary['mean_ap']:.4f}"]
    for m, v in summary["tp_errors"].items():
        lines.append(f"{TP_METRIC_PRINT[m]}: {v:.4f}")
    lines.append(f"NDS: {summary['nd_score']:.4f}")
    if summary.get("eval_time") is not None:
        lines.append(f"Eval time: {summary['eval_time']:.1f}s")
    lines += ["", "Per-class results:",
              "%-20s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s\t%-6s" % ("Object Class", "AP", "ATE", "ASE", "AOE", "AVE", "AAE")]
    for c, ap in summary["mean_dist_aps"].items():
        t = summary["label_tp_errors"][c]
        lines.append("%-20s\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f\t%-6.3f"
                     % (c, ap, t["trans_err"], t["scale_err"], t["orient_err"], t["vel_err"], t["attr_err"]))
    return "\n".join(lines)
