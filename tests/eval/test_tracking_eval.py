"""The nuScenes tracking submission (raydn.eval.tracking): golden format, clear errors for bad
files, and the devkit's tracking metric (TrackingEval) run on our submission of the synthetic world."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raydn.errors import DataError
from raydn.engine.tracking import track_detections, write_tracking_submission
from raydn.eval.tracking import build_tracking_submission, stream_flags, validate_tracking_submission
from raydn.geometry import CLASS_NAMES
from _deps import require

CAR, PED, BARRIER = (CLASS_NAMES.index(n) for n in ("car", "pedestrian", "barrier"))


def _info(token, ego_x, t_us, scene="s0"):
    return {"token": token, "lidar2ego_translation": [0.0, 0.0, 0.0], "lidar2ego_rotation": [1.0, 0.0, 0.0, 0.0],
            "ego2global_translation": [ego_x, 50.0, 0.0], "ego2global_rotation": [1.0, 0.0, 0.0, 0.0],
            "timestamp": t_us, "scene_token": scene}


def _det(rows):
    a = torch.tensor(rows, dtype=torch.float32).reshape(-1, 11)
    return {"boxes": a[:, :9], "labels": a[:, 9].long(), "scores": a[:, 10]}


def test_tracking_submission_golden_format():
    """Two frames, identity rotations, ego at (100 + 2t, 50): a car moving with the ego (one
    track), a pedestrian, a barrier (not a tracking class: left out), a new scene (new ids)."""
    infos = [_info("a", 100.0, 1_000_000), _info("b", 101.0, 1_500_000), _info("c", 500.0, 9_000_000, "s1")]
    car = [10.0, 0.0, 1.0, 4.0, 2.0, 1.5, 0.0, 2.0, 0.0, CAR]
    dets = [_det([car + [0.8], [5.0, 5.0, 0.5, 0.6, 0.7, 1.8, 0.0, 0.0, 0.0, PED, 0.6],
                  [3.0, 3.0, 0.5, 0.5, 2.0, 1.0, 0.0, 0.0, 0.0, BARRIER, 0.9]]),
            _det([[10.0, 0.0, 1.0, 4.0, 2.0, 1.5, 0.0, 2.0, 0.0, CAR, 0.7]]),
            _det([car + [0.5]])]
    ts, new = stream_flags(dets, infos)
    assert ts == pytest.approx([1.0, 1.5, 9.0]) and new == [True, False, True]
    g, ids = track_detections(dets, infos, tracker="velocity", timestamps=ts, new_sequence=new)
    assert ids.tolist() == [0, 1, -1, 0, 2]
    res = build_tracking_submission(g, ids)
    assert list(res) == ["a", "b", "c"]
    assert res["a"] == [
        {"sample_token": "a", "translation": pytest.approx([110.0, 50.0, 1.0]), "size": pytest.approx([2.0, 4.0, 1.5]),
         "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [2.0, 0.0], "tracking_id": "0",
         "tracking_name": "car", "tracking_score": pytest.approx(0.8)},
        {"sample_token": "a", "translation": pytest.approx([105.0, 55.0, 0.5]), "size": pytest.approx([0.7, 0.6, 1.8]),
         "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "tracking_id": "1",
         "tracking_name": "pedestrian", "tracking_score": pytest.approx(0.6)}]
    assert [(r["tracking_id"], r["translation"][0]) for r in res["b"]] == [("0", 111.0)]
    assert [r["tracking_id"] for r in res["c"]] == ["2"]


def test_memory_tracks_in_the_submission_follow_the_selection():
    infos = [_info("a", 0.0, 0), _info("b", 0.0, 500_000)]
    car = [10.0, 0.0, 1.0, 4.0, 2.0, 1.5, 0.0, 0.0, 0.0, CAR]
    d0, d1 = _det([car + [0.9], car + [0.8]]), _det([car + [0.9]])
    d0.update(query=torch.tensor([0, 1]), memory_index=torch.tensor([1]))
    d1.update(query=torch.tensor([2]), memory_index=torch.tensor([2]))   # query 2 = memory row 0
    g, ids = track_detections([d0, d1], infos, tracker="memory", timestamps=[0, 0.5], new_sequence=[True, False],
                              head={"num_query": 2, "num_propagated": 1, "memory_len": 2})
    assert ids.tolist() == [0, 1, 1]


def _write(path, results, meta=True):
    body = {"results": results}
    if meta:
        body["meta"] = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False,
                        "use_external": False}
    path.write_text(json.dumps(body))
    return path


def test_bad_tracking_submissions_get_clear_errors(tmp_path):
    rec = {"sample_token": "a", "translation": [1.0, 2.0, 3.0], "size": [1.0, 2.0, 1.0],
           "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "tracking_id": "3",
           "tracking_name": "car", "tracking_score": 0.5}
    ok = _write(tmp_path / "ok.json", {"a": [rec], "b": []})
    assert validate_tracking_submission(ok, ["a", "b"])["results"]["a"][0]["tracking_id"] == "3"
    cases = [({"a": [dict(rec, tracking_name="barrier")], "b": []}, "field 'tracking_name' is 'barrier'"),
             ({"a": [dict(rec, tracking_id=3)], "b": []}, "field 'tracking_id' is 3; expected a non-empty string"),
             ({"a": [{k: v for k, v in rec.items() if k != "tracking_score"}], "b": []}, r"missing field\(s\) \['tracking_score'\]"),
             ({"a": [dict(rec, tracking_score=1.5)], "b": []}, "field 'tracking_score' is 1.5"),
             ({"a": [dict(rec, size=[1.0, 0.0, 1.0])], "b": []}, "field 'size'"),
             ({"a": [rec]}, r"1 sample\(s\) of the evaluated split are missing, e.g. 'b'"),
             ({"a": [dict(rec, translation=[math.inf, 0, 0])], "b": []}, "expected finite numbers")]
    for i, (results, msg) in enumerate(cases):
        with pytest.raises(DataError, match=msg):
            validate_tracking_submission(_write(tmp_path / f"bad{i}.json", results), ["a", "b"])
    with pytest.raises(DataError, match="field 'meta'"):
        validate_tracking_submission(_write(tmp_path / "nometa.json", {"a": [rec], "b": []}, meta=False), ["a", "b"])
    with pytest.raises(DataError, match="not a JSON file"):
        (tmp_path / "x.json").write_text("{")
        validate_tracking_submission(tmp_path / "x.json", ["a"])


def test_devkit_tracking_metric_runs_on_our_submission(nusc_world, tmp_path):
    """Both trackers' submissions of the synthetic world (noisy copies of the GT + false
    positives) are accepted and scored by nuscenes-devkit's TrackingEval; the GT tracks are the
    world's instance tokens, so tracking the noisy copies finds most of them."""
    require("motmetrics")
    from raydn.eval.tracking import run_tracking_eval
    w = nusc_world
    infos = []
    for info in w.infos:  # the world's infos lack the frame time and scene: add them from the tables
        s = w.nusc.get("sample", info["token"])
        infos.append(dict(info, timestamp=s["timestamp"], scene_token=s["scene_token"]))
    path = write_tracking_submission(w.detections, infos, tmp_path / "tracking.json", tracker="velocity")
    data = json.loads(path.read_text())
    assert set(data["results"]) == set(w.samples)
    assert {r["tracking_name"] for v in data["results"].values() for r in v} <= {
        "bicycle", "bus", "car", "motorcycle", "pedestrian", "trailer", "truck"}
    summary = run_tracking_eval(path, w.root, w.version, w.eval_set, tmp_path / "out", quiet=True)
    for k in ("amota", "amotp", "mota", "recall", "ids", "frag"):
        assert k in summary
    assert 0.0 < summary["recall"] <= 1.0 and np.isfinite(summary["amotp"])
    assert (tmp_path / "out" / "tracking_metrics_summary.json").is_file()
    assert not list((tmp_path / "out").glob(".tracking-eval-*"))
    # a bad file is refused with the submission checks' message, before the devkit runs
    bad = json.loads(path.read_text())
    bad["results"].pop(w.samples[0])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="missing"):
        run_tracking_eval(tmp_path / "bad.json", w.root, w.version, w.eval_set, tmp_path / "out2", quiet=True)


def test_raydn_eval_tracking_cli(synth_world, synth_infos, tmp_path, capsys):
    """`raydn eval --tracking` (memory tracker) writes the tracking submission next to the detection
    one and scores it; `--submission FILE --tracking` re-scores it; a bad file is a clean error."""
    require("motmetrics")
    from raydn.cli import main
    from raydn.interop.convert import save_model_file
    from raydn.presets import build_model
    torch.manual_seed(0)
    save_model_file(build_model("tiny_raydn").state_dict(), tmp_path / "tiny.pt", "tiny_raydn")
    out = tmp_path / "eval"
    common = ["--data", str(synth_infos[1]["val"]), "--dataroot", str(synth_world)]
    rc = main(["eval", "--checkpoint", str(tmp_path / "tiny.pt"), *common, "--out", str(out), "--evaluator",
               "fast", "--no-plots", "--no-progress", "--workers", "0", "--device", "cpu", "--tracking"])
    assert rc == 0, capsys.readouterr().err
    sub = json.loads((out / "tracking_results_nusc.json").read_text())
    det = json.loads((out / "results_nusc.json").read_text())
    assert sub["results"].keys() == det["results"].keys()
    recs = [r for v in sub["results"].values() for r in v]
    assert recs and all(r["tracking_id"].isdigit() for r in recs)
    per_id = {}
    for r in recs:  # one id never names two boxes of one class in one sample
        key = (r["sample_token"], r["tracking_id"], r["tracking_name"])
        assert key not in per_id
        per_id[key] = r
    summary = json.loads((out / "tracking_metrics_summary.json").read_text())
    assert "amota" in summary and "ids" in summary
    assert "tracking submission" in capsys.readouterr().out
    assert main(["eval", "--submission", str(out / "tracking_results_nusc.json"), "--tracking", *common,
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tracking_metrics_summary.json").is_file()
    (tmp_path / "bad.json").write_text(json.dumps(det))                    # a detection file
    assert main(["eval", "--submission", str(tmp_path / "bad.json"), "--tracking", *common,
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "raydn eval: error:" in err and "missing field(s)" in err and "tracking_id" in err
