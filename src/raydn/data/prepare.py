"""Per-sample info records exactly as the official converter (StreamPETR
``tools/data_converter/nuscenes_converter.py``; spec §2.1), built with nuscenes-devkit.

Output: ``{out}/nuscenes2d_temporal_infos_{train,val}.pkl`` (``_test.pkl`` for v1.0-test) =
``{'infos': [...], 'metadata': {'version': ...}}`` of plain Python / numpy objects, one info per
keyframe in ``nusc.sample`` order. Frames: ``gt_boxes`` (n, 7) ``[x, y, z_center, l, w, h, yaw]``
in the LIDAR_TOP frame (l, w, h = nuScenes ``wlh[[1, 0, 2]]``, raw yaw); ``gt_velocity`` (n, 2)
m/s in the LIDAR_TOP frame; ``sensor2lidar_rotation/translation`` map camera points into the
LIDAR_TOP frame (``p_lidar = R @ p_cam + t``); 2D labels in original 1600 x 900 pixels.

Paths: ``lidar_path`` / ``data_path`` are ``os.path.join(dataroot, filename)`` with ``dataroot``
as given (the official converter additionally strips the current directory prefix).

Files are written atomically; a split whose pickle exists and whose stamp (version, dataroot,
table sizes and mtimes) matches is skipped, so re-running is a no-op and an interrupted run
restarts at the first missing split.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raydn.core.frames import quat_to_matrix
from raydn.data.validate import scan_files
from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES
from raydn.io import (
    OutputFolder,
    atomic_write_bytes,
    atomic_write_json,
    describe_holder,
)

#: mmdet3d ``NuScenesDataset.NameMapping``.
NAME_MAPPING = {
    "movable_object.barrier": "barrier", "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus", "vehicle.car": "car", "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle", "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian", "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian", "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer", "vehicle.truck": "truck",
}
#: 2D category order of the official converter (labels2d index) [!] differs from the 3D order.
NUS_CATEGORIES_2D = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle",
                     "pedestrian", "traffic_cone", "barrier")
NUS_ATTRIBUTES = ("cycle.with_rider", "cycle.without_rider", "pedestrian.moving", "pedestrian.standing",
                  "pedestrian.sitting_lying_down", "vehicle.moving", "vehicle.parked", "vehicle.stopped", "None")
VERSIONS = ("v1.0-mini", "v1.0-trainval", "v1.0-test")
REQUIRED_TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                   "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map")
INFO_PREFIX = "nuscenes2d"


def check_dataroot(dataroot, version: str) -> Path:
    """Validate the dataroot layout before loading: version folder and every table file."""
    root = Path(dataroot)
    if version not in VERSIONS:
        raise DataError(f"--version must be one of {VERSIONS}, got {version!r}")
    if not root.is_dir():
        raise DataError(f"nuScenes dataroot {root} does not exist or is not a folder")
    vdir = root / version
    if not vdir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.name.startswith("v1.0"))
        raise DataError(f"version folder {vdir} not found (found: {found or 'none'})")
    for t in REQUIRED_TABLES:
        if not (vdir / f"{t}.json").is_file():
            raise DataError(f"nuScenes table {vdir / (t + '.json')} is missing")
    return vdir


def _check_files(nusc, root: Path) -> None:
    """All keyframe camera images and LIDAR_TOP files must exist (names one missing and the count),
    and every camera image must be a complete JPEG (:func:`raydn.data.validate.check_jpeg_file`: a
    truncated image stops the preparation, not a training run later)."""
    keyframes = [sd for sd in nusc.sample_data
                 if sd["is_key_frame"] and (sd["channel"] in CAMERA_NAMES or sd["channel"] == "LIDAR_TOP")]
    cameras = {root / sd["filename"] for sd in keyframes if sd["channel"] in CAMERA_NAMES}
    missing, broken = scan_files([root / sd["filename"] for sd in keyframes], cameras.__contains__)
    missing = [Path(m).relative_to(root) for m in missing]
    if missing:
        raise DataError(f"{len(missing)} sensor file(s) listed in sample_data.json are missing under {root}, "
                        f"e.g. {root / missing[0]}")
    if broken:
        raise DataError(f"{len(broken)} camera image(s) are broken, e.g. {broken[0]}")


def _stamp(root: Path, vdir: Path, version: str) -> str:
    parts = [version, str(root)]
    for t in REQUIRED_TABLES:
        st = (vdir / f"{t}.json").stat()
        parts.append(f"{t}:{st.st_size}:{st.st_mtime_ns}")
    parts.append("raydn-prepare-v1")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


def _sensor2lidar(nusc, sd_token, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat, sensor_type, root: str) -> dict:
    """Official ``obtain_sensor2top``: sensor -> ego(t_s) -> global -> ego(t_lidar) -> lidar."""
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    info = {
        "data_path": os.path.join(root, sd["filename"]),
        "type": sensor_type,
        "sample_data_token": sd["token"],
        "sensor2ego_translation": cs["translation"],
        "sensor2ego_rotation": cs["rotation"],
        "ego2global_translation": pose["translation"],
        "ego2global_rotation": pose["rotation"],
        "timestamp": sd["timestamp"],
    }
    l2e_r_s = quat_to_matrix(cs["rotation"])
    e2g_r_s = quat_to_matrix(pose["rotation"])
    inv_e = np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T
    R = (l2e_r_s.T @ e2g_r_s.T) @ inv_e
    T = (np.asarray(cs["translation"]) @ e2g_r_s.T + np.asarray(pose["translation"])) @ inv_e
    T -= np.asarray(e2g_t) @ inv_e + np.asarray(l2e_t) @ np.linalg.inv(l2e_r_mat).T
    info["sensor2lidar_rotation"] = R.T
    info["sensor2lidar_translation"] = T
    return info


def _post_process_coords(corner_coords, imsize=(1600, 900)):
    """Convex hull of the projected corners intersected with the image canvas -> xyxy or None."""
    from shapely.geometry import (  # optional: raydn[nuscenes] (a nuscenes-devkit dependency)
        MultiPoint,
        box,
    )
    hull = MultiPoint(corner_coords).convex_hull
    canvas = box(0, 0, imsize[0], imsize[1])
    if not hull.intersects(canvas):
        return None
    inter = hull.intersection(canvas)
    coords = np.array(list(inter.exterior.coords))
    return coords[:, 0].min(), coords[:, 1].min(), coords[:, 0].max(), coords[:, 1].max()


def _cam_2d_labels(nusc, cam_sd_token: str, width: int, height: int):
    """Official ``get_2d_boxes(..., visibilities=['', '1', '2', '3', '4'], mono3d=True)`` plus the
    filtering of ``_fill_trainval_infos``. Returns the per-camera arrays."""
    from nuscenes.utils.geometry_utils import view_points  # optional: raydn[nuscenes]
    from pyquaternion import Quaternion  # optional: raydn[nuscenes]
    sd = nusc.get("sample_data", cam_sd_token)
    s_rec = nusc.get("sample", sd["sample_token"])
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", sd["ego_pose_token"])
    K = np.array(cs["camera_intrinsic"])
    b2d, b3d, ctr, lab, dep, vis, ign = [], [], [], [], [], [], []
    for ann_token in s_rec["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        if ann["visibility_token"] not in ("", "1", "2", "3", "4"):
            continue
        box = nusc.get_box(ann_token)
        box.translate(-np.array(pose["translation"]))
        box.rotate(Quaternion(pose["rotation"]).inverse)
        box.translate(-np.array(cs["translation"]))
        box.rotate(Quaternion(cs["rotation"]).inverse)
        corners = box.corners()
        corners = corners[:, corners[2, :] > 0]
        coords = view_points(corners, K, True).T[:, :2].tolist()
        final = _post_process_coords(coords) if len(coords) else None
        if final is None:
            continue
        x1, y1, x2, y2 = final
        cat = ann["category_name"]
        if cat not in NAME_MAPPING:
            continue  # generate_record returns None
        name = NAME_MAPPING[cat]
        loc = box.center.tolist()
        dim = box.wlh.copy()
        dim[[0, 1, 2]] = dim[[1, 2, 0]]  # wlh -> lhw
        rot = -box.orientation.yaw_pitch_roll[0]
        center3d = np.array(loc).reshape(1, 3)
        p = center3d @ K.T
        center2d = [p[0, 0] / p[0, 2], p[0, 1] / p[0, 2], p[0, 2]]
        if center2d[2] <= 0:
            continue
        w, h = x2 - x1, y2 - y1
        inter_w = max(0, min(x1 + w, width) - max(x1, 0))
        inter_h = max(0, min(y1 + h, height) - max(y1, 0))
        if inter_w * inter_h == 0:
            continue
        if (y2 - y1) * (x2 - x1) <= 0 or w < 1 or h < 1:
            continue
        if name not in NUS_CATEGORIES_2D:
            continue
        b2d.append([x1, y1, x1 + w, y1 + h])
        lab.append(NUS_CATEGORIES_2D.index(name))
        ctr.append(center2d[:2])
        dep.append(center2d[2])
        vis.append(ann["visibility_token"])
        b3d.append(loc + dim.tolist() + [rot])
    return (np.array(b2d, dtype=np.float32), np.array(b3d, dtype=np.float32), np.array(lab, dtype=np.int64),
            np.array(ctr, dtype=np.float32), np.array(dep, dtype=np.float32), np.array(ign, dtype=np.float32), vis)


def build_info(nusc, sample: dict, root: str, test: bool, frame_idx: int, max_sweeps: int = 10,
               image_size=(1600, 900)) -> dict:
    """One official info record for ``sample`` (see module docstring for frames and units)."""
    lidar_token = sample["data"]["LIDAR_TOP"]
    sd_rec = nusc.get("sample_data", lidar_token)
    cs_record = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_record = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    _, boxes, _ = nusc.get_sample_data(lidar_token)
    info = {
        "lidar_path": os.path.join(root, sd_rec["filename"]),
        "token": sample["token"],
        "prev": sample["prev"],
        "next": sample["next"],
        "sweeps": [],
        "frame_idx": frame_idx,
        "cams": dict(),
        "scene_token": sample["scene_token"],
        "lidar2ego_translation": cs_record["translation"],
        "lidar2ego_rotation": cs_record["rotation"],
        "ego2global_translation": pose_record["translation"],
        "ego2global_rotation": pose_record["rotation"],
        "timestamp": sample["timestamp"],
    }
    l2e_t, e2g_t = info["lidar2ego_translation"], info["ego2global_translation"]
    l2e_r_mat = quat_to_matrix(info["lidar2ego_rotation"])
    e2g_r_mat = quat_to_matrix(info["ego2global_rotation"])
    for cam in CAMERA_NAMES:  # official insertion order
        cam_token = sample["data"][cam]
        cs = nusc.get("calibrated_sensor", nusc.get("sample_data", cam_token)["calibrated_sensor_token"])
        cam_info = _sensor2lidar(nusc, cam_token, l2e_t, l2e_r_mat, e2g_t, e2g_r_mat, cam, root)
        cam_info.update(cam_intrinsic=np.array(cs["camera_intrinsic"]))
        info["cams"][cam] = cam_info
    sweeps = []
    sd = sd_rec
    while len(sweeps) < max_sweeps and sd["prev"] != "":
        sweeps.append(_sensor2lidar(nusc, sd["prev"], l2e_t, l2e_r_mat, e2g_t, e2g_r_mat, "lidar", root))
        sd = nusc.get("sample_data", sd["prev"])
    info["sweeps"] = sweeps
    if test:
        return info
    annotations = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    locs = np.array([b.center for b in boxes]).reshape(-1, 3)
    dims = np.array([b.wlh for b in boxes]).reshape(-1, 3)
    rots = np.array([b.orientation.yaw_pitch_roll[0] for b in boxes]).reshape(-1, 1)
    velocity = np.array([nusc.box_velocity(t)[:2] for t in sample["anns"]]).reshape(-1, 2)
    valid_flag = np.array([(a["num_lidar_pts"] + a["num_radar_pts"]) > 0 for a in annotations],
                          dtype=bool).reshape(-1)
    if len(boxes):
        v3 = np.concatenate([velocity, np.zeros((len(boxes), 1))], 1)
        velocity = (v3 @ np.linalg.inv(e2g_r_mat).T @ np.linalg.inv(l2e_r_mat).T)[:, :2]
    names = np.array([NAME_MAPPING.get(b.name, b.name) for b in boxes])
    gt_boxes = np.concatenate([locs, dims[:, [1, 0, 2]], rots], axis=1)
    if len(gt_boxes) != len(annotations):
        raise DataError(f"sample {sample['token']}: {len(gt_boxes)} boxes but {len(annotations)} annotations")
    info["gt_boxes"] = gt_boxes
    info["gt_names"] = names
    info["gt_velocity"] = velocity.reshape(-1, 2)
    info["num_lidar_pts"] = np.array([a["num_lidar_pts"] for a in annotations])
    info["num_radar_pts"] = np.array([a["num_radar_pts"] for a in annotations])
    info["valid_flag"] = valid_flag
    keys = ("bboxes2d", "bboxes3d_cams", "labels2d", "centers2d", "depths", "bboxes_ignore", "visibilities")
    per = {k: [] for k in keys}
    for cam in CAMERA_NAMES:
        b2d, b3d, lab, ctr, dep, ign, vis = _cam_2d_labels(nusc, info["cams"][cam]["sample_data_token"],
                                                           image_size[0], image_size[1])
        for k, v in zip(("bboxes2d", "bboxes3d_cams", "labels2d", "centers2d", "depths", "bboxes_ignore",
                         "visibilities"), (b2d, b3d, lab, ctr, dep, ign, vis)):
            per[k].append(v)
    info.update(per)
    return info


def _split_scenes(nusc, version: str):
    from nuscenes.utils import splits  # optional: raydn[nuscenes]
    if version == "v1.0-trainval":
        train, val = splits.train, splits.val
    elif version == "v1.0-test":
        train, val = splits.test, []
    else:
        train, val = splits.mini_train, splits.mini_val
    by_name = {s["name"]: s["token"] for s in nusc.scene}
    return ({by_name[n] for n in train if n in by_name}, {by_name[n] for n in val if n in by_name})


def _atomic_pickle(obj, path: Path) -> None:
    atomic_write_bytes(path, pickle.dumps(obj, protocol=4))


def info_paths(out_dir, version: str) -> dict[str, Path]:
    out = Path(out_dir)
    if version == "v1.0-test":
        return {"test": out / f"{INFO_PREFIX}_temporal_infos_test.pkl"}
    return {s: out / f"{INFO_PREFIX}_temporal_infos_{s}.pkl" for s in ("train", "val")}


def prepare_infos(dataroot, version: str, out_dir, progress: bool = True, force: bool = False,
                  image_size=(1600, 900)) -> dict[str, Path]:
    """Build the official info pickles of ``dataroot``/``version`` into ``out_dir``.

    Returns {split: path}. Skips splits whose pickle is up to date (stamp file beside it) unless
    ``force``; raises :class:`DataError` for a wrong dataroot, a missing version folder or table, or
    missing sensor files."""
    root = str(dataroot)
    vdir = check_dataroot(dataroot, version)
    out = Path(out_dir)

    def waiting(holder):
        print(f"raydn prepare: another {describe_holder(holder)} is writing into {out}; waiting for it",
              flush=True)
    # one prepare at a time per output folder: a second one waits (saying so), then finds the pickles
    # up to date and returns at once; a failed first run leaves no empty folder behind (raydn.io)
    # (only the folder's own files are searched for leftovers: it is often the dataroot itself)
    with OutputFolder(out, "prepare", wait=True, on_wait=waiting, depth=0):
        return _prepare_locked(root, vdir, version, out, progress, force, image_size)


def _prepare_locked(root: str, vdir: Path, version: str, out: Path, progress: bool, force: bool,
                    image_size) -> dict[str, Path]:
    paths = info_paths(out, version)
    stamp = _stamp(Path(root), vdir, version)
    stamp_path = out / f".{INFO_PREFIX}_temporal_infos_{version}.stamp.json"

    def up_to_date(split):
        if force or not paths[split].is_file() or not stamp_path.is_file():
            return False
        try:
            st = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            return False
        return st.get(split) == stamp
    todo = [s for s in paths if not up_to_date(s)]
    if not todo:
        return paths
    try:
        from nuscenes.nuscenes import NuScenes  # optional: raydn[nuscenes]
    except ImportError as e:  # pragma: no cover
        raise DataError("raydn prepare needs nuscenes-devkit (pip install 'raydn[nuscenes]')") from e
    try:
        nusc = NuScenes(version=version, dataroot=root, verbose=False)
    except (KeyError, ValueError, AssertionError, json.JSONDecodeError) as e:
        raise DataError(f"could not load the nuScenes tables in {vdir}: {type(e).__name__}: {e}") from e
    _check_files(nusc, Path(root))
    train_scenes, val_scenes = _split_scenes(nusc, version)
    test = version == "v1.0-test"
    infos = {"train": [], "val": []}
    frame_idx = 0
    for sample in tqdm(nusc.sample, desc=f"raydn prepare {version}", unit="sample", disable=not progress):
        st = sample["scene_token"]
        split = "train" if st in train_scenes else "val"
        # official: every sample not in the train scenes goes to val (test: train = all test scenes)
        info = build_info(nusc, sample, root, test, frame_idx, image_size=image_size)
        frame_idx = 0 if sample["next"] == "" else frame_idx + 1
        if test or split in todo or (split == "val" and "val" in todo):
            infos[split].append(info)
    metadata = dict(version=version)
    stamps = {}
    if stamp_path.is_file():
        try:
            stamps = json.loads(stamp_path.read_text())
        except ValueError:
            stamps = {}
    for split in todo:  # per split: an interrupted run keeps the splits already written
        data = dict(infos=infos["train"] if split == "test" else infos[split], metadata=metadata)
        _atomic_pickle(data, paths[split])
        stamps[split] = stamp
        atomic_write_json(stamp_path, stamps, sort_keys=True)
    del val_scenes
    return paths
