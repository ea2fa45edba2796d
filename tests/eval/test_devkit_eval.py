"""End to end on a tiny synthetic nuScenes dataroot: decoded detections -> submission JSON ->
official ``DetectionEval`` (``run_devkit_eval``) and our fast evaluator (GT from the devkit and
GT from info records) agree to 1e-6."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _deps import require

require("nuscenes")

from raydn.errors import DataError  # noqa: E402
from raydn.eval.devkit import fast_eval_results_file, run_devkit_eval  # noqa: E402
from raydn.eval.fast_eval import evaluate  # noqa: E402
from raydn.eval.gt import gt_from_infos, gt_from_nusc  # noqa: E402
from raydn.eval.submission import build_submission, detections_to_global, load_results_arrays, write_results_json  # noqa: E402


@pytest.fixture(scope="module")
def devkit_run(nusc_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("devkit_out")
    path = write_results_json(out / "results.json", build_submission(nusc_world.detections, nusc_world.infos))
    summary = run_devkit_eval(path, nusc_world.root, nusc_world.version, nusc_world.eval_set, out / "metrics",
                              plots=True, nusc=nusc_world.nusc)
    return path, out / "metrics", summary


def test_devkit_eval_outputs(devkit_run, capsys):
    path, out, summary = devkit_run
    assert 0.2 < summary["mean_ap"] < 1.0 and 0.2 < summary["nd_score"] < 1.0     # meaningful numbers
    with open(out / "metrics_summary.json") as f:
        saved = json.load(f)
    assert saved["nd_score"] == pytest.approx(summary["nd_score"])
    assert os.path.isfile(out / "metrics_details.json")
    plots = os.listdir(out / "plots")
    assert "summary.pdf" in plots and "car_pr.pdf" in plots and "dist_pr_2.0.pdf" in plots


def test_devkit_eval_prints_table(nusc_world, devkit_run, tmp_path, capsys):
    path, _, summary = devkit_run
    again = run_devkit_eval(path, nusc_world.root, nusc_world.version, nusc_world.eval_set, tmp_path, plots=False,
                            nusc=nusc_world.nusc)
    text = capsys.readouterr().out
    for key in ("mAP:", "mATE:", "mASE:", "mAOE:", "mAVE:", "mAAE:", "NDS:", "Per-class results:", "traffic_cone"):
        assert key in text
    assert f"NDS: {summary['nd_score']:.4f}" in text
    assert again["nd_score"] == summary["nd_score"]
    assert not os.path.exists(tmp_path / "plots" / "summary.pdf")


def test_fast_eval_equals_devkit_end_to_end(nusc_world, devkit_run, summaries_close):
    path, _, summary = devkit_run
    gt, racks, ego = gt_from_nusc(nusc_world.nusc, nusc_world.eval_set)
    assert len(racks.sample_token) == 3 * len(nusc_world.samples)    # two random racks + one with bicycles
    pred = load_results_arrays(path, ego)
    res = evaluate(gt, pred, racks=racks)
    summaries_close(summary, res.summary, 1e-6)
    # The bike-rack filter changed the result (it is exercised).
    assert evaluate(gt, pred).summary["label_aps"]["bicycle"] != res.summary["label_aps"]["bicycle"]
    one_call = fast_eval_results_file(path, nusc_world.root, nusc_world.version, nusc_world.eval_set,
                                      nusc=nusc_world.nusc)
    summaries_close(summary, one_call.summary, 1e-6)


def test_fast_eval_from_infos_equals_devkit(nusc_world, devkit_run, summaries_close):
    """GT from info records (LiDAR frame -> global) and predictions straight from the detections,
    no JSON, no devkit."""
    _, _, summary = devkit_run
    gt, racks, ego = gt_from_infos(nusc_world.infos)
    pred = detections_to_global(nusc_world.detections, nusc_world.infos).to_eval_arrays()
    res = evaluate(gt, pred, racks=racks)
    summaries_close(summary, res.summary, 1e-6)


def test_info_gt_matches_devkit_gt(nusc_world):
    a, racks_a, _ = gt_from_infos(nusc_world.infos)
    b, racks_b, _ = gt_from_nusc(nusc_world.nusc, nusc_world.eval_set)
    assert a.sample_tokens == b.sample_tokens and len(a) == len(b)
    for f in ("translation", "size", "velocity", "ego_dist"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=0, atol=1e-9, err_msg=f)
    np.testing.assert_allclose(np.cos(a.yaw - b.yaw), 1.0, atol=1e-12)
    for f in ("sample_idx", "label", "attribute", "num_pts"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    np.testing.assert_allclose(racks_a.translation, racks_b.translation, atol=1e-9)


def test_devkit_eval_errors(nusc_world, tmp_path):
    with pytest.raises(DataError, match="not found"):
        run_devkit_eval(tmp_path / "missing.json", nusc_world.root, nusc_world.version, "mini_val", tmp_path)
    partial = write_results_json(tmp_path / "partial.json", {nusc_world.samples[0]: []})
    with pytest.raises(DataError, match="rejected by the nuScenes devkit"):
        run_devkit_eval(partial, nusc_world.root, nusc_world.version, "mini_val", tmp_path, nusc=nusc_world.nusc,
                        quiet=True)
    with pytest.raises(DataError, match="tables not found"):
        run_devkit_eval(partial, tmp_path, "v1.0-mini", "mini_val", tmp_path)
