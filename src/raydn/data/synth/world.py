"""Scene simulation of the synthetic world: ego trajectory and object tracks (no rendering).

Frames and units: global frame = nuScenes map frame (x, y on the ground plane z = 0, metres);
times in seconds relative to the first keyframe of the scene (float64). Boxes are nuScenes boxes:
centre (x, y, z = h/2 on the ground), size ``wlh`` (width across, length along the heading,
height) and yaw about +z (heading of the box's local +x / "front" axis).

Objects move on straight lines at constant speed, so an object's state at any time is an exact
linear function of time (the mask renderer relies on this to move annotations to camera times).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from raydn.geometry import CLASS_NAMES

#: Keyframe period (s) and the ego-motion integration step (s).
KEYFRAME_DT = 0.5
SIM_DT = 0.05

#: Per detection class: nuScenes categories (first = default), mean size wlh (m),
#: colour palette (RGB 0..1) for the primary colour role.
CLASS_SPECS = {
    "car": dict(categories=("vehicle.car",), wlh=(1.95, 4.62, 1.73),
                palette=((0.85, 0.85, 0.86), (0.55, 0.56, 0.58), (0.12, 0.12, 0.14),
                         (0.65, 0.08, 0.08), (0.10, 0.20, 0.55), (0.75, 0.72, 0.60))),
    "truck": dict(categories=("vehicle.truck",), wlh=(2.51, 6.93, 2.84),
                  palette=((0.90, 0.90, 0.92), (0.15, 0.35, 0.70), (0.75, 0.20, 0.10))),
    "construction_vehicle": dict(categories=("vehicle.construction",), wlh=(2.85, 6.37, 3.19),
                                 palette=((0.95, 0.70, 0.05), (0.95, 0.50, 0.05))),
    "bus": dict(categories=("vehicle.bus.rigid", "vehicle.bus.bendy"), wlh=(2.94, 10.5, 3.47),
                palette=((0.80, 0.15, 0.12), (0.15, 0.55, 0.25), (0.92, 0.92, 0.90))),
    "trailer": dict(categories=("vehicle.trailer",), wlh=(2.90, 12.29, 3.87),
                    palette=((0.70, 0.70, 0.68), (0.40, 0.45, 0.55), (0.95, 0.95, 0.95))),
    "barrier": dict(categories=("movable_object.barrier",), wlh=(2.53, 0.50, 0.98),
                    palette=((0.85, 0.10, 0.08), (0.95, 0.80, 0.10))),
    "motorcycle": dict(categories=("vehicle.motorcycle",), wlh=(0.77, 2.11, 1.47),
                       palette=((0.10, 0.10, 0.12), (0.60, 0.05, 0.05), (0.15, 0.15, 0.45))),
    "bicycle": dict(categories=("vehicle.bicycle",), wlh=(0.60, 1.70, 1.28),
                    palette=((0.20, 0.60, 0.20), (0.15, 0.25, 0.75), (0.85, 0.85, 0.20))),
    "pedestrian": dict(categories=("human.pedestrian.adult", "human.pedestrian.child",
                                   "human.pedestrian.construction_worker"),
                       wlh=(0.67, 0.73, 1.77),
                       palette=((0.20, 0.30, 0.60), (0.60, 0.20, 0.20), (0.30, 0.50, 0.30),
                                (0.85, 0.85, 0.80), (0.15, 0.15, 0.15))),
    "traffic_cone": dict(categories=("movable_object.trafficcone",), wlh=(0.41, 0.41, 1.07),
                         palette=((1.00, 0.45, 0.05),)),
}

@dataclass(frozen=True)
class WorldProfile:
    """How the world is laid out (everything else -- classes, sizes, motions, rendering -- is shared).

    ``ego_speed`` (m/s) range of the ego's cruise-speed targets, ``ego_stop_prob`` chance that a
    3-6 s segment is a stop; ``ahead`` / ``ahead_near`` (m) range of an object's longitudinal offset
    from the ego at its anchor time (vehicles, pedestrians / barrier and cone rows); ``spawn``
    multiplies how many objects (or rows) of each class the scene tries to place: one factor for all
    classes, or ``((class, factor), ...)`` (classes not named keep 1.0; every class keeps >= 1)."""
    name: str
    ego_speed: tuple = (3.0, 13.0)
    ego_stop_prob: float = 0.15
    ahead: tuple = (-40.0, 55.0)
    ahead_near: tuple = (-25.0, 30.0)
    spawn: float | tuple = 1.0
    #: ``((class, count), ...)``: columns of 3 static objects of that class standing one behind
    #: another along a ray from the cameras (the hard case for depth: duplicates along rays)
    columns: tuple = ()


#: ``realistic``: nuScenes-like urban driving (objects up to ~60 m, 3-13 m/s).
#: ``demo``: the CPU demo's world -- slower ego (1-6 m/s) and objects kept within ~35 m, so that a
#: small model trained for minutes on 2 cores sees every object at a learnable size.
PROFILES = {
    "realistic": WorldProfile("realistic"),
    "demo": WorldProfile("demo", ego_speed=(1.0, 6.0), ego_stop_prob=0.3, ahead=(-25.0, 32.0),
                         ahead_near=(-18.0, 24.0),
                         spawn=(("car", 0.4), ("pedestrian", 0.5), ("barrier", 0.5), ("traffic_cone", 0.5))),
    # ``rays``: the demo world plus columns of cars and pedestrians along camera rays (4 + 4 per
    # scene, 3 objects each) -- makes the duplicates that ray denoising targets frequent
    "rays": WorldProfile("rays", ego_speed=(1.0, 6.0), ego_stop_prob=0.3, ahead=(-25.0, 32.0),
                         ahead_near=(-18.0, 24.0),
                         spawn=(("car", 0.3), ("pedestrian", 0.3), ("barrier", 0.5), ("traffic_cone", 0.5)),
                         columns=(("car", 4), ("pedestrian", 4))),
}


def get_profile(profile: "str | WorldProfile") -> WorldProfile:
    if isinstance(profile, WorldProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown world profile {profile!r}; available: {', '.join(PROFILES)}") from None


#: Motion/attribute kind of an object (constant per instance).
KIND_MOVING, KIND_PARKED, KIND_STOPPED, KIND_STATIC = 0, 1, 2, 3


def make_token(*parts) -> str:
    """Deterministic 32-hex-digit nuScenes-style token from arbitrary parts."""
    return hashlib.md5("|".join(str(p) for p in ("raydn-synth",) + parts).encode()).hexdigest()


@dataclass
class EgoTrack:
    """Ego trajectory sampled every ``SIM_DT`` seconds: ``t`` (T,), ``xy`` (T, 2) global metres,
    ``yaw`` (T,) radians (unwrapped), ``speed`` (T,) m/s."""
    t: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray

    def pose_at(self, t) -> tuple[np.ndarray, np.ndarray]:
        """Linear interpolation at times ``t`` (K,) -> (xy (K, 2), yaw (K,)), float64."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        x = np.interp(t, self.t, self.xy[:, 0])
        y = np.interp(t, self.t, self.xy[:, 1])
        return np.stack([x, y], -1), np.interp(t, self.t, self.yaw)


@dataclass
class Objects:
    """Object tracks of one scene (N objects, straight constant-speed motion).

    ``cls`` (N,) index into ``CLASS_NAMES``; ``category`` list of N nuScenes category names;
    ``wlh`` (N, 3) metres; ``yaw`` (N,) heading; ``anchor_xy`` (N, 2) global position at time
    ``anchor_t`` (N,) s; ``speed`` (N,) m/s along the heading; ``kind`` (N,) KIND_*;
    ``rider`` (N,) bool (cycles); ``colors`` (N, 4, 3) RGB of the colour roles
    (primary, secondary, dark, skin)."""
    cls: np.ndarray
    category: list
    wlh: np.ndarray
    yaw: np.ndarray
    anchor_xy: np.ndarray
    anchor_t: np.ndarray
    speed: np.ndarray
    kind: np.ndarray
    rider: np.ndarray
    colors: np.ndarray

    def __len__(self) -> int:
        return int(self.cls.shape[0])

    def centers_at(self, t: float) -> np.ndarray:
        """Box centres (N, 3) global at time ``t`` (s); z = h / 2."""
        d = np.stack([np.cos(self.yaw), np.sin(self.yaw)], -1)
        xy = self.anchor_xy + (self.speed * (t - self.anchor_t))[:, None] * d
        return np.concatenate([xy, self.wlh[:, 2:3] / 2.0], -1)

    def velocity(self) -> np.ndarray:
        """Global velocity (N, 2) m/s."""
        return self.speed[:, None] * np.stack([np.cos(self.yaw), np.sin(self.yaw)], -1)


@dataclass
class SceneSim:
    """One simulated scene: ``name``, ``index`` (position in the dataroot), keyframe times
    ``sample_t`` (S,) s, ``start_us`` timestamp of keyframe 0 (µs), ego track, objects and
    lighting ``sun`` (3,) unit vector towards the sun (global)."""
    name: str
    index: int
    seed: int
    sample_t: np.ndarray
    start_us: int
    ego: EgoTrack
    objects: Objects
    sun: np.ndarray
    date: str

    @property
    def sample_us(self) -> np.ndarray:
        """Keyframe (LIDAR_TOP) timestamps (S,) int64 µs."""
        return self.start_us + np.round(self.sample_t * 1e6).astype(np.int64)


def _simulate_ego(rng: np.random.Generator, duration: float, prof: WorldProfile) -> EgoTrack:
    t = np.arange(-1.0, duration + 1.0 + SIM_DT, SIM_DT)
    n = t.shape[0]
    # piecewise targets for speed and yaw rate
    target_v = np.empty(n)
    yaw_rate = np.empty(n)
    v0 = rng.uniform(0.0, prof.ego_speed[1] - 1.0)
    tt, seg_v, seg_w = t[0], v0, 0.0
    i = 0
    while i < n:
        seg_len = int(rng.uniform(3.0, 6.0) / SIM_DT)
        seg_v = 0.0 if rng.random() < prof.ego_stop_prob else rng.uniform(*prof.ego_speed)
        seg_w = rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.3) if rng.random() < 0.4 else 0.0
        target_v[i:i + seg_len] = seg_v
        yaw_rate[i:i + seg_len] = seg_w
        i += seg_len
    del tt
    speed = np.empty(n)
    v = v0
    for k in range(n):  # scalar integration over ~500 steps (simulation, not a hot path)
        dv = np.clip(target_v[k] - v, -3.5 * SIM_DT, 2.5 * SIM_DT)
        v = max(0.0, v + dv)
        speed[k] = v
    w = yaw_rate * np.minimum(1.0, speed / 3.0)
    yaw = rng.uniform(-np.pi, np.pi) + np.concatenate([[0.0], np.cumsum(w[:-1] * SIM_DT)])
    step = np.stack([np.cos(yaw), np.sin(yaw)], -1) * (speed * SIM_DT)[:, None]
    xy = np.concatenate([np.zeros((1, 2)), np.cumsum(step[:-1], 0)]) + rng.uniform(300.0, 1700.0, 2)
    return EgoTrack(t=t, xy=xy, yaw=yaw, speed=speed)


def _jitter_color(rng, base) -> np.ndarray:
    c = np.asarray(base) * rng.uniform(0.8, 1.12) + rng.normal(0.0, 0.03, 3)
    return np.clip(c, 0.02, 1.0)


def _spawn_plan(rng: np.random.Generator, spawn: float | tuple = 1.0,
                columns: tuple = ()) -> list[tuple[str, str, int]]:
    """(class, role, group size) of the objects to place in one scene (``spawn`` scales the counts,
    see :class:`WorldProfile`)."""
    plan = [("trailer", "parked", 1), ("trailer", "parked", 1), ("bus", "moving", 1), ("bus", "stopped", 1)]
    plan += [("construction_vehicle", "parked", 1), ("construction_vehicle", "slow", 1)]
    plan += [("truck", "moving", 1), ("truck", "parked", 1), ("truck", "stopped", 1)]
    plan += [("barrier", "row", int(rng.integers(3, 6))) for _ in range(2)]
    plan += [("traffic_cone", "row", int(rng.integers(3, 6))) for _ in range(2)]
    plan += [("car", "moving", 1)] * 6 + [("car", "parked", 1)] * 6 + [("car", "stopped", 1)] * 2
    plan += [("motorcycle", "moving", 1), ("motorcycle", "moving", 1), ("motorcycle", "parked", 1)]
    plan += [("bicycle", "moving", 1), ("bicycle", "moving", 1), ("bicycle", "parked", 1)]
    plan += [("pedestrian", "moving", 1)] * 7 + [("pedestrian", "standing", 1)] * 3
    factors = dict(spawn) if isinstance(spawn, tuple) else {c: float(spawn) for c in CLASS_SPECS}
    if any(f != 1.0 for f in factors.values()):  # keep an evenly spread subset of each class's entries
        kept = set()  # plan positions; the plan's order is kept (large vehicles are placed first)
        for c in CLASS_SPECS:
            pos = [i for i, e in enumerate(plan) if e[0] == c]
            keep = max(1, round(len(pos) * factors.get(c, 1.0)))
            if keep < len(pos):
                pos = [pos[int(j)] for j in np.linspace(0, len(pos) - 1, keep).round()]
            kept.update(pos)
        plan = [e for i, e in enumerate(plan) if i in kept]
    for cls_name, count in columns:  # after the profile's own plan: its draws are unchanged
        plan += [(cls_name, "column", 3)] * int(count)
    return plan


def _propose(rng, cls_name, role, group, ego: EgoTrack, duration, prof: WorldProfile):
    """Propose one object group: list of (xy (2,), yaw, speed, kind) at anchor time tau."""
    tau = rng.uniform(0.0, duration)
    (exy,), (eyaw,) = ego.pose_at(tau)
    fwd = np.array([np.cos(eyaw), np.sin(eyaw)])
    left = np.array([-fwd[1], fwd[0]])
    side = rng.choice([-1.0, 1.0])
    near = cls_name in ("barrier", "traffic_cone")
    s = rng.uniform(*prof.ahead_near) if near else rng.uniform(*prof.ahead)
    heading = eyaw + (np.pi if rng.random() < 0.4 else 0.0)
    speed, kind = 0.0, KIND_STATIC
    if role in ("moving", "stopped", "slow"):
        d = rng.choice([3.6, 7.2]) * side + rng.normal(0.0, 0.25)
        if cls_name in ("motorcycle", "bicycle"):
            d = side * rng.uniform(5.0, 6.5)
        if cls_name == "pedestrian":
            d = side * rng.uniform(7.0, 14.0)
            speed = rng.uniform(0.8, 1.7)
        elif role == "moving":
            speed = {"bicycle": rng.uniform(2.5, 6.0), "motorcycle": rng.uniform(4.0, 11.0)}.get(
                cls_name, rng.uniform(3.0, 13.0))
        elif role == "slow":
            speed = rng.uniform(1.0, 2.5)
        kind = KIND_MOVING if speed > 0 else KIND_STOPPED
        heading = heading + rng.normal(0.0, 0.04)
    elif role in ("parked", "standing"):
        d = side * {"pedestrian": rng.uniform(6.0, 14.0), "trailer": rng.uniform(11.0, 16.0),
                    "bus": rng.uniform(10.0, 13.0)}.get(cls_name, rng.uniform(9.5, 13.0))
        if cls_name in ("pedestrian", "motorcycle", "bicycle") or rng.random() < 0.25:
            heading = rng.uniform(-np.pi, np.pi)
        kind = KIND_PARKED
    else:  # rows of barriers / cones
        d = side * (rng.uniform(5.0, 14.0) if cls_name == "barrier" else rng.uniform(3.8, 9.0))
        heading = eyaw + rng.normal(0.0, 0.1)
    if role == "column":  # objects one behind another along a ray from the camera cluster
        bearing = eyaw + rng.uniform(-1.0, 1.0) + (np.pi if rng.random() < 0.3 else 0.0)
        ray = np.array([np.cos(bearing), np.sin(bearing)])
        origin = exy + 1.3 * fwd
        r0 = rng.uniform(7.0, 12.0)
        spacing = rng.uniform(7.0, 9.0) if cls_name == "car" else rng.uniform(3.0, 4.5)
        yaw_obj = rng.uniform(-np.pi, np.pi) if cls_name == "pedestrian" else bearing + rng.normal(0.0, 0.3)
        kind = KIND_PARKED
        return tau, [(origin + (r0 + k * spacing) * ray, yaw_obj, 0.0, kind) for k in range(group)]
    base = exy + s * fwd + d * left
    out = []
    if role == "row":
        spacing = (CLASS_SPECS[cls_name]["wlh"][0] + 0.35) if cls_name == "barrier" else rng.uniform(1.5, 2.5)
        row_dir = np.array([np.cos(heading), np.sin(heading)])
        yaw_obj = heading - np.pi / 2 if cls_name == "barrier" else rng.uniform(-np.pi, np.pi)
        for k in range(group):
            out.append((base + (k - (group - 1) / 2) * spacing * row_dir, yaw_obj, 0.0, KIND_STATIC))
    else:
        out.append((base, heading, speed, kind))
    return tau, out


def _sample_size(rng, cls_name, category, rider) -> np.ndarray:
    w, l, h = CLASS_SPECS[cls_name]["wlh"]
    if category == "vehicle.bus.bendy":
        l *= 1.6
    if category == "human.pedestrian.child":
        w, l, h = w * 0.8, l * 0.8, h * 0.7
    if cls_name in ("motorcycle", "bicycle") and not rider:
        h *= 0.72
    scale = np.exp(rng.normal(0.0, 0.07, 3))
    return np.array([w, l, h]) * scale


def simulate_scene(name: str, index: int, seed: int, n_samples: int,
                   profile: "str | WorldProfile" = "realistic") -> SceneSim:
    """Simulate one scene deterministically from ``(seed, index, profile)`` (the name is only a label)."""
    prof = get_profile(profile)
    rng = np.random.default_rng([int(seed), int(index), 7])
    duration = (n_samples - 1) * KEYFRAME_DT
    ego = _simulate_ego(rng, duration, prof)
    sample_t = np.arange(n_samples) * KEYFRAME_DT
    check_t = np.concatenate([sample_t - 0.05, sample_t + 0.05])
    ego_xy, ego_yaw = ego.pose_at(check_t)
    ego_c = ego_xy + 1.3 * np.stack([np.cos(ego_yaw), np.sin(ego_yaw)], -1)  # ego box centre

    rows = []  # accepted objects: dict per object
    acc_pos = np.zeros((check_t.shape[0], 0, 2))
    acc_rad = np.zeros(0)
    for cls_name, role, group in _spawn_plan(rng, prof.spawn, prof.columns):
        spec = CLASS_SPECS[cls_name]
        for _attempt in range(80):
            tau, members = _propose(rng, cls_name, role, group, ego, duration, prof)
            cats = spec["categories"]
            if cls_name == "bus":
                category = cats[1] if rng.random() < 0.2 else cats[0]
            elif cls_name == "pedestrian":
                category = cats[int(rng.choice(3, p=[0.8, 0.1, 0.1]))]
            else:
                category = cats[0]
            rider = cls_name in ("motorcycle", "bicycle") and (role == "moving" or rng.random() < 0.3)
            sizes = [_sample_size(rng, cls_name, category, rider) for _ in members]
            if cls_name in ("barrier", "traffic_cone"):  # one size per row
                sizes = [sizes[0]] * len(members)
            pos = np.stack([np.asarray(m[0])[None, :] + m[2] * (check_t - tau)[:, None]
                            * np.array([np.cos(m[1]), np.sin(m[1])]) for m in members], 1)
            rad = np.array([0.5 * np.hypot(sz[0], sz[1]) for sz in sizes])
            d_ego = np.linalg.norm(pos - ego_c[:, None, :], axis=-1)
            if np.any(d_ego < rad[None] + 2.6):
                continue
            if acc_rad.size:
                d = np.linalg.norm(pos[:, :, None, :] - acc_pos[:, None, :, :], axis=-1)
                if np.any(d < 0.8 * (rad[:, None] + acc_rad[None, :])[None]):
                    continue
            break
        else:
            continue
        acc_pos = np.concatenate([acc_pos, pos], 1)
        acc_rad = np.concatenate([acc_rad, rad])
        palette = spec["palette"]
        for m, sz in zip(members, sizes):
            primary = _jitter_color(rng, palette[int(rng.integers(len(palette)))])
            if cls_name == "barrier":
                secondary = np.array([0.95, 0.95, 0.93])
            elif cls_name in ("car", "bus", "truck"):
                secondary = primary * 0.35 + np.array([0.05, 0.07, 0.1])
            else:
                secondary = _jitter_color(rng, CLASS_SPECS["pedestrian"]["palette"][int(rng.integers(5))])
            dark = np.clip(np.array([0.08, 0.08, 0.1]) + rng.normal(0, 0.02, 3), 0.0, 1.0)
            skin = _jitter_color(rng, (0.80, 0.62, 0.50))
            rows.append(dict(cls=CLASS_NAMES.index(cls_name), category=category, wlh=sz, yaw=m[1],
                             xy=np.asarray(m[0], dtype=np.float64), tau=tau, speed=m[2], kind=m[3],
                             rider=rider, colors=np.stack([primary, secondary, dark, skin])))
    objects = Objects(
        cls=np.array([r["cls"] for r in rows], dtype=np.int64),
        category=[r["category"] for r in rows],
        wlh=np.array([r["wlh"] for r in rows], dtype=np.float64).reshape(-1, 3),
        yaw=np.array([r["yaw"] for r in rows], dtype=np.float64),
        anchor_xy=np.array([r["xy"] for r in rows], dtype=np.float64).reshape(-1, 2),
        anchor_t=np.array([r["tau"] for r in rows], dtype=np.float64),
        speed=np.array([r["speed"] for r in rows], dtype=np.float64),
        kind=np.array([r["kind"] for r in rows], dtype=np.int64),
        rider=np.array([r["rider"] for r in rows], dtype=bool),
        colors=np.array([r["colors"] for r in rows], dtype=np.float32).reshape(-1, 4, 3),
    )
    sun_az, sun_el = rng.uniform(-np.pi, np.pi), rng.uniform(0.6, 1.1)
    sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
    start_us = 1532402927647951 + int(index) * 3_600_000_000 + int(rng.integers(0, 1_000_000_000))
    day = 1 + (int(seed) * 7 + int(index)) % 28
    return SceneSim(name=name, index=index, seed=int(seed), sample_t=sample_t, start_us=start_us,
                    ego=ego, objects=objects, sun=sun, date=f"2018-08-{day:02d}")
