"""Test helper: small official-format info records (spec §2.1) with nuScenes-like calibration.

The LiDAR frame is nuScenes' LIDAR_TOP: x right, y forward, z up. Cameras look along the yaw
``psi`` (counter-clockwise from +y) with the usual camera axes (x right, y down, z forward).
Intrinsics / mounting are rounded values of a real nuScenes calibration.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from raydn.geometry import CAMERA_NAMES, CLASS_NAMES

# (fx, cx, cy, yaw in degrees, translation in the LiDAR frame)
_CAMS = {
    "CAM_FRONT": (1266.4, 816.3, 491.5, 0.0, (0.01, 0.60, -0.32)),
    "CAM_FRONT_RIGHT": (1260.8, 808.0, 495.3, -55.0, (0.49, 0.45, -0.33)),
    "CAM_FRONT_LEFT": (1272.6, 826.6, 479.8, 55.0, (-0.49, 0.46, -0.31)),
    "CAM_BACK": (809.2, 829.2, 481.8, 180.0, (0.01, -1.00, -0.30)),
    "CAM_BACK_LEFT": (1256.7, 792.1, 492.8, 110.0, (-0.48, -0.30, -0.31)),
    "CAM_BACK_RIGHT": (1259.5, 807.3, 501.2, -110.0, (0.48, -0.31, -0.33)),
}
W, H = 1600, 900


def camera_calib(name: str):
    """(K (3,3), R_cam2lidar (3,3), t_cam2lidar (3,)) float64."""
    fx, cx, cy, yaw, t = _CAMS[name]
    psi = math.radians(yaw)
    fwd = np.array([-math.sin(psi), math.cos(psi), 0.0])
    right = np.array([math.cos(psi), math.sin(psi), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    r = np.stack([right, down, fwd], axis=1)
    k = np.array([[fx, 0, cx], [0, fx, cy], [0, 0, 1.0]])
    return k, r, np.array(t, dtype=np.float64)


def lidar2img_orig(name: str) -> np.ndarray:
    k, r, t = camera_calib(name)
    l2c = np.eye(4)
    l2c[:3, :3] = r.T
    l2c[:3, 3] = -r.T @ t
    vp = np.eye(4)
    vp[:3, :3] = k
    return vp @ l2c


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(n, >=7) gravity-centre boxes -> (n, 8, 3) corners."""
    boxes = np.asarray(boxes, dtype=np.float64)
    sx = np.array([1, 1, 1, 1, -1, -1, -1, -1]) * 0.5
    sy = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sz = np.array([1, -1, 1, -1, 1, -1, 1, -1]) * 0.5
    loc = np.stack([sx[None] * boxes[:, 3:4], sy[None] * boxes[:, 4:5], sz[None] * boxes[:, 5:6]], -1)
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = loc[..., 0] * c - loc[..., 1] * s
    y = loc[..., 0] * s + loc[..., 1] * c
    return np.stack([x, y, loc[..., 2]], -1) + boxes[:, None, :3]


def project(points: np.ndarray, l2i: np.ndarray):
    """(..., 3) points, (4, 4) -> (uv (..., 2), depth (...))."""
    p = points @ l2i[:3, :3].T + l2i[:3, 3]
    d = p[..., 2]
    return p[..., :2] / np.maximum(d[..., None], 1e-6), d


def quat_z(yaw: float):
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def labels_2d(boxes: np.ndarray, names) -> dict:
    """Simplified converter 2D labels: per camera, boxes fully in front, bbox of projected corners
    clipped to the canvas (w, h >= 1), centre projection and depth."""
    out = {"bboxes2d": [], "labels2d": [], "centers2d": [], "depths": []}
    two_d = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle",
             "pedestrian", "traffic_cone", "barrier")
    lab = np.array([two_d.index(n) if n in two_d else -1 for n in names], dtype=np.int64)
    corners = box_corners(boxes)
    for cam in CAMERA_NAMES:
        l2i = lidar2img_orig(cam)
        uv, d = project(corners, l2i)
        cuv, cd = project(boxes[:, :3], l2i)
        bb = np.concatenate([uv.min(1), uv.max(1)], axis=1)
        bb[:, 0::2] = np.clip(bb[:, 0::2], 0, W)
        bb[:, 1::2] = np.clip(bb[:, 1::2], 0, H)
        keep = (d > 0).all(1) & (cd > 0) & (lab >= 0) & (bb[:, 2] - bb[:, 0] >= 1) & (bb[:, 3] - bb[:, 1] >= 1)
        out["bboxes2d"].append(bb[keep].astype(np.float32))
        out["labels2d"].append(lab[keep])
        out["centers2d"].append(cuv[keep].astype(np.float32))
        out["depths"].append(cd[keep].astype(np.float32))
    return out


def write_jpeg(path: Path, img: Image.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95, subsampling=0)
    return str(path)


def make_record(token: str, scene: str, ts_us: int, first: bool, image_paths: dict,
                boxes: np.ndarray | None = None, names=None, velocity=None, valid=None,
                with_2d: bool = True, ego_yaw: float = 0.3) -> dict:
    cams = {}
    for cam in CAMERA_NAMES:
        k, r, t = camera_calib(cam)
        cams[cam] = {
            "data_path": image_paths[cam], "type": cam, "sample_data_token": f"{token}_{cam}",
            "sensor2ego_translation": [0.0, 0.0, 1.5], "sensor2ego_rotation": [1.0, 0, 0, 0],
            "ego2global_translation": [600.0, 1600.0, 0.0], "ego2global_rotation": quat_z(ego_yaw),
            "timestamp": ts_us + 12_000, "cam_intrinsic": k,
            "sensor2lidar_rotation": r, "sensor2lidar_translation": t,
        }
    rec = {
        "lidar_path": f"samples/LIDAR_TOP/{token}.bin", "token": token, "prev": "", "next": "",
        "scene_token": scene, "frame_idx": 0, "timestamp": ts_us,
        "sweeps": [] if first else [{"data_path": "x"}],
        "lidar2ego_translation": [0.94, 0.0, 1.84], "lidar2ego_rotation": quat_z(-math.pi / 2),
        "ego2global_translation": [600.0 + (ts_us % 100_000_000) * 1e-6, 1600.0, 0.0],
        "ego2global_rotation": quat_z(ego_yaw), "cams": cams,
    }
    if boxes is not None:
        n = len(boxes)
        rec["gt_boxes"] = np.asarray(boxes, dtype=np.float64).reshape(n, 7)
        rec["gt_names"] = np.array(names)
        rec["gt_velocity"] = np.zeros((n, 2)) if velocity is None else np.asarray(velocity, np.float64)
        rec["num_lidar_pts"] = np.full(n, 5)
        rec["num_radar_pts"] = np.zeros(n, dtype=np.int64)
        rec["valid_flag"] = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, bool)
        if with_2d:
            rec.update(labels_2d(rec["gt_boxes"], names))
    return rec


def random_boxes(rng: np.random.Generator, n: int):
    xy = rng.uniform(-45, 45, size=(n, 2))
    z = rng.uniform(-1.5, 0.5, size=(n, 1))
    lwh = rng.uniform(0.5, 5.0, size=(n, 3))
    yaw = rng.uniform(-np.pi, np.pi, size=(n, 1))
    names = [CLASS_NAMES[i] for i in rng.integers(0, len(CLASS_NAMES), n)]
    return np.concatenate([xy, z, lwh, yaw], 1), names


def make_infos(root: Path, scene_lengths=(5, 4, 6), boxes_per_sample: int = 6, seed: int = 0,
               shuffle: bool = True, shared_image: bool = True) -> dict:
    """Several scenes of records (shuffled file order like ``nusc.sample``), all cameras pointing at
    one shared small-content 1600x900 JPEG (or one file per camera/sample)."""
    rng = np.random.default_rng(seed)
    shared = None
    if shared_image:
        img = Image.new("RGB", (W, H), (90, 120, 150))
        shared = write_jpeg(Path(root) / "samples" / "shared.jpg", img)
    infos = []
    ts = 1_533_151_603_000_000
    for s, n in enumerate(scene_lengths):
        for f in range(n):
            ts += 500_000
            tok = f"s{s}f{f}"
            if shared_image:
                paths = {c: shared for c in CAMERA_NAMES}
            else:
                paths = {c: write_jpeg(Path(root) / "samples" / c / f"{tok}.jpg",
                                       Image.new("RGB", (W, H), tuple(int(v) for v in rng.integers(0, 255, 3))))
                         for c in CAMERA_NAMES}
            boxes, names = random_boxes(rng, boxes_per_sample)
            vel = rng.normal(size=(boxes_per_sample, 2))
            infos.append(make_record(tok, f"scene{s}", ts, f == 0, paths, boxes, names, vel))
    if shuffle:
        order = rng.permutation(len(infos))
        infos = [infos[i] for i in order]
    return {"infos": infos, "metadata": {"version": "v1.0-mini"}}


PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 140, 0), (140, 0, 255), (0, 140, 70), (255, 255, 255), (120, 60, 0), (0, 90, 255)]


def make_render_world(root: Path, ts_us: int = 1_533_151_603_000_000):
    """One sample with 12 boxes (two per camera), each painted into its camera's 1600x900 image as
    the filled rectangle of its projected corners in a distinct colour. Returns
    (infos dict, boxes (12, 7), list of (camera index, box index))."""
    boxes, names, owners = [], [], []
    for ci, cam in enumerate(CAMERA_NAMES):
        _, r, t = camera_calib(cam)
        fwd, right = r[:, 2], r[:, 0]
        for j, (dist, lat) in enumerate(((14.0, -3.5), (22.0, 4.5))):
            c = t + fwd * dist + right * lat
            c[2] = -0.8
            yaw = math.atan2(fwd[1], fwd[0]) + 0.4 * (j - 0.5)
            boxes.append([c[0], c[1], c[2], 4.0, 1.9, 1.6, yaw])
            names.append("car")
            owners.append((ci, len(boxes) - 1))
    boxes = np.array(boxes)
    corners = box_corners(boxes)
    paths = {}
    for ci, cam in enumerate(CAMERA_NAMES):
        img = Image.new("RGB", (W, H), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        for cj, bi in owners:
            if cj != ci:
                continue
            uv, d = project(corners[bi], lidar2img_orig(cam))
            assert (d > 0).all()
            a = np.round(uv.min(0)).astype(int)
            b = np.round(uv.max(0)).astype(int)
            assert a[0] >= 0 and a[1] >= 0 and b[0] <= W and b[1] <= H, (cam, a, b)
            draw.rectangle([a[0], a[1], b[0] - 1, b[1] - 1], fill=PALETTE[bi])
        paths[cam] = write_jpeg(Path(root) / "samples" / cam / "render.jpg", img)
    rec = make_record("render0", "sceneR", ts_us, True, paths, boxes, names, np.full((len(boxes), 2), 1.0))
    return {"infos": [rec], "metadata": {}}, boxes, owners
