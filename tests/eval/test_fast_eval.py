"""The fast evaluator against nuscenes-devkit 1.2.0 (the oracle) and hand-computed values."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from _deps import require

require("nuscenes")

from nuscenes.eval.common.config import config_factory  # noqa: E402
from nuscenes.eval.common.data_classes import EvalBoxes  # noqa: E402
from nuscenes.eval.common.utils import quaternion_yaw  # noqa: E402
from nuscenes.eval.detection import constants as dk_const  # noqa: E402
from nuscenes.eval.detection.data_classes import DetectionBox  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

from raydn.errors import DataError  # noqa: E402
from raydn.eval import constants  # noqa: E402
from raydn.eval.fast_eval import BikeRacks, EvalArrays, MetricConfig, evaluate, greedy_match  # noqa: E402
from raydn.eval.gt import arrays_from_evalboxes  # noqa: E402
from raydn.core.frames import quat_multiply, quat_to_matrix, quat_yaw  # noqa: E402

CFG = config_factory("detection_cvpr_2019")


def _ours(gt, pred, **kw):
    return evaluate(arrays_from_evalboxes(gt), arrays_from_evalboxes(pred), MetricConfig.from_devkit(CFG), **kw)


def _check_against_devkit(gt, pred, devkit_eval, summaries_close):
    ref, md_list, _, _ = devkit_eval(gt, pred)
    res = _ours(gt, pred, apply_filters=False)
    summaries_close(ref, res.summary, 1e-6)
    # The 101-point curves agree too (same numpy operations on the same arrays; the devkit's yaw
    # goes through a 4x4 BLAS product whose last bit can vary from call to call, hence 1e-12).
    for (c, th), md in md_list.md.items():
        ours = res.metric_data[(c, th)]
        for k in ("recall", "precision", "confidence", "trans_err", "vel_err", "scale_err", "orient_err", "attr_err"):
            np.testing.assert_allclose(getattr(md, k), ours[k], rtol=0, atol=1e-12, err_msg=f"{c} {th} {k}")
    return ref, res


# ------------------------------------------------------------------------------------------------
# Constants and rotations
# ------------------------------------------------------------------------------------------------

def test_constants_match_devkit():
    assert constants.DETECTION_NAMES == tuple(dk_const.DETECTION_NAMES) == tuple(CFG.class_names)
    assert constants.ATTRIBUTE_NAMES == tuple(dk_const.ATTRIBUTE_NAMES)
    assert constants.TP_METRICS == tuple(dk_const.TP_METRICS)
    assert constants.CLASS_RANGE == {k: float(v) for k, v in CFG.class_range.items()}
    assert MetricConfig.from_devkit(CFG) == MetricConfig()
    assert MetricConfig().serialize() == CFG.serialize()
    from nuscenes.eval.detection.utils import category_to_detection_name
    for cat, name in constants.CATEGORY_TO_DETECTION.items():
        assert category_to_detection_name(cat) == name


def test_rotations_reproduce_pyquaternion_to_rounding():
    """The vectorised rotations equal pyquaternion / the devkit's ``quaternion_yaw`` to a few ulp.

    Not bitwise: numpy's ``arctan2`` (SIMD loops dispatched per CPU: AVX-512 and AVX2 round
    differently on ~30 % of inputs) and pyquaternion's 4x4 products (OpenBLAS kernels chosen per CPU)
    may each differ from the other path in the last bit. What the evaluator needs -- its decisions
    and metrics equal to the devkit's -- is checked by the golden and devkit-comparison tests below."""
    eps = np.finfo(np.float64).eps
    rng = np.random.default_rng(0)
    q = rng.normal(size=(400, 4))
    q[:200] /= np.linalg.norm(q[:200], axis=1, keepdims=True)            # unit and non-unit
    q[200:220] = [list(Quaternion(axis=[0, 0, 1], angle=a).elements) for a in rng.uniform(-4, 4, 20)]
    ref_yaw = np.array([quaternion_yaw(Quaternion(list(x))) for x in q])
    # yaw in (-pi, pi]: a few ulp of pi; the branch (+pi vs -pi) must agree too
    np.testing.assert_allclose(quat_yaw(q), ref_yaw, rtol=0, atol=8 * eps * np.pi)
    ref_r = np.stack([Quaternion(list(x)).rotation_matrix for x in q])
    np.testing.assert_allclose(quat_to_matrix(q), ref_r, rtol=0, atol=8 * eps)
    p = rng.normal(size=(400, 4))
    ref_m = np.stack([(Quaternion(list(a)) * Quaternion(list(b))).elements for a, b in zip(q, p)])
    scale = np.abs(q).max(1, keepdims=True) * np.abs(p).max(1, keepdims=True)   # size of the products summed
    assert (np.abs(quat_multiply(q, p) - ref_m) <= 16 * eps * scale).all()


# ------------------------------------------------------------------------------------------------
# Golden values by hand
# ------------------------------------------------------------------------------------------------

def _box(tok, xy, name, score=-1.0, size=(2.0, 4.0, 1.5), yaw=0.0, vel=(0.0, 0.0), attr="", num_pts=10):
    tr = (float(xy[0]), float(xy[1]), 1.0)
    return DetectionBox(tok, tr, size, tuple(Quaternion(axis=[0, 0, 1], angle=yaw).elements), vel,
                        ego_translation=tr, num_pts=num_pts if score < 0 else -1, detection_name=name,
                        detection_score=score, attribute_name=attr)


def _single(gt_box, pred_boxes):
    gt, pred = EvalBoxes(), EvalBoxes()
    gt.add_boxes("s", [gt_box])
    pred.add_boxes("s", pred_boxes)
    return gt, pred


def test_golden_perfect_prediction(devkit_eval):
    gt, pred = _single(_box("s", (10, 5), "car", attr="vehicle.parked"),
                       [_box("s", (10, 5), "car", 0.9, attr="vehicle.parked")])
    s = _ours(gt, pred).summary
    # (the devkit's (p - 0.1) / 0.9 gives 1 + 4e-16 for a perfect curve)
    assert s["label_aps"]["car"] == pytest.approx({0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}, abs=1e-12)
    assert all(s["label_tp_errors"]["car"][m] == 0.0 for m in constants.TP_METRICS)
    assert all(s["mean_dist_aps"][c] == 0.0 for c in constants.DETECTION_NAMES if c != "car")
    assert s["label_tp_errors"]["truck"]["trans_err"] == 1.0
    assert np.isnan(s["label_tp_errors"]["traffic_cone"]["orient_err"])
    assert np.isnan(s["label_tp_errors"]["barrier"]["vel_err"])
    assert s["mean_ap"] == pytest.approx(0.1, abs=1e-12)
    # mATE = mASE = 9/10 (car 0, nine classes 1); mAOE = 8/9 (cone NaN); mAVE = mAAE = 7/8.
    expected_tp = {"trans_err": 0.9, "scale_err": 0.9, "orient_err": 8 / 9, "vel_err": 7 / 8, "attr_err": 7 / 8}
    for m, v in expected_tp.items():
        assert s["tp_errors"][m] == pytest.approx(v, abs=1e-12)
    nds = (5 * 0.1 + sum(1 - v for v in expected_tp.values())) / 10
    assert s["nd_score"] == pytest.approx(nds, abs=1e-12)
    ref = devkit_eval(gt, pred)[0]
    assert ref["nd_score"] == pytest.approx(nds, abs=1e-12)


def test_golden_offset_and_errors():
    # 1.5 m away: a match at 2 and 4 m only -> AP (0 + 0 + 1 + 1) / 4; the TP errors are exact.
    gt, pred = _single(_box("s", (10, 5), "car", size=(2.0, 4.0, 1.5), yaw=0.1, vel=(1.0, 1.0), attr="vehicle.moving"),
                       [_box("s", (10 + 0.9, 5 + 1.2), "car", 0.8, size=(1.0, 4.0, 1.5), yaw=0.4, vel=(4.0, 5.0),
                             attr="vehicle.parked")])
    s = _ours(gt, pred).summary
    assert s["label_aps"]["car"] == pytest.approx({0.5: 0.0, 1.0: 0.0, 2.0: 1.0, 4.0: 1.0}, abs=1e-12)
    assert s["mean_dist_aps"]["car"] == pytest.approx(0.5, abs=1e-12)
    t = s["label_tp_errors"]["car"]
    assert t["trans_err"] == pytest.approx(1.5, abs=1e-12)
    assert t["scale_err"] == pytest.approx(0.5, abs=1e-12)     # IoU of aligned boxes = 6 / 12
    assert t["orient_err"] == pytest.approx(0.3, abs=1e-12)
    assert t["vel_err"] == pytest.approx(5.0, abs=1e-12)       # |(3, 4)|
    assert t["attr_err"] == 1.0


def test_golden_barrier_half_turn_and_cone():
    gt, pred = _single(_box("s", (3, 3), "barrier", yaw=0.2), [_box("s", (3, 3), "barrier", 0.5, yaw=0.2 + np.pi)])
    s = _ours(gt, pred).summary
    assert s["label_tp_errors"]["barrier"]["orient_err"] == pytest.approx(0.0, abs=1e-12)   # pi-periodic
    gt, pred = _single(_box("s", (3, 3), "car", yaw=0.2), [_box("s", (3, 3), "car", 0.5, yaw=0.2 + np.pi)])
    assert _ours(gt, pred).summary["label_tp_errors"]["car"]["orient_err"] == pytest.approx(np.pi, abs=1e-12)


def test_golden_greedy_order_and_ties():
    # Two preds, one GT: the higher score takes the GT; with equal scores the later box goes first.
    g = _box("s", (0, 0), "pedestrian")
    far, near = _box("s", (0.4, 0), "pedestrian", 0.7), _box("s", (0.1, 0), "pedestrian", 0.6)
    s = _ours(*_single(g, [far, near])).summary
    assert s["label_tp_errors"]["pedestrian"]["trans_err"] == pytest.approx(0.4, abs=1e-12)
    far2, near2 = _box("s", (0.4, 0), "pedestrian", 0.6), _box("s", (0.1, 0), "pedestrian", 0.6)
    gt, pred = _single(g, [far2, near2])
    s = _ours(gt, pred).summary
    assert s["label_tp_errors"]["pedestrian"]["trans_err"] == pytest.approx(0.1, abs=1e-12)
    gt, pred = _single(g, [near2, far2])
    assert _ours(gt, pred).summary["label_tp_errors"]["pedestrian"]["trans_err"] == pytest.approx(0.4, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Equality with the devkit on many prediction sets
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_random_sets_equal_devkit(seed, make_evalboxes, devkit_eval, summaries_close):
    gt, pred = make_evalboxes(np.random.default_rng(seed), n_samples=15, match_frac=0.3 + 0.2 * seed)
    _check_against_devkit(gt, pred, devkit_eval, summaries_close)


def test_gt_perturbed_small_noise_equal_devkit(make_evalboxes, devkit_eval, summaries_close):
    gt, pred = make_evalboxes(np.random.default_rng(11), n_samples=20, max_pred=60, match_frac=0.95, noise=0.3)
    ref, _ = _check_against_devkit(gt, pred, devkit_eval, summaries_close)
    assert ref["mean_ap"] > 0.2     # a meaningful operating point, not all-zero


def test_ties_in_scores_and_duplicate_boxes_equal_devkit(make_evalboxes, devkit_eval, summaries_close):
    gt, pred = make_evalboxes(np.random.default_rng(5), n_samples=15, max_pred=50, score_decimals=1, noise=0.5)
    # Exact duplicates (same score, same position) and equidistant GT pairs.
    for tok in pred.sample_tokens[:5]:
        pred.boxes[tok] = pred.boxes[tok] + [copy.deepcopy(b) for b in pred.boxes[tok][:5]]
        if gt.boxes[tok]:
            g = gt.boxes[tok][0]
            twin = copy.deepcopy(g)
            twin.translation = (g.translation[0] + 1.0, g.translation[1], g.translation[2])
            gt.boxes[tok].append(twin)
            pred.boxes[tok].append(_box(tok, (g.translation[0] + 0.5, g.translation[1]), g.detection_name, 0.5))
    _check_against_devkit(gt, pred, devkit_eval, summaries_close)


def test_empty_predictions_equal_devkit(make_evalboxes, devkit_eval, summaries_close):
    gt, _ = make_evalboxes(np.random.default_rng(2), n_samples=6)
    pred = EvalBoxes()
    for tok in gt.sample_tokens:
        pred.add_boxes(tok, [])
    ref, res = _check_against_devkit(gt, pred, devkit_eval, summaries_close)
    assert res.summary["mean_ap"] == 0.0 and res.summary["nd_score"] == 0.0


def test_classes_without_gt_equal_devkit(make_evalboxes, devkit_eval, summaries_close):
    gt, pred = make_evalboxes(np.random.default_rng(3), n_samples=10, classes=("car", "pedestrian", "barrier"),
                              pred_classes=constants.DETECTION_NAMES)
    ref, res = _check_against_devkit(gt, pred, devkit_eval, summaries_close)
    assert res.summary["mean_dist_aps"]["bus"] == 0.0
    assert res.summary["label_tp_errors"]["bus"]["trans_err"] == 1.0


def test_filters_class_range_points_bike_racks_equal_devkit(make_evalboxes, devkit_eval, fake_nusc, summaries_close):
    """Through the devkit's own add_center_dist + filter_eval_boxes: ego poses, boxes exactly at the
    class-range limits (kept only if strictly inside), zero-point GT, bicycles in bike racks."""
    rng = np.random.default_rng(7)
    gt, pred = make_evalboxes(rng, n_samples=10, max_gt=20, extent=60.0,
                              classes=("car", "pedestrian", "bicycle", "motorcycle", "traffic_cone", "barrier"))
    ego = {t: (float(rng.uniform(-500, 500)), float(rng.uniform(-500, 500)), 0.0) for t in gt.sample_tokens}
    racks = {}
    for tok in gt.sample_tokens:
        ex, ey, _ = ego[tok]
        for boxes in (gt.boxes[tok], pred.boxes[tok]):
            for b in boxes:
                b.translation = (b.translation[0] + ex, b.translation[1] + ey, b.translation[2])
        # Boxes exactly at / just inside / just beyond the range of their class (ego dist exact).
        for name, r in (("car", 50.0), ("pedestrian", 40.0), ("traffic_cone", 30.0), ("bicycle", 40.0)):
            for d in (r, np.nextafter(r, 0), np.nextafter(r, 100)):
                gt.boxes[tok].append(_box(tok, (ex + d, ey), name))
                pred.boxes[tok].append(_box(tok, (ex + d, ey + 0.3), name, 0.55))
        # A bike rack with a bicycle and a motorcycle inside and a bicycle just outside.
        rc = (ex + 12.0, ey - 7.0, 1.0)
        racks[tok] = [(rc, (2.0, 6.0, 1.5), tuple(Quaternion(axis=[0, 0, 1], angle=0.7).elements))]
        for off, name in (((0.5, 0.4), "bicycle"), ((-1.0, -0.5), "motorcycle"), ((8.0, 0.0), "bicycle")):
            gt.boxes[tok].append(_box(tok, (rc[0] + off[0], rc[1] + off[1]), name))
            pred.boxes[tok].append(_box(tok, (rc[0] + off[0] + 0.1, rc[1] + off[1]), name, 0.9))
    nusc = fake_nusc(ego, racks)
    ref, md_list, gt_f, pred_f = devkit_eval(gt, pred, nusc=nusc)

    def arrays(boxes):
        a = arrays_from_evalboxes(boxes)          # raw boxes; our ego_dist from the poses
        e = np.array([ego[t] for t in a.sample_tokens])[a.sample_idx]
        d = a.translation[:, :2] - e[:, :2]
        a.ego_dist = np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2)
        return a

    rack_arr = BikeRacks([t for t in racks for _ in racks[t]], [r[0] for t in racks for r in racks[t]],
                         [r[1] for t in racks for r in racks[t]], [r[2] for t in racks for r in racks[t]])
    res = evaluate(arrays(gt), arrays(pred), MetricConfig(), racks=rack_arr)
    summaries_close(ref, res.summary, 1e-6)
    # Same surviving boxes as the devkit's filter.
    from raydn.eval.fast_eval import filter_mask
    assert filter_mask(arrays(gt), MetricConfig(), rack_arr).sum() == len(gt_f.all)
    assert filter_mask(arrays(pred), MetricConfig(), rack_arr).sum() == len(pred_f.all)
    without_racks = evaluate(arrays(gt), arrays(pred), MetricConfig())
    assert without_racks.summary["label_aps"] != res.summary["label_aps"]   # the rack filter mattered


def test_sample_order_and_alignment(make_evalboxes, devkit_eval, summaries_close):
    """Predictions whose file order differs from the GT's sample order (the tie-break follows
    the prediction file, as in the devkit)."""
    gt, pred = make_evalboxes(np.random.default_rng(8), n_samples=8, score_decimals=1)
    rev = EvalBoxes()
    for tok in reversed(pred.sample_tokens):
        rev.add_boxes(tok, pred.boxes[tok])
    ref = devkit_eval(gt, rev)[0]
    res = evaluate(arrays_from_evalboxes(gt), arrays_from_evalboxes(rev), apply_filters=False)
    summaries_close(ref, res.summary, 1e-6)


# ------------------------------------------------------------------------------------------------
# Matching internals and errors
# ------------------------------------------------------------------------------------------------

def _naive_match(gt: EvalArrays, pred: EvalArrays, order, th):
    taken, out = set(), np.full(len(pred), -1)
    for i in order:
        best, bd = None, np.inf
        for g in range(len(gt)):
            if gt.sample_idx[g] == pred.sample_idx[i] and gt.label[g] == pred.label[i] and g not in taken:
                d = np.linalg.norm(pred.translation[i, :2] - gt.translation[g, :2])
                if d < bd:
                    bd, best = d, g
        if bd < th:
            taken.add(best)
            out[i] = best
    return out


def test_greedy_match_equals_naive_loop(make_evalboxes):
    gt, pred = make_evalboxes(np.random.default_rng(4), n_samples=5, max_gt=12, max_pred=40, match_frac=0.9,
                              noise=1.5, score_decimals=1)
    g, p = arrays_from_evalboxes(gt), arrays_from_evalboxes(pred)
    from raydn.eval.fast_eval import score_order
    order = score_order(p)
    m = greedy_match(g, p, (0.5, 1.0, 2.0, 4.0), chunk_pairs=7)     # tiny chunks exercise the loop
    for t, th in enumerate((0.5, 1.0, 2.0, 4.0)):
        np.testing.assert_array_equal(m[:, t], _naive_match(g, p, order, th))
    assert (m >= 0).sum() > 10


def test_errors_are_clear():
    tok = ("a",)
    big = EvalArrays.build(tok, np.zeros(501, int), np.zeros((501, 3)), np.ones((501, 3)), np.zeros(501),
                           np.zeros((501, 2)), names=["car"] * 501, score=np.ones(501), ego_dist=np.zeros(501))
    gt = EvalArrays.empty(tok)
    with pytest.raises(DataError, match="at most 500"):
        evaluate(gt, big)
    other = EvalArrays.empty(("b",))
    with pytest.raises(DataError, match="not in the GT set"):
        evaluate(gt, other)
    with pytest.raises(DataError, match="size"):
        EvalArrays.build(tok, [0], [[0, 0, 0]], [[0, 1, 1]], [0], [[0, 0]], names=["car"], ego_dist=[1.0])
    with pytest.raises(DataError, match="unknown detection name"):
        EvalArrays.build(tok, [0], [[0, 0, 0]], [[1, 1, 1]], [0], [[0, 0]], names=["cat"], ego_dist=[1.0])
    # Missing prediction samples: strict like the devkit, or empty samples when strict=False.
    gt2 = EvalArrays.build(("a", "b"), [0, 1], np.zeros((2, 3)), np.ones((2, 3)), np.zeros(2), np.zeros((2, 2)),
                           names=["car", "car"], ego_dist=np.zeros(2), num_pts=[3, 3])
    pred = EvalArrays.build(("a",), [0], np.zeros((1, 3)), np.ones((1, 3)), np.zeros(1), np.zeros((1, 2)),
                            names=["car"], score=[0.5], ego_dist=np.zeros(1))
    with pytest.raises(DataError, match="miss samples"):
        evaluate(gt2, pred)
    s = evaluate(gt2, pred, strict=False).summary
    assert s["label_aps"]["car"][4.0] == pytest.approx((0.5 - 0.1) / 0.9 * 0 + s["label_aps"]["car"][4.0])
    assert 0.0 < s["label_aps"]["car"][4.0] < 1.0    # recall 0.5 at precision 1


def test_torch_inputs_accepted():
    import torch
    a = EvalArrays.build(("a",), torch.zeros(2, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3),
                         torch.zeros(2), torch.zeros(2, 2), labels=torch.tensor([0, 8]),
                         label_names=("car", "truck", "construction_vehicle", "bus", "trailer", "barrier",
                                      "motorcycle", "bicycle", "pedestrian", "traffic_cone"),
                         score=torch.tensor([0.5, 0.25]), ego_dist=torch.zeros(2))
    assert a.translation.dtype == np.float64
    assert [constants.DETECTION_NAMES[i] for i in a.label] == ["car", "pedestrian"]
