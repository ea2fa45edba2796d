"""Golden tests of the two trackers (raydn.engine.tracking) on hand-built sequences: a crossing, an
occlusion gap, a birth and a death, resets; ids worked out by hand from the documented rules."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raydn.engine.tracking import (CENTERPOINT_MAX_DIST, MemoryTracker, TrackFrame, VelocityTracker,
                                   build_tracker, greedy_assignment)
from raydn.errors import RaydnError
from raydn.geometry import CLASS_NAMES

CAR, TRUCK, PED, BARRIER = (CLASS_NAMES.index(n) for n in ("car", "truck", "pedestrian", "barrier"))


def _mem(tr, new, q, s, m):
    return tr.step(TrackFrame(new, 0.0, np.zeros(len(q), np.int64), np.array(s, float),
                              decode_index=np.array(q, np.int64), memory_index=np.array(m, np.int64))).tolist()


def test_memory_tracker_birth_survival_gap_crossing_death_reset():
    """Q=3 learnable queries (0..2), P=2 propagated (3, 4 = memory rows 0, 1), M=3 rows, K=2
    written per frame; birth at score >= 0.5, kept while >= 0.3."""
    tr = MemoryTracker(num_query=3, num_propagated=2, memory_len=3, birth_score=0.5, keep_score=0.3)
    # frame 0: query 1 (0.9) is born as track 0; query 2 (0.2) gets memory id 1 but is not a track yet
    assert _mem(tr, True, [1, 2], [0.9, 0.2], [1, 2]) == [0, -1]
    assert tr.memory_ids.tolist() == [0, 1, -1]
    # frame 1: both propagated; track 0 is kept at 0.4 (>= keep), id 1 is born at 0.6; the memory
    # writes them in the other order (a crossing in score): ids follow the rows, not the order
    assert _mem(tr, False, [3, 4], [0.4, 0.6], [4, 3]) == [0, 1]
    assert tr.memory_ids.tolist() == [1, 0, 0]
    # frame 2: occlusion: track 0 (query 4 = row 1) scores 0.1: not reported, but re-inserted;
    # a new object on learnable query 0 is born as track 2
    assert _mem(tr, False, [4, 0], [0.1, 0.8], [4, 0]) == [-1, 2]
    assert tr.memory_ids.tolist() == [0, 2, 1]
    # frame 3: the gap ends: track 0 is reported again with its id; tracks 1 and 2 are not
    # re-inserted and fall off the M=3 rows: dead. Learnable query 1 is written (new id 3).
    assert _mem(tr, False, [3], [0.7], [3, 1]) == [0]
    assert tr.memory_ids.tolist() == [0, 3, 0]
    assert 1 not in tr.memory_ids and 2 not in tr.memory_ids
    # frame 4: id 3 is born at 0.9 (from row 1)
    assert _mem(tr, False, [4, 3], [0.9, 0.9], [4, 3]) == [3, 0]
    # frame 5: a reset forgets every row: new ids in query order (query 0 -> 4, query 3 -> 5)
    assert _mem(tr, True, [3], [0.9], [3, 0]) == [5]
    assert tr.memory_ids.tolist() == [5, 4, -1]


def test_memory_tracker_defaults_report_every_detection_and_refuse_a_foreign_selection():
    tr = build_tracker("memory", head={"num_query": 2, "num_propagated": 1, "memory_len": 2})
    assert _mem(tr, True, [0, 1], [0.01, 0.02], [1]) == [0, 1]
    assert _mem(tr, False, [2, 2], [0.5, 0.4], [2]) == [1, 1]        # one query, two classes: one id
    with pytest.raises(ValueError, match="out of step"):
        _mem(tr, False, [7], [0.5], [0])
    with pytest.raises(ValueError, match="no model selection"):
        tr.step(TrackFrame(False, 0.0, np.zeros(1, np.int64), np.ones(1)))
    with pytest.raises(RaydnError, match="unknown tracker 'kalman'"):
        build_tracker("kalman")


def _vel_frame(t, dets, new=False):
    """dets: (label, score, x, y, vx, vy)."""
    a = np.array(dets, dtype=float).reshape(-1, 6)
    return TrackFrame(new, t, a[:, 0].astype(np.int64), a[:, 1], a[:, 2:4], a[:, 4:6])


def test_velocity_tracker_crossing_gap_birth_death_and_class_gates():
    """Cars A and B cross (4 m/s towards each other, 0.5 m apart at frame 2); pedestrian P is
    missed for 2 frames (kept: max_age 3), pedestrian Q for 3 (dropped: a new id); a truck is
    born at frame 2; a car at P's spot is not P (class gate); barriers are not tracked."""
    tr = VelocityTracker(CLASS_NAMES, max_age=3)
    dt = 0.5
    A = lambda k: (CAR, 0.8, -4 + 4 * dt * k, 0.0, 4.0, 0.0)          # noqa: E731
    B = lambda k: (CAR, 0.9, 4 - 4 * dt * k, 0.5, -4.0, 0.0)          # noqa: E731
    P = (PED, 0.7, 10.0, 10.0, 0.0, 0.0)
    Q = (PED, 0.6, 20.0, 20.0, 0.0, 0.0)
    T = (TRUCK, 0.75, -20.0, 5.0, 0.0, 0.0)
    got = [tr.step(_vel_frame(0.0, [B(0), A(0), P, Q, (BARRIER, 0.5, 5, 5, 0, 0)], new=True)).tolist(),
           tr.step(_vel_frame(0.5, [B(1), A(1), P, (CAR, 0.65, 10.0, 10.0, 0, 0)])).tolist(),
           tr.step(_vel_frame(1.0, [B(2), A(2), T])).tolist(),
           tr.step(_vel_frame(1.5, [A(3), B(3), T])).tolist(),    # input order is not score order
           tr.step(_vel_frame(2.0, [B(4), A(4), T, P, Q])).tolist(),
           tr.step(_vel_frame(2.5, [A(5)], new=True)).tolist()]
    assert got == [[0, 1, 2, 3, -1],
                   [0, 1, 2, 4],
                   [0, 1, 5],
                   [1, 0, 5],
                   [0, 1, 5, 2, 6],
                   [7]]


def test_velocity_tracker_gates_are_centerpoints_and_matching_is_greedy_by_score():
    assert CENTERPOINT_MAX_DIST == {"car": 4.0, "truck": 4.0, "bus": 5.5, "trailer": 3.0,
                                    "pedestrian": 1.0, "motorcycle": 13.0, "bicycle": 3.0}
    tr = VelocityTracker(CLASS_NAMES)
    tr.step(_vel_frame(0.0, [(PED, 0.9, 0.0, 0.0, 0, 0)], new=True))
    # 1.2 m away (beyond the pedestrian gate of 1 m): a new track; 0.9 m: the same one
    assert tr.step(_vel_frame(0.5, [(PED, 0.9, 1.2, 0.0, 0, 0)])).tolist() == [1]
    assert tr.step(_vel_frame(1.0, [(PED, 0.9, 1.2, 0.9, 0, 0)])).tolist() == [1]
    # greedy: the higher score takes the nearest track, the other starts a new one
    d = np.array([[1.0, 3.0], [0.5, 2.0]])
    assert greedy_assignment(d, np.ones_like(d, bool)).tolist() == [0, 1]
    assert greedy_assignment(d, np.array([[True, False], [True, False]])).tolist() == [0, -1]
    assert greedy_assignment(np.zeros((2, 0)), np.zeros((2, 0), bool)).tolist() == [-1, -1]


def test_bev_draws_boxes_in_track_colours_and_the_track_paths():
    import torch

    from raydn.viz.render import TrackPaths, render_bev, track_color
    paths = TrackPaths(length=5, forget=2)
    for k in range(4):  # a track moving +2 m/frame in x (world = vehicle frame here)
        paths.update(k == 0, [7, None], [(2.0 * k, 10.0), (0.0, 0.0)])
    tracks = paths.in_frame([7, None], torch.eye(4, dtype=torch.float64))
    assert list(tracks["paths"]) == [7]
    np.testing.assert_allclose(tracks["paths"][7], [[0, 10], [2, 10], [4, 10], [6, 10]])
    boxes = torch.tensor([[6.0, 10.0, 0, 4, 2, 1.5, 0, 0, 0], [-20.0, -20.0, 0, 4, 2, 1.5, 0, 0, 0]])
    im = np.asarray(render_bev(boxes, torch.tensor([CAR, CAR]), pred_ids=[7, None], paths=tracks["paths"],
                               extent=50.0, size=500))
    px = lambda x, y: im[int(round(250 - 5 * x)), int(round(250 - 5 * y))]   # noqa: E731  (row, col)
    assert tuple(px(2.0, 10.0)) == track_color(7)                     # on the path, behind the box
    assert track_color(7) != track_color(8)
    # the untracked box keeps its class colour; the track's colour is nowhere near it
    from raydn.viz.render import CLASS_COLORS
    patch = im[345:356, 345:356].reshape(-1, 3)
    assert (patch == CLASS_COLORS[CAR]).all(1).any() and not (patch == track_color(7)).all(1).any()
    # a track not seen for `forget` frames is forgotten; a new sequence forgets everything
    paths.update(False, [None], [(0.0, 0.0)])
    paths.update(False, [None], [(0.0, 0.0)])
    assert paths.points == {}


def test_infer_stream_writes_the_chosen_trackers_ids(synth_infos, tmp_path):
    """`run_stream(tracker=...)` on a synthetic scene: memory ids on every detection; velocity
    ids only on the seven tracking classes; pictures drawn with tracks."""
    from dataclasses import replace

    import torch

    from raydn.data.infos import load_info_file
    from raydn.data.own_cameras import CameraRigFrames, load_camera_rig, rig_dict_from_infos, write_rig_file
    from raydn.engine.stream import TorchBackend, run_stream
    from raydn.eval.constants import TRACKING_NAMES
    from raydn.presets import build_model, get_preset
    torch.manual_seed(0)
    aug = replace(get_preset("tiny_raydn").train.aug, training=False)
    records = load_info_file(synth_infos[1]["val"])["infos"]
    frames = CameraRigFrames(load_camera_rig(write_rig_file(rig_dict_from_infos(records), tmp_path / "rig.json")), aug)
    backend = TorchBackend(build_model("tiny_raydn").eval())
    out = {}
    for kind in ("memory", "velocity"):
        out[kind] = tmp_path / f"{kind}.jsonl"
        rep = run_stream(backend, frames, out=out[kind], score_thr=0.0, progress=False, tracker=kind, limit=4,
                         render_dir=tmp_path / kind if kind == "velocity" else None, aug=aug)
        assert rep.ids and rep.frames == 4
    recs = {k: [json.loads(s) for s in p.read_text().splitlines()] for k, p in out.items()}
    for fm, fv in zip(recs["memory"], recs["velocity"]):
        assert [d["box"] for d in fm["detections"]] == [d["box"] for d in fv["detections"]]
        assert all(isinstance(d["id"], int) for d in fm["detections"])
        for d in fv["detections"]:
            assert (d["id"] is not None) == (d["name"] in TRACKING_NAMES)
    ids = [{d["id"] for d in f["detections"] if d["id"] is not None} for f in recs["velocity"]]
    assert ids[0] and ids[1] & ids[0]                                  # velocity tracks carried on
    assert len(list((tmp_path / "velocity").glob("*.png"))) == 4
