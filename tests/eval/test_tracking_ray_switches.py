"""ID switches of ground-truth tracks with duplicates along their camera rays (issue 19, step 5):
golden counts on a hand-built sequence, worked out by hand."""
import json

import numpy as np
import pytest
import torch

from raydn.errors import DataError
from raydn.eval.tracking import annotation_instances, id_switches_along_rays
from raydn.geometry import CAMERA_NAMES

# the forward-looking camera of test_ray_duplicates: camera z = LiDAR x, camera x = -y, camera y = -z
_R_C2L = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
_K = np.array([[1000.0, 0.0, 800.0], [0.0, 1000.0, 450.0], [0.0, 0.0, 1.0]])
CAR, PED, BARRIER = 0, 8, 5


def _info(token, gt_xyz, names):
    cam = {"sensor2lidar_rotation": _R_C2L, "sensor2lidar_translation": np.zeros(3), "cam_intrinsic": _K}
    boxes = np.array([[*c, 4.0, 2.0, 1.5, 0.0] for c in gt_xyz]).reshape(-1, 7)
    return {"token": token, "cams": {c: cam for c in CAMERA_NAMES}, "gt_boxes": boxes, "gt_names": np.array(names)}


def _det(xyz, labels, scores):
    b = np.zeros((len(xyz), 9), np.float32)
    b[:, :3] = np.asarray(xyz, np.float32).reshape(-1, 3)
    b[:, 3:6] = (4.0, 2.0, 1.5)
    return {"boxes": torch.from_numpy(b), "labels": torch.tensor(labels, dtype=torch.long),
            "scores": torch.tensor(scores)}


def _sequence():
    """Four frames. GT tracks: car A at 20 m ahead (annotation 0), pedestrian B at (10, 8)
    (annotation 1), a barrier (annotation 2: not a tracking class).

    frame 0: A -> track 1, B -> track 2
    frame 1: A -> track 1, plus a car 9 m deeper on A's ray (track 3): A has a ray duplicate; B -> 2
    frame 2: A -> track 3 (switch of A), B -> track 4 (switch of B), the barrier detected (ignored)
    frame 3: A missed (its detection is not reported, id -1), B -> track 2 (switch of B);
             a low-score car on A's ray (0.2 < 0.3: neither matched nor a duplicate)
    frame 4 (= frame 3 again): A -> track 3: no switch (the last matched id was 3)
    """
    gt = [(20.0, 0.0, 0.0), (10.0, 8.0, 0.0), (15.0, -6.0, 0.0)]
    names = ["car", "pedestrian", "barrier"]
    infos = [_info(f"s{i}", gt, names) for i in range(5)]
    dets = [_det([(20.1, 0.0, 0.0), (10.0, 8.1, 0.0)], [CAR, PED], [0.9, 0.8]),
            _det([(20.1, 0.0, 0.0), (29.0, 0.05, 0.0), (10.0, 8.1, 0.0)], [CAR, CAR, PED], [0.9, 0.7, 0.8]),
            _det([(20.1, 0.0, 0.0), (10.0, 8.1, 0.0), (15.0, -6.0, 0.0)], [CAR, PED, BARRIER], [0.9, 0.8, 0.9]),
            _det([(20.1, 0.0, 0.0), (10.0, 8.1, 0.0), (26.0, 0.0, 0.0)], [CAR, PED, CAR], [0.9, 0.8, 0.2]),
            _det([(20.1, 0.0, 0.0)], [CAR], [0.9])]
    ids = np.array([1, 2,  1, 3, 2,  3, 4, 7,  -1, 2, 5,  3])
    instances = {f"s{i}": ["inst-A", "inst-B", "inst-barrier"] for i in range(5)}
    return dets, infos, ids, instances


def test_golden_sequence():
    dets, infos, ids, instances = _sequence()
    r = id_switches_along_rays(dets, infos, ids, instances)
    # A: 1, 1, 3 (switch), -, 3 -> 1 switch; B: 2, 2, 4 (switch), 2 (switch), - -> 2 switches
    assert r["id_switches"] == 3
    assert r["tracks"] == 2                       # the barrier is not a tracking class
    assert r["ray_duplicate_tracks"] == 1         # A only (frame 1)
    assert r["ray_duplicate_id_switches"] == 1    # A's switch
    assert r["ray_duplicate_frames"] == 1
    assert r["config"]["score_threshold"] == 0.3


def test_duplicate_below_threshold_or_other_class_does_not_flag():
    dets, infos, ids, instances = _sequence()
    dets[1]["scores"][1] = 0.25                   # the frame-1 duplicate falls under the threshold
    r = id_switches_along_rays(dets, infos, ids, instances)
    assert (r["ray_duplicate_tracks"], r["ray_duplicate_id_switches"], r["id_switches"]) == (0, 0, 3)
    dets, infos, ids, instances = _sequence()
    dets[1]["labels"][1] = PED                    # a pedestrian on the car's ray: another class
    r = id_switches_along_rays(dets, infos, ids, instances)
    assert r["ray_duplicate_tracks"] == 0


def test_unreported_detections_are_not_matched():
    dets, infos, ids, instances = _sequence()
    ids = ids.copy()
    ids[5] = -1                                   # frame 2: A's detection not reported...
    r = id_switches_along_rays(dets, infos, ids, instances)
    assert r["id_switches"] == 3                  # ...A still switches at frame 4 (1 -> 3)
    ids[11] = 1                                   # A back as track 1 at frame 4: no switch of A
    r = id_switches_along_rays(dets, infos, ids, instances)
    assert r["id_switches"] == 2 and r["ray_duplicate_id_switches"] == 0


def test_a_track_still_on_its_object_keeps_it_clear_mot():
    """Frame 1 has a second car detection 0.5 m from A with a higher score and a new id (9): the
    greedy score order would hand A to it (a switch); CLEAR MOT keeps A's previous track 1, still
    within 2 m, so A does not switch there."""
    dets, infos, ids, instances = _sequence()
    dets[1] = _det([(20.1, 0.0, 0.0), (29.0, 0.05, 0.0), (10.0, 8.1, 0.0), (20.5, 0.3, 0.0)],
                   [CAR, CAR, PED, CAR], [0.9, 0.7, 0.8, 0.95])
    ids = np.array([1, 2,  1, 3, 2, 9,  3, 4, 7,  -1, 2, 5,  3])
    r = id_switches_along_rays(dets, infos, ids, instances)
    assert r["id_switches"] == 3                  # as in the golden sequence
    ids[2] = -1                                   # track 1 not reported in frame 1: A goes to 9 (switch)
    r = id_switches_along_rays(dets, infos, ids, instances)
    assert r["id_switches"] == 4                  # 1 -> 9 (frame 1), 9 -> 3 (frame 2), B's two


def test_mismatched_ids_and_unknown_sample_are_clear_errors():
    dets, infos, ids, instances = _sequence()
    with pytest.raises(DataError, match="track ids"):
        id_switches_along_rays(dets, infos, ids[:-1], instances)
    with pytest.raises(DataError, match="s0: not in the annotation table"):
        id_switches_along_rays(dets, infos, ids, {})


def test_annotation_instances_follow_the_table_order(tmp_path):
    d = tmp_path / "v1.0-mini"
    d.mkdir()
    rows = [{"token": "a0", "sample_token": "s0", "instance_token": "i1"},
            {"token": "a1", "sample_token": "s1", "instance_token": "i1"},
            {"token": "a2", "sample_token": "s0", "instance_token": "i2"}]
    (d / "sample_annotation.json").write_text(json.dumps(rows))
    assert annotation_instances(tmp_path, "v1.0-mini") == {"s0": ["i1", "i2"], "s1": ["i1"]}
    with pytest.raises(DataError, match="no such file"):
        annotation_instances(tmp_path, "v1.0-trainval")
