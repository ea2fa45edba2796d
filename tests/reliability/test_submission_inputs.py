"""Submissions scored by ``raydn eval --submission FILE --data INFOS --dataroot DIR``: a good one is
scored; a NaN score, a NaN box size, a missing sample, an unknown sample, more than 500 boxes for one
sample or an unknown class name is refused with a message naming the file, sample, record and field,
exit code 2, and nothing written (no metrics, no empty ``plots/`` folder)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from _deps import require

require("nuscenes")

from raydn.cli import main as cli_main  # noqa: E402
from raydn.data.infos import load_info_file  # noqa: E402
from raydn.errors import DataError  # noqa: E402
from raydn.eval.submission import build_submission  # noqa: E402
from raydn.geometry import CLASS_NAMES  # noqa: E402


@pytest.fixture(scope="module")
def good_results(synth_infos):
    """A submission made from the ground truth of the session world's val split."""
    infos = load_info_file(synth_infos[1]["val"])["infos"]
    dets = []
    for info in infos:
        keep = np.array([n in CLASS_NAMES for n in info["gt_names"]], dtype=bool)
        vel = np.nan_to_num(info["gt_velocity"][keep])
        boxes = np.concatenate([info["gt_boxes"][keep], vel], axis=1).astype(np.float32)
        labels = np.array([CLASS_NAMES.index(n) for n in info["gt_names"][keep]], dtype=np.int64)
        dets.append({"boxes": boxes, "scores": np.full(len(boxes), 0.9, np.float32), "labels": labels})
    results = build_submission(dets, infos)
    assert sum(len(v) for v in results.values()) > 20
    return results


def _write(folder, results):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results_nusc.json"
    meta = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}
    path.write_text(json.dumps({"meta": meta, "results": results}))
    return path


def _score(capsys, path, synth_infos, synth_world, *extra):
    rc = cli_main(["eval", "--submission", str(path), "--data", str(synth_infos[1]["val"]),
                   "--dataroot", str(synth_world), *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_good_submission_is_scored(good_results, synth_infos, synth_world, tmp_path, capsys):
    path = _write(tmp_path / "sub", good_results)
    rc, out, err = _score(capsys, path, synth_infos, synth_world, "--evaluator", "fast")
    assert rc == 0, err
    metrics = json.loads((tmp_path / "sub" / "fast_metrics_summary.json").read_text())
    assert metrics["mean_ap"] > 0.9                   # the GT scored against itself
    assert f"metrics written to {tmp_path / 'sub'}" in out


def _first(results):
    token = next(t for t, recs in results.items() if recs)
    return token, results[token]


def _nan_score(r):
    t, recs = _first(r)
    recs[1]["detection_score"] = float("nan")
    return rf"results\['{t}'\]\[1\]: field 'detection_score' is nan; expected a number in \[0, 1\]"


def _nan_size(r):
    t, recs = _first(r)
    recs[0]["size"][2] = float("nan")
    return rf"results\['{t}'\]\[0\]: field 'size' is \[.*nan\]; expected finite numbers"


def _missing_sample(r):
    t = sorted(r)[2]
    del r[t]
    return rf"1 sample\(s\) of the evaluated split are missing, e.g. '{t}'"


def _unknown_sample(r):
    t, recs = _first(r)
    r["not-a-sample-token"] = [dict(recs[0], sample_token="not-a-sample-token")]
    return r"1 sample\(s\) are not in the evaluated split, e.g. 'not-a-sample-token'"


def _too_many(r):
    t, recs = _first(r)
    r[t] = [copy.deepcopy(recs[0]) for _ in range(501)]
    return rf"sample '{t}' has 501 boxes; at most 500 are allowed"


def _unknown_class(r):
    t, recs = _first(r)
    recs[2]["detection_name"] = "spaceship"
    return rf"results\['{t}'\]\[2\]: field 'detection_name' is 'spaceship'; expected one of car, truck"


@pytest.mark.parametrize("damage", [_nan_score, _nan_size, _missing_sample, _unknown_sample, _too_many,
                                    _unknown_class], ids=lambda f: f.__name__.strip("_"))
def test_bad_submission_is_refused_and_nothing_is_written(good_results, synth_infos, synth_world, tmp_path,
                                                          capsys, damage):
    results = copy.deepcopy(good_results)
    pattern = damage(results)
    path = _write(tmp_path / "sub", results)
    rc, _, err = _score(capsys, path, synth_infos, synth_world)      # the devkit evaluator (writes plots)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    import re
    assert re.search(pattern, err) and str(path) in err, err
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["results_nusc.json"]


def test_devkit_rejection_leaves_no_empty_plots_folder(good_results, synth_world, tmp_path):
    """Past our checks, a file the devkit still rejects (here: scored against another split) is a
    DataError and DetectionEval's freshly made plots/ folder is removed again."""
    from raydn.eval.devkit import run_devkit_eval
    path = _write(tmp_path / "sub", good_results)
    out = tmp_path / "metrics"
    with pytest.raises(DataError, match="rejected by the nuScenes devkit"):
        run_devkit_eval(path, synth_world, "v1.0-mini", "mini_train", out, plots=True, quiet=True)
    assert not (out / "plots").exists()


def _to_ego_frame(results, infos):
    """The same boxes moved from the global frame into each sample's ego (vehicle) frame."""
    from raydn.core.frames import quat_to_matrix
    poses = {r["token"]: (np.asarray(r["ego2global_translation"], np.float64),
                          quat_to_matrix(r["ego2global_rotation"])) for r in infos}
    out = copy.deepcopy(results)
    for token, recs in out.items():
        t, R = poses[token]
        for rec in recs:
            rec["translation"] = (R.T @ (np.asarray(rec["translation"]) - t)).tolist()
    return out


def test_submission_in_the_ego_frame_is_refused_with_the_reason(good_results, synth_infos, synth_world,
                                                                tmp_path, capsys):
    """GT boxes converted to the ego frame would score mAP 0 / NDS 0 with no hint: refused, naming the
    frame; nothing written."""
    infos = load_info_file(synth_infos[1]["val"])["infos"]
    path = _write(tmp_path / "sub", _to_ego_frame(good_results, infos))
    rc, _, err = _score(capsys, path, synth_infos, synth_world, "--evaluator", "fast")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and "boxes look like they are in the ego (vehicle/LiDAR) frame" in err
    assert "nuScenes submissions are in the global frame" in err and "mAP 0, NDS 0" in err
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["results_nusc.json"]


def test_frame_check_accepts_global_boxes_and_needs_egos_away_from_the_origin(good_results, synth_infos, tmp_path):
    from raydn.eval.validate_submission import check_global_frame
    infos = load_info_file(synth_infos[1]["val"])["infos"]
    ego = {r["token"]: r["ego2global_translation"] for r in infos}
    check_global_frame("sub.json", good_results, ego)              # the global frame: accepted
    ego_frame = _to_ego_frame(good_results, infos)
    with pytest.raises(DataError, match="sub.json: boxes look like they are in the ego"):
        check_global_frame("sub.json", ego_frame, ego)
    # egos near the origin: the two frames cannot be told apart, nothing is claimed
    check_global_frame("sub.json", ego_frame, {t: [10.0, 20.0, 0.0] for t in ego})


def test_submission_file_larger_than_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import raydn.limits
    from raydn.eval.validate_submission import validate_submission
    path = tmp_path / "results_nusc.json"
    path.write_text(json.dumps({"meta": {}, "results": {}}) + " " * 4096)
    monkeypatch.setattr(raydn.limits, "MAX_SUBMISSION_FILE_BYTES", 2048)
    with pytest.raises(DataError, match=r"results_nusc\.json: submission file of 4\.\d KiB is larger than the limit"):
        validate_submission(path, [])
