"""nuScenes tables and sensor files of the synthetic world.

Per keyframe a worker renders the six cameras (JPEG, 1600 x 900) and the LIDAR_TOP scan
(``.pcd.bin``, float32 N x 5) straight into the temporary dataroot and returns per-object
statistics (lidar/radar hits, visible/unoccluded pixels). The main process assembles the 13
tables deterministically from those results; every output depends only on (seed, scene, sample).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from raydn.core.frames import quat_from_yaw
from raydn.data import nuscenes_calib as calib
from raydn.data.synth.render import CameraView, build_primitives, lidar_scan, render_camera
from raydn.data.synth.world import (KIND_STOPPED, SceneSim, make_token, simulate_scene)
from raydn.geometry import CAMERA_NAMES, CLASS_NAMES

#: Camera trigger time minus the LIDAR_TOP keyframe time, µs (small, as on the real car).
CAMERA_OFFSETS_US = {
    "CAM_FRONT": 4500, "CAM_FRONT_RIGHT": 9800, "CAM_FRONT_LEFT": -9100,
    "CAM_BACK": -2700, "CAM_BACK_LEFT": 1500, "CAM_BACK_RIGHT": -6300,
}
#: Lidar azimuth columns per revolution of the simulated LIDAR_TOP.
LIDAR_AZIMUTHS = 1080

ALL_CATEGORIES = (
    "animal", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
    "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
    "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle",
    "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction",
    "vehicle.emergency.ambulance", "vehicle.emergency.police", "vehicle.motorcycle",
    "vehicle.trailer", "vehicle.truck",
)
ALL_ATTRIBUTES = (
    "cycle.with_rider", "cycle.without_rider", "pedestrian.moving", "pedestrian.sitting_lying_down",
    "pedestrian.standing", "vehicle.moving", "vehicle.parked", "vehicle.stopped",
)
VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))
MAP_LOCATIONS = ("singapore-onenorth", "singapore-hollandvillage", "singapore-queenstown", "boston-seaport")
TABLES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose",
          "log", "scene", "sample", "sample_data", "sample_annotation", "map")


def scene_log_name(sim: SceneSim) -> str:
    hh, mm, ss = (sim.index * 7) % 12 + 8, (sim.index * 13) % 60, (sim.index * 29) % 60
    return f"n015-{sim.date}-{hh:02d}-{mm:02d}-{ss:02d}+0800"


@functools.lru_cache(maxsize=4)
def cached_scene(seed: int, index: int, name: str, n_samples: int, profile: str = "realistic") -> SceneSim:
    return simulate_scene(name, index, seed, n_samples, profile)


def ego_matrix(xy, yaw) -> np.ndarray:
    """4x4 ego -> global (float64) of an ego pose on the ground plane."""
    m = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    m[:2, :2] = [[c, -s], [s, c]]
    m[:2, 3] = xy
    return m


def _prims_at(sim: SceneSim, t: float):
    o = sim.objects
    return build_primitives(o.centers_at(t), o.yaw, o.wlh, o.cls, o.rider, o.colors)


def render_sample(seed: int, index: int, name: str, n_samples: int, k: int, root: str,
                  scale: float = 0.4, quality: int = 90, profile: str = "realistic") -> dict:
    """Render keyframe ``k`` of scene ``index`` into ``root``; returns the per-sample record used
    to build the tables (timestamps, ego poses, filenames, per-object statistics)."""
    sim = cached_scene(seed, index, name, n_samples, profile)
    n_obj = len(sim.objects)
    log = scene_log_name(sim)
    t_s = float(sim.sample_t[k])
    ts_us = int(sim.sample_us[k])
    rec = dict(k=k, timestamp=ts_us, sensors={})
    # LIDAR_TOP
    (exy,), (eyaw,) = sim.ego.pose_at(t_s)
    e2g = ego_matrix(exy, eyaw)
    l2g = e2g @ calib.lidar_to_ego()
    rng = np.random.default_rng([seed, index, k, 11])
    points, obj, counts, ray_idx = lidar_scan(l2g, _prims_at(sim, t_s), n_obj, calib.LIDAR_ELEVATIONS_DEG,
                                              LIDAR_AZIMUTHS, rng=rng)
    coarse = ((ray_idx // LIDAR_AZIMUTHS) % 4 == 0) & ((ray_idx % LIDAR_AZIMUTHS) % 4 == 0) & (obj >= 0)
    radar = np.bincount(obj[coarse], minlength=n_obj) if n_obj else np.zeros(0, np.int64)
    fname = f"samples/LIDAR_TOP/{log}__LIDAR_TOP__{ts_us}.pcd.bin"
    path = os.path.join(root, fname)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    points.astype(np.float32).tofile(path)
    rec["sensors"]["LIDAR_TOP"] = dict(timestamp=ts_us, xy=exy.tolist(), yaw=float(eyaw), filename=fname)
    visible = np.zeros(n_obj, np.int64)
    unocc = np.zeros(n_obj, np.int64)
    for cam in CAMERA_NAMES:  # six cameras: tiny fixed loop, each render is vectorised
        cts = ts_us + CAMERA_OFFSETS_US[cam]
        t_c = t_s + CAMERA_OFFSETS_US[cam] * 1e-6
        (cxy,), (cyaw,) = sim.ego.pose_at(t_c)
        c2g = ego_matrix(cxy, cyaw) @ calib.camera_to_ego(cam)
        view = CameraView(K=calib.camera_intrinsic(cam), R=c2g[:3, :3], position=c2g[:3, 3],
                          size=calib.IMAGE_SIZE)
        rgb, _, vis, unc = render_camera(view, _prims_at(sim, t_c), n_obj, sim.sun, scale=scale)
        visible += vis
        unocc += unc
        img = Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8))
        if img.size != calib.IMAGE_SIZE:
            img = img.resize(calib.IMAGE_SIZE, Image.BILINEAR)
        fname = f"samples/{cam}/{log}__{cam}__{cts}.jpg"
        path = os.path.join(root, fname)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path, format="JPEG", quality=quality)
        rec["sensors"][cam] = dict(timestamp=cts, xy=cxy.tolist(), yaw=float(cyaw), filename=fname)
    rec["num_lidar_pts"] = counts.astype(int).tolist()
    rec["num_radar_pts"] = radar.astype(int).tolist()
    rec["visible_px"] = visible.astype(int).tolist()
    rec["unoccluded_px"] = unocc.astype(int).tolist()
    return rec


def render_sample_task(args) -> dict:
    return render_sample(*args)


def visibility_token(visible: int, unoccluded: int) -> str:
    """nuScenes visibility level token from the visible fraction of the object's pixels."""
    if unoccluded <= 0:
        return "1"
    f = visible / unoccluded
    return "1" if f < 0.4 else "2" if f < 0.6 else "3" if f < 0.8 else "4"


def attribute_name(sim: SceneSim, i: int) -> str | None:
    o = sim.objects
    name = CLASS_NAMES[int(o.cls[i])]
    if name in ("barrier", "traffic_cone"):
        return None
    if name in ("motorcycle", "bicycle"):
        return "cycle.with_rider" if o.rider[i] else "cycle.without_rider"
    if name == "pedestrian":
        return "pedestrian.moving" if o.speed[i] > 0.3 else "pedestrian.standing"
    if o.speed[i] > 0.3:
        return "vehicle.moving"
    return "vehicle.stopped" if o.kind[i] == KIND_STOPPED else "vehicle.parked"


def _yaw_quat(yaw: float) -> list[float]:
    """Rotation about +z by ``yaw`` radians as a JSON ``[w, x, y, z]`` list (no negative zeros)."""
    return (quat_from_yaw(yaw) + 0.0).tolist()


def _pose_rec(token, ts, xy, yaw):
    return dict(token=token, timestamp=int(ts), rotation=_yaw_quat(yaw),
                translation=[float(xy[0]), float(xy[1]), 0.0])


def _calibrated_sensors(T: dict[str, list], seed: int, s_idx: int, channels: tuple[str, ...]) -> dict[str, str]:
    """Append the ``calibrated_sensor`` rows of scene ``s_idx`` (one per channel) to ``T``; returns the
    token of each channel's row."""
    cs_tok = {}
    for ch in channels:
        cs_tok[ch] = make_token(seed, s_idx, "calibrated_sensor", ch)
        if ch == "LIDAR_TOP":
            c = calib.LIDAR_CALIB
            T["calibrated_sensor"].append(dict(token=cs_tok[ch], sensor_token=calib.SENSOR_TOKENS[ch],
                                               translation=list(c["translation"]),
                                               rotation=list(c["rotation"]), camera_intrinsic=[]))
        else:
            c = calib.CAMERA_CALIB[ch]
            T["calibrated_sensor"].append(dict(token=cs_tok[ch], sensor_token=calib.SENSOR_TOKENS[ch],
                                               translation=list(c["translation"]), rotation=list(c["rotation"]),
                                               camera_intrinsic=[list(r) for r in c["intrinsic"]]))
    return cs_tok


def _object_tables(T: dict[str, list], seed: int, sim: SceneSim, recs: list[dict], s_tok: list[str],
                   cat_tok: dict[str, str], attr_tok: dict[str, str]) -> None:
    """Append the ``instance`` rows and the ``sample_annotation`` rows (one per object and keyframe)
    of scene ``sim`` to ``T``; ``s_tok`` are the scene's sample tokens."""
    s_idx = sim.index
    n = len(recs)
    o = sim.objects
    for i in range(len(o)):
        inst_tok = make_token(seed, s_idx, "instance", i)
        a_tok = [make_token(seed, s_idx, "sample_annotation", i, k) for k in range(n)]
        T["instance"].append(dict(token=inst_tok, category_token=cat_tok[o.category[i]], nbr_annotations=n,
                                  first_annotation_token=a_tok[0], last_annotation_token=a_tok[-1]))
    attrs = [attribute_name(sim, i) for i in range(len(o))]
    for k, rec in enumerate(recs):
        centers = o.centers_at(float(sim.sample_t[k]))
        for i in range(len(o)):
            T["sample_annotation"].append(dict(
                token=make_token(seed, s_idx, "sample_annotation", i, k), sample_token=s_tok[k],
                instance_token=make_token(seed, s_idx, "instance", i),
                visibility_token=visibility_token(rec["visible_px"][i], rec["unoccluded_px"][i]),
                attribute_tokens=[attr_tok[attrs[i]]] if attrs[i] else [],
                translation=[float(v) for v in centers[i]], size=[float(v) for v in o.wlh[i]],
                rotation=_yaw_quat(float(o.yaw[i])),
                prev=make_token(seed, s_idx, "sample_annotation", i, k - 1) if k else "",
                next=make_token(seed, s_idx, "sample_annotation", i, k + 1) if k < n - 1 else "",
                num_lidar_pts=int(rec["num_lidar_pts"][i]), num_radar_pts=int(rec["num_radar_pts"][i])))


def build_tables(seed: int, sims: list[SceneSim], records: list[list[dict]]) -> dict[str, list]:
    """All 13 nuScenes tables of the world (deterministic given the inputs).

    ``records[s][k]`` is :func:`render_sample`'s result for keyframe k of scene s."""
    T = {k: [] for k in TABLES}
    cat_tok = {c: make_token(seed, "category", c) for c in ALL_CATEGORIES}
    T["category"] = [dict(token=cat_tok[c], name=c, description=f"nuScenes category {c}") for c in ALL_CATEGORIES]
    attr_tok = {a: make_token(seed, "attribute", a) for a in ALL_ATTRIBUTES}
    T["attribute"] = [dict(token=attr_tok[a], name=a, description=f"nuScenes attribute {a}") for a in ALL_ATTRIBUTES]
    T["visibility"] = [dict(token=t, level=lv, description=f"visibility of whole object is between "
                            f"{lv[1:].replace('-', ' and ')}%") for t, lv in VISIBILITY]
    channels = ("LIDAR_TOP",) + CAMERA_NAMES
    T["sensor"] = [dict(token=calib.SENSOR_TOKENS[ch], channel=ch,
                        modality="lidar" if ch == "LIDAR_TOP" else "camera") for ch in channels]
    map_tok = {loc: make_token(seed, "map", loc) for loc in MAP_LOCATIONS}
    map_logs = {loc: [] for loc in MAP_LOCATIONS}
    for sim, recs in zip(sims, records):
        s_idx = sim.index
        log_tok = make_token(seed, s_idx, "log")
        loc = MAP_LOCATIONS[s_idx % len(MAP_LOCATIONS)]
        map_logs[loc].append(log_tok)
        T["log"].append(dict(token=log_tok, logfile=scene_log_name(sim), vehicle="n015",
                             date_captured=sim.date, location=loc))
        cs_tok = _calibrated_sensors(T, seed, s_idx, channels)
        n = len(recs)
        s_tok = [make_token(seed, s_idx, "sample", k) for k in range(n)]
        scene_tok = make_token(seed, s_idx, "scene")
        T["scene"].append(dict(token=scene_tok, log_token=log_tok, nbr_samples=n, first_sample_token=s_tok[0],
                               last_sample_token=s_tok[-1], name=sim.name,
                               description=f"raydn synthetic world, seed {seed}, scene {s_idx}"))
        for k, rec in enumerate(recs):
            T["sample"].append(dict(token=s_tok[k], timestamp=rec["timestamp"], prev=s_tok[k - 1] if k else "",
                                    next=s_tok[k + 1] if k < n - 1 else "", scene_token=scene_tok))
            for ch in channels:
                sd = rec["sensors"][ch]
                sd_tok = make_token(seed, s_idx, "sample_data", ch, k)
                ep_tok = make_token(seed, s_idx, "ego_pose", ch, k)
                T["ego_pose"].append(_pose_rec(ep_tok, sd["timestamp"], sd["xy"], sd["yaw"]))
                cam = ch != "LIDAR_TOP"
                T["sample_data"].append(dict(
                    token=sd_tok, sample_token=s_tok[k], ego_pose_token=ep_tok, calibrated_sensor_token=cs_tok[ch],
                    timestamp=sd["timestamp"], fileformat="jpg" if cam else "pcd", is_key_frame=True,
                    height=calib.IMAGE_SIZE[1] if cam else 0, width=calib.IMAGE_SIZE[0] if cam else 0,
                    filename=sd["filename"],
                    prev=make_token(seed, s_idx, "sample_data", ch, k - 1) if k else "",
                    next=make_token(seed, s_idx, "sample_data", ch, k + 1) if k < n - 1 else ""))
        _object_tables(T, seed, sim, recs, s_tok, cat_tok, attr_tok)
    T["map"] = [dict(token=map_tok[loc], log_tokens=map_logs[loc], category="semantic_prior",
                     filename=f"maps/{map_tok[loc]}.png") for loc in MAP_LOCATIONS]
    return T


def write_tables(root: Path, version: str, tables: dict[str, list]) -> None:
    """Write ``{root}/{version}/*.json`` and the map PNGs (tables last: a dataroot without them is
    incomplete by construction)."""
    maps = root / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    for rec in tables["map"]:
        Image.new("L", (64, 64), 0).save(root / rec["filename"])
    vdir = root / version
    vdir.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        tmp = vdir / f".{name}.json.tmp"
        with open(tmp, "w") as f:
            json.dump(tables[name], f, indent=0)
        os.replace(tmp, vdir / f"{name}.json")
