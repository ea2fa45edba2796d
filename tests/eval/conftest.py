"""Test worlds for the evaluation tests.

* ``make_evalboxes``: random devkit ``EvalBoxes`` (GT + predictions) of many kinds, fast.
* ``devkit_eval``: the devkit's own ``DetectionEval.evaluate`` (and optionally its
  ``add_center_dist`` + ``filter_eval_boxes``) run on EvalBoxes with a stand-in ``nusc``.
* ``nusc_world`` (session): a tiny synthetic nuScenes dataroot (``v1.0-mini``, the two
  ``mini_val`` scenes) that the official ``NuScenesEval`` accepts (pattern of
  ``shared/reference/ecosystem.md`` Appendix B), with a rotated LiDAR, turning ego, bike racks with
  bicycles inside, zero-point boxes and boxes beyond the class ranges; plus info records in the
  official layout and LiDAR-frame "detections" derived from the GT.
"""
from __future__ import annotations

import copy
import json
import os
import types
import uuid

import numpy as np
import pytest

from raydn.eval.constants import DETECTION_NAMES
from _deps import require

# nuscenes-devkit / pyquaternion are optional: imported lazily, tests that need them skip (fail under CI).


def _devkit():
    require("nuscenes")
    from nuscenes.eval.common.data_classes import EvalBoxes
    from nuscenes.eval.detection.data_classes import DetectionBox
    from nuscenes.eval.detection.utils import detection_name_to_rel_attributes
    return EvalBoxes, DetectionBox, detection_name_to_rel_attributes


def _quat(yaw: float) -> tuple:
    from pyquaternion import Quaternion
    return tuple(Quaternion(axis=[0, 0, 1], angle=float(yaw)).elements.tolist())


def _random_evalboxes(rng, n_samples=12, max_gt=15, max_pred=40, *, match_frac=0.6, noise=1.0,
                      score_decimals=None, classes=DETECTION_NAMES, pred_classes=None,
                      nan_vel_frac=0.1, zero_pts_frac=0.1, extent=45.0):
    """Random GT and predictions; predictions near GT (class kept 90 %) or random."""
    from pyquaternion import Quaternion
    EvalBoxes, DetectionBox, detection_name_to_rel_attributes = _devkit()
    pred_classes = classes if pred_classes is None else pred_classes
    gt, pred = EvalBoxes(), EvalBoxes()
    for s in range(n_samples):
        tok = f"sample{s:04d}"
        gl = []
        for _ in range(int(rng.integers(0, max_gt + 1))):
            c = classes[int(rng.integers(len(classes)))]
            rel = detection_name_to_rel_attributes(c)
            attr = rel[int(rng.integers(len(rel)))] if rel and rng.random() < 0.9 else ""
            tr = tuple(rng.uniform(-extent, extent, 2).tolist()) + (float(rng.uniform(0, 2)),)
            vel = (np.nan, np.nan) if rng.random() < nan_vel_frac else tuple(rng.normal(0, 3, 2).tolist())
            gl.append(DetectionBox(tok, tr, tuple(rng.uniform(0.3, 5, 3).tolist()), _quat(rng.uniform(-4, 4)), vel,
                                   ego_translation=tr, num_pts=0 if rng.random() < zero_pts_frac else int(rng.integers(1, 50)),
                                   detection_name=c, attribute_name=attr))
        gt.add_boxes(tok, gl)
        pl = []
        for _ in range(int(rng.integers(0, max_pred + 1))):
            if gl and rng.random() < match_frac:
                g = gl[int(rng.integers(len(gl)))]
                c = g.detection_name if (rng.random() < 0.9 and g.detection_name in pred_classes) \
                    else pred_classes[int(rng.integers(len(pred_classes)))]
                tr = tuple((np.asarray(g.translation) + rng.normal(0, noise, 3)).tolist())
                size = tuple((np.asarray(g.size) * rng.uniform(0.7, 1.3, 3)).tolist())
                rot = _quat(Quaternion(g.rotation).yaw_pitch_roll[0] + rng.normal(0, 0.5))
            else:
                c = pred_classes[int(rng.integers(len(pred_classes)))]
                tr = tuple(rng.uniform(-extent, extent, 2).tolist()) + (1.0,)
                size = tuple(rng.uniform(0.3, 5, 3).tolist())
                rot = _quat(rng.uniform(-4, 4))
            rel = detection_name_to_rel_attributes(c)
            attr = rel[int(rng.integers(len(rel)))] if rel else ""
            score = float(rng.random())
            if score_decimals is not None:
                score = float(np.round(score, score_decimals))
            pl.append(DetectionBox(tok, tr, size, rot, tuple(rng.normal(0, 3, 2).tolist()), ego_translation=tr,
                                   detection_name=c, detection_score=score, attribute_name=attr))
        pred.add_boxes(tok, pl)
    return gt, pred


@pytest.fixture(scope="session")
def make_evalboxes():
    return _random_evalboxes


class FakeNusc:
    """The few ``nusc.get`` lookups of ``add_center_dist`` / ``filter_eval_boxes``."""

    def __init__(self, ego: dict, racks: dict):
        self.tables = {"sample": {}, "sample_data": {}, "ego_pose": {}, "sample_annotation": {}}
        for tok, pos in ego.items():
            anns = []
            for k, (t, s, r) in enumerate(racks.get(tok, [])):
                a = f"{tok}-rack{k}"
                self.tables["sample_annotation"][a] = {"category_name": "static_object.bicycle_rack",
                                                       "translation": list(t), "size": list(s), "rotation": list(r)}
                anns.append(a)
            self.tables["sample"][tok] = {"data": {"LIDAR_TOP": tok + "-sd"}, "anns": anns}
            self.tables["sample_data"][tok + "-sd"] = {"ego_pose_token": tok + "-ep"}
            self.tables["ego_pose"][tok + "-ep"] = {"translation": list(pos)}

    def get(self, table, token):
        return self.tables[table][token]


def _devkit_eval(gt, pred, cfg=None, *, nusc=None):
    """The devkit's metric on EvalBoxes. With ``nusc`` (a FakeNusc): ``add_center_dist`` and
    ``filter_eval_boxes`` first, exactly as ``DetectionEval.__init__``."""
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes
    from nuscenes.eval.detection.evaluate import DetectionEval

    cfg = cfg or config_factory("detection_cvpr_2019")
    gt, pred = copy.deepcopy(gt), copy.deepcopy(pred)
    if nusc is not None:
        pred = filter_eval_boxes(nusc, add_center_dist(nusc, pred), cfg.class_range)
        gt = filter_eval_boxes(nusc, add_center_dist(nusc, gt), cfg.class_range)
    self = types.SimpleNamespace(cfg=cfg, gt_boxes=gt, pred_boxes=pred, verbose=False)
    metrics, md_list = DetectionEval.evaluate(self)
    return metrics.serialize(), md_list, gt, pred


@pytest.fixture(scope="session")
def devkit_eval():
    return _devkit_eval


@pytest.fixture(scope="session")
def fake_nusc():
    return FakeNusc


def assert_summaries_close(ref: dict, ours: dict, tol: float = 1e-6):
    """NDS, mAP, every per-class AP and TP error, the mean TP errors (NaN == NaN)."""
    assert abs(ref["nd_score"] - ours["nd_score"]) <= tol, (ref["nd_score"], ours["nd_score"])
    assert abs(ref["mean_ap"] - ours["mean_ap"]) <= tol
    for c, d in ref["label_aps"].items():
        for th, ap in d.items():
            assert abs(ap - ours["label_aps"][c][float(th)]) <= tol, (c, th, ap, ours["label_aps"][c][float(th)])
    for c, d in ref["label_tp_errors"].items():
        for m, v in d.items():
            o = ours["label_tp_errors"][c][m]
            assert (np.isnan(v) and np.isnan(o)) or abs(v - o) <= tol, (c, m, v, o)
    for m, v in ref["tp_errors"].items():
        assert abs(v - ours["tp_errors"][m]) <= tol, (m, v, ours["tp_errors"][m])


@pytest.fixture(scope="session")
def summaries_close():
    return assert_summaries_close


# ------------------------------------------------------------------------------------------------
# Synthetic dataroot
# ------------------------------------------------------------------------------------------------

WORLD_CATEGORIES = {
    "vehicle.car": "car", "vehicle.truck": "truck", "human.pedestrian.adult": "pedestrian",
    "movable_object.barrier": "barrier", "movable_object.trafficcone": "traffic_cone",
    "vehicle.bicycle": "bicycle", "vehicle.motorcycle": "motorcycle",
    "static_object.bicycle_rack": None, "animal": None,
}
LIDAR_T = [0.94, 0.0, 1.84]
LIDAR_YAW = -np.pi / 2          # like the real LIDAR_TOP (x to the right of the car)


def build_world(root: str, seed: int = 0) -> dict:
    """Write the tables; return {"samples": [...tokens in nusc.sample order...]}."""
    _, _, detection_name_to_rel_attributes = _devkit()
    ver = "v1.0-mini"
    os.makedirs(os.path.join(root, ver), exist_ok=True)
    rng = np.random.default_rng(seed)

    def tok():
        return uuid.UUID(int=int(rng.integers(0, 2 ** 63)) << 64 | int(rng.integers(0, 2 ** 63))).hex

    T = {k: [] for k in ["category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                         "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map"]}
    cat_tok = {}
    for c in WORLD_CATEGORIES:
        cat_tok[c] = tok()
        T["category"].append(dict(token=cat_tok[c], name=c, description=""))
    attr_tok = {}
    for a in ["vehicle.moving", "vehicle.parked", "vehicle.stopped", "pedestrian.moving", "pedestrian.standing",
              "cycle.with_rider", "cycle.without_rider"]:
        attr_tok[a] = tok()
        T["attribute"].append(dict(token=attr_tok[a], name=a, description=""))
    T["visibility"].append(dict(token="4", level="v80-100", description=""))
    sens, cs = {}, {}
    for ch, mod in [("LIDAR_TOP", "lidar"), ("CAM_FRONT", "camera")]:
        sens[ch], cs[ch] = tok(), tok()
        T["sensor"].append(dict(token=sens[ch], channel=ch, modality=mod))
        lidar = ch == "LIDAR_TOP"
        T["calibrated_sensor"].append(dict(
            token=cs[ch], sensor_token=sens[ch], translation=LIDAR_T if lidar else [1.7, 0.0, 1.5],
            rotation=list(_quat(LIDAR_YAW)) if lidar else [0.5, -0.5, 0.5, -0.5],
            camera_intrinsic=[] if lidar else [[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]]))
    map_tok = tok()
    T["map"].append(dict(token=map_tok, log_tokens=[], category="semantic_prior", filename="maps/x.png"))
    samples = []
    for si, scene_name in enumerate(["scene-0103", "scene-0916"]):
        log_t = tok()
        T["log"].append(dict(token=log_t, logfile="", vehicle="n015", date_captured="2018-07-24",
                             location="singapore-onenorth"))
        T["map"][0]["log_tokens"].append(log_t)
        scene_t, n = tok(), 4
        s_toks = [tok() for _ in range(n)]
        objs = []
        for c, det in WORLD_CATEGORIES.items():
            k = 2 if det is None else 6
            for _ in range(k):
                objs.append(dict(cat=c, xy=rng.uniform(-55, 55, 2), size=rng.uniform(0.6, 4, 3),
                                 yaw=rng.uniform(-np.pi, np.pi), vel=rng.normal(0, 2, 2) * (det != "barrier"),
                                 pts=int(rng.integers(0, 4) > 0) * int(rng.integers(1, 30))))
        # Bike rack at a fixed spot (moving with the world), two bicycles inside it.
        rack = dict(cat="static_object.bicycle_rack", xy=np.array([8.0, 6.0]), size=np.array([6.0, 2.0, 1.5]),
                    yaw=0.4, vel=np.zeros(2), pts=5)
        objs.append(rack)
        for off in ([0.5, 0.3], [-1.5, -0.2]):
            objs.append(dict(cat="vehicle.bicycle", xy=rack["xy"] + np.array(off), size=np.array([0.6, 1.7, 1.2]),
                             yaw=0.4, vel=np.zeros(2), pts=3))
        inst = [tok() for _ in objs]
        anns = [[tok() for _ in objs] for _ in range(n)]
        for i, o in enumerate(objs):
            T["instance"].append(dict(token=inst[i], category_token=cat_tok[o["cat"]], nbr_annotations=n,
                                      first_annotation_token=anns[0][i], last_annotation_token=anns[-1][i]))
        for k in range(n):
            ts = 1532402927647951 + si * 10 ** 9 + k * 500000
            ego_t = [100.0 + 5 * k, 200.0 - 2 * k, 0.0]
            ego_yaw = 0.3 * k + si
            T["sample"].append(dict(token=s_toks[k], timestamp=ts, scene_token=scene_t,
                                    prev=s_toks[k - 1] if k else "", next=s_toks[k + 1] if k < n - 1 else ""))
            samples.append(s_toks[k])
            for ch in sens:
                ep = tok()
                T["ego_pose"].append(dict(token=ep, timestamp=ts, translation=ego_t, rotation=list(_quat(ego_yaw))))
                T["sample_data"].append(dict(
                    token=tok(), sample_token=s_toks[k], ego_pose_token=ep, calibrated_sensor_token=cs[ch],
                    timestamp=ts, fileformat="pcd" if ch.startswith("LIDAR") else "jpg", is_key_frame=True,
                    height=900 if ch.startswith("CAM") else 0, width=1600 if ch.startswith("CAM") else 0,
                    filename=f"samples/{ch}/x_{si}_{k}.jpg", prev="", next=""))
            for i, o in enumerate(objs):
                trans = [float(100.0 + o["xy"][0] + o["vel"][0] * 0.5 * k),
                         float(200.0 + o["xy"][1] + o["vel"][1] * 0.5 * k), 1.0]
                det = WORLD_CATEGORIES[o["cat"]]
                rel = detection_name_to_rel_attributes(det) if det else []
                attr = [attr_tok[rel[(i + k) % len(rel)]]] if rel and (i % 7) and rel[(i + k) % len(rel)] in attr_tok else []
                T["sample_annotation"].append(dict(
                    token=anns[k][i], sample_token=s_toks[k], instance_token=inst[i], visibility_token="4",
                    attribute_tokens=attr, translation=trans, size=[float(v) for v in o["size"]],
                    rotation=list(_quat(o["yaw"])), prev=anns[k - 1][i] if k else "",
                    next=anns[k + 1][i] if k < n - 1 else "", num_lidar_pts=int(o["pts"]), num_radar_pts=0))
        T["scene"].append(dict(token=scene_t, log_token=log_t, nbr_samples=n, first_sample_token=s_toks[0],
                               last_sample_token=s_toks[-1], name=scene_name, description=""))
    for k, v in T.items():
        with open(os.path.join(root, ver, k + ".json"), "w") as f:
            json.dump(v, f)
    os.makedirs(os.path.join(root, "maps"), exist_ok=True)
    from PIL import Image
    Image.new("L", (10, 10)).save(os.path.join(root, "maps", "x.png"))
    return {"samples": samples}


def infos_from_nusc(nusc, sample_tokens):
    """Info records in the official layout (spec §2.1 GT fields), GT in the LiDAR frame."""
    from pyquaternion import Quaternion
    from raydn.eval.constants import CATEGORY_TO_DETECTION
    infos = []
    for tok in sample_tokens:
        sample = nusc.get("sample", tok)
        sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", sd["ego_pose_token"])
        _, boxes, _ = nusc.get_sample_data(sd["token"])
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        r_e2g, r_l2e = Quaternion(pose["rotation"]).rotation_matrix, Quaternion(cs["rotation"]).rotation_matrix
        locs = np.array([b.center for b in boxes]).reshape(-1, 3)
        dims = np.array([b.wlh for b in boxes]).reshape(-1, 3)
        rots = np.array([b.orientation.yaw_pitch_roll[0] for b in boxes]).reshape(-1, 1)
        vel = np.array([nusc.box_velocity(t)[:2] for t in sample["anns"]]).reshape(-1, 2)
        for i in range(len(vel)):
            v = np.array([*vel[i], 0.0]) @ np.linalg.inv(r_e2g).T @ np.linalg.inv(r_l2e).T
            vel[i] = v[:2]
        infos.append(dict(
            token=tok, lidar2ego_translation=cs["translation"], lidar2ego_rotation=cs["rotation"],
            ego2global_translation=pose["translation"], ego2global_rotation=pose["rotation"],
            gt_boxes=np.concatenate([locs, dims[:, [1, 0, 2]], rots], 1),
            gt_names=np.array([CATEGORY_TO_DETECTION.get(b.name, b.name) for b in boxes]),
            gt_velocity=vel, num_lidar_pts=np.array([a["num_lidar_pts"] for a in anns]),
            num_radar_pts=np.array([a["num_radar_pts"] for a in anns]),
            gt_attribute_names=[nusc.get("attribute", a["attribute_tokens"][0])["name"] if a["attribute_tokens"] else ""
                                for a in anns]))
    return infos


def detections_from_infos(infos, rng, noise=0.3, n_fp=8):
    """LiDAR-frame decoded-style detections: noisy copies of the GT (classes of the 3D head
    only) plus random false positives. Labels index ``geometry.CLASS_NAMES``."""
    import torch
    from raydn.geometry import CLASS_NAMES
    dets = []
    for info in infos:
        names = list(info["gt_names"])
        keep = [i for i, n in enumerate(names) if n in CLASS_NAMES and rng.random() < 0.85]
        b = np.zeros((len(keep) + n_fp, 9))
        lab = np.zeros(len(keep) + n_fp, dtype=np.int64)
        for j, i in enumerate(keep):
            g = info["gt_boxes"][i]
            b[j, :7] = g
            b[j, :3] += rng.normal(0, noise, 3)
            b[j, 3:6] *= rng.uniform(0.8, 1.2, 3)
            b[j, 6] += rng.normal(0, 0.2)
            v = info["gt_velocity"][i]
            b[j, 7:9] = np.nan_to_num(v) + rng.normal(0, 0.3, 2)
            lab[j] = CLASS_NAMES.index(names[i])
        for j in range(len(keep), len(keep) + n_fp):
            b[j, :3] = [*rng.uniform(-50, 50, 2), 0.0]
            b[j, 3:6] = rng.uniform(0.5, 4, 3)
            b[j, 6] = rng.uniform(-np.pi, np.pi)
            b[j, 7:9] = rng.normal(0, 2, 2)
            lab[j] = int(rng.integers(10))
        dets.append(dict(boxes=torch.tensor(b, dtype=torch.float32),
                         scores=torch.tensor(rng.uniform(0.05, 1.0, len(b)), dtype=torch.float32),
                         labels=torch.tensor(lab)))
    return dets


@pytest.fixture(scope="session")
def nusc_world(tmp_path_factory):
    _devkit()
    from nuscenes import NuScenes
    root = str(tmp_path_factory.mktemp("nusc_world"))
    meta = build_world(root)
    nusc = NuScenes(version="v1.0-mini", dataroot=root, verbose=False)
    infos = infos_from_nusc(nusc, meta["samples"])
    dets = detections_from_infos(infos, np.random.default_rng(1))
    return types.SimpleNamespace(root=root, version="v1.0-mini", eval_set="mini_val", nusc=nusc,
                                 samples=meta["samples"], infos=infos, detections=dets)
