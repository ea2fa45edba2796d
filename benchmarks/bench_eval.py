"""Benchmark: nuscenes-devkit ``DetectionEval.evaluate`` (accumulate + metrics) versus
``raydn.eval.fast_eval.evaluate`` on a val-sized synthetic set.

    python benchmarks/bench_eval.py                  # 6019 samples, ~30 GT and 300 predictions each
    python benchmarks/bench_eval.py --samples 600    # quicker
    python benchmarks/bench_eval.py --skip-devkit    # our evaluator only

Both evaluators get the same, already filtered boxes (the devkit's box filtering and JSON loading are
not timed; building the devkit's 1.8 M ``DetectionBox`` objects is reported separately). Prints the
times, the speed-up, and the largest difference of NDS / mAP / per-class AP / TP errors.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np

from raydn.eval.constants import ATTRIBUTE_NAMES, DETECTION_NAMES
from raydn.eval.fast_eval import EvalArrays, MetricConfig, evaluate

# Rough nuScenes class frequencies (val GT).
CLASS_P = np.array([0.43, 0.08, 0.015, 0.025, 0.015, 0.19, 0.012, 0.011, 0.09, 0.13])
REL_ATTRS = {"pedestrian": (0, 1, 2), "motorcycle": (3, 4), "bicycle": (3, 4), "car": (5, 6, 7), "truck": (5, 6, 7),
             "bus": (5, 6, 7), "trailer": (5, 6, 7), "construction_vehicle": (5, 6, 7)}


def synthetic_set(n_samples: int, gt_per_sample: int, pred_per_sample: int, seed: int = 0):
    """GT and predictions as EvalArrays (global frame, ego at the origin of each sample)."""
    rng = np.random.default_rng(seed)
    tokens = tuple(f"{i:032x}" for i in range(n_samples))
    n_gt = rng.poisson(gt_per_sample, n_samples)
    g_s = np.repeat(np.arange(n_samples), n_gt)
    ng = g_s.shape[0]
    g_lab = rng.choice(10, ng, p=CLASS_P / CLASS_P.sum())
    g_xy = rng.uniform(-50, 50, (ng, 2))
    g_size = rng.uniform(0.4, 5.0, (ng, 3))
    g_yaw = rng.uniform(-np.pi, np.pi, ng)
    g_vel = rng.normal(0, 3, (ng, 2))
    g_attr = np.full(ng, -1)
    for c, rel in REL_ATTRS.items():
        m = g_lab == DETECTION_NAMES.index(c)
        g_attr[m] = rng.choice(rel, int(m.sum()))
    g_attr[rng.random(ng) < 0.01] = -1
    gt = EvalArrays(tokens, g_s, np.c_[g_xy, rng.uniform(0, 2, ng)], g_size, g_yaw, g_vel, g_lab, np.full(ng, -1.0),
                    g_attr, np.hypot(g_xy[:, 0], g_xy[:, 1]), rng.integers(1, 100, ng))

    # Predictions: per sample, noisy copies of ~85 % of the GT first, then false positives, 300 in all.
    p_s = np.repeat(np.arange(n_samples), pred_per_sample)
    k = np.tile(np.arange(pred_per_sample), n_samples)
    starts = np.cumsum(n_gt) - n_gt
    is_copy = k < n_gt[p_s]
    src = np.where(is_copy, starts[p_s] + np.minimum(k, np.maximum(n_gt[p_s] - 1, 0)), 0)
    is_copy &= rng.random(p_s.shape[0]) < 0.85
    npred = p_s.shape[0]
    lab = np.where(is_copy, g_lab[src] if ng else 0, rng.choice(10, npred, p=CLASS_P / CLASS_P.sum()))
    xy = np.where(is_copy[:, None], (g_xy[src] if ng else 0) + rng.normal(0, 0.6, (npred, 2)),
                  rng.uniform(-55, 55, (npred, 2)))
    size = np.where(is_copy[:, None], (g_size[src] if ng else 1) * rng.uniform(0.8, 1.2, (npred, 3)),
                    rng.uniform(0.4, 5.0, (npred, 3)))
    yaw = np.where(is_copy, (g_yaw[src] if ng else 0) + rng.normal(0, 0.3, npred), rng.uniform(-np.pi, np.pi, npred))
    vel = np.where(is_copy[:, None], (g_vel[src] if ng else 0) + rng.normal(0, 0.5, (npred, 2)),
                   rng.normal(0, 3, (npred, 2)))
    score = np.where(is_copy, rng.beta(5, 2, npred), rng.beta(1, 6, npred)).astype(np.float32).astype(np.float64)
    attr = np.full(npred, -1)
    for c, rel in REL_ATTRS.items():
        m = lab == DETECTION_NAMES.index(c)
        attr[m] = rng.choice(rel, int(m.sum()))
    pred = EvalArrays(tokens, p_s, np.c_[xy, np.ones(npred)], size, yaw, vel, lab, score, attr,
                      np.hypot(xy[:, 0], xy[:, 1]), np.full(npred, -1))
    return gt, pred


def to_evalboxes(a: EvalArrays):
    """EvalArrays -> devkit EvalBoxes (boxes carry the yaw as a z-rotation quaternion)."""
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionBox
    out = EvalBoxes()
    half = a.yaw / 2
    rot = np.c_[np.cos(half), np.zeros_like(half), np.zeros_like(half), np.sin(half)].tolist()
    trans, size, vel = a.translation.tolist(), a.size.tolist(), a.velocity.tolist()
    score, npts = a.score.tolist(), a.num_pts.tolist()
    names = [DETECTION_NAMES[i] for i in a.label.tolist()]
    attrs = [ATTRIBUTE_NAMES[i] if i >= 0 else "" for i in a.attribute.tolist()]
    per = [[] for _ in a.sample_tokens]
    for i, s in enumerate(a.sample_idx.tolist()):
        per[s].append(DetectionBox(a.sample_tokens[s], tuple(trans[i]), tuple(size[i]), tuple(rot[i]), tuple(vel[i]),
                                   tuple(trans[i]), int(npts[i]), names[i], float(score[i]), attrs[i]))
    for tok, boxes in zip(a.sample_tokens, per):
        out.add_boxes(tok, boxes)
    return out


def max_diff(ref: dict, ours: dict) -> float:
    d = [abs(ref["nd_score"] - ours["nd_score"]), abs(ref["mean_ap"] - ours["mean_ap"])]
    for c in ref["label_aps"]:
        d += [abs(v - ours["label_aps"][c][th]) for th, v in ref["label_aps"][c].items()]
        d += [abs(v - ours["label_tp_errors"][c][m]) for m, v in ref["label_tp_errors"][c].items() if not np.isnan(v)]
    return max(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=6019)
    ap.add_argument("--gt", type=int, default=30, help="mean GT boxes per sample")
    ap.add_argument("--preds", type=int, default=300, help="predictions per sample")
    ap.add_argument("--repeat", type=int, default=3, help="runs of our evaluator (best time reported)")
    ap.add_argument("--skip-devkit", action="store_true")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    gt, pred = synthetic_set(args.samples, args.gt, args.preds)
    print(f"synthetic set: {args.samples} samples, {len(gt)} GT, {len(pred)} predictions "
          f"({time.perf_counter() - t:.1f}s to generate)")
    cfg = MetricConfig()
    ours_t = []
    for _ in range(max(1, args.repeat)):
        t = time.perf_counter()
        res = evaluate(gt, pred, cfg, apply_filters=False)
        ours_t.append(time.perf_counter() - t)
    t = time.perf_counter()
    evaluate(gt, pred, cfg)
    t_filt = time.perf_counter() - t
    print(f"raydn fast_eval: {min(ours_t):.2f}s (runs: {', '.join(f'{x:.2f}' for x in ours_t)}); "
          f"with the box filters: {t_filt:.2f}s;  NDS {res.nds:.4f}  mAP {res.mean_ap:.4f}")
    if args.skip_devkit:
        return 0
    try:
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.detection.evaluate import DetectionEval
    except ImportError:
        print("nuscenes-devkit not installed: devkit timing skipped")
        return 0
    t = time.perf_counter()
    gt_b, pred_b = to_evalboxes(gt), to_evalboxes(pred)
    print(f"built devkit EvalBoxes in {time.perf_counter() - t:.1f}s (not timed below)")
    holder = types.SimpleNamespace(cfg=config_factory("detection_cvpr_2019"), gt_boxes=gt_b, pred_boxes=pred_b,
                                   verbose=False)
    t = time.perf_counter()
    metrics, _ = DetectionEval.evaluate(holder)
    t_dev = time.perf_counter() - t
    ref = metrics.serialize()
    print(f"devkit accumulate+metrics: {t_dev:.1f}s;  NDS {ref['nd_score']:.4f}  mAP {ref['mean_ap']:.4f}")
    print(f"speed-up: {t_dev / min(ours_t):.1f}x;  max |difference| over NDS, mAP, per-class AP and TP "
          f"errors: {max_diff(ref, res.summary):.2e}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    raise SystemExit(main())
