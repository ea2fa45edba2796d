"""Vectorised ray casting of the synthetic world: cameras (shaded RGB + instance ids) and the
LIDAR_TOP ring scan.

Objects are rendered as a few class-specific solids ("parts", oriented boxes) that lie inside the
annotation box; the ground is the plane z = 0 (global) with a procedural texture that is a
function of global position (so it moves consistently with ego motion); the sky is a gradient.

Ray casting works per primitive on a conservative rectangle of the ray grid (image pixels for a
camera, beam rows x azimuth columns for the lidar): all (ray, primitive) candidate pairs are built
at once with ``np.repeat``, slab-tested together, and the nearest hit per ray is kept with a
lexsort -- no Python loop over cameras' pixels, boxes or rays.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from raydn.geometry import CLASS_NAMES

_C = {n: i for i, n in enumerate(CLASS_NAMES)}

# Part tables: rows (cx, cy, cz, sx, sy, sz, colour_role, pattern, band_lo, band_hi, front_mark)
# in fractions of the box (box spans [-0.5, 0.5]^3 along its local x = length, y = width, z).
# colour roles: 0 primary, 1 secondary, 2 dark, 3 skin. pattern: 0 plain, 1 stripes along y,
# 2 band in local z (fractions of the part half-height in [band_lo, band_hi]) in colour role 2/1.
_PARTS = {
    "car": [(0, 0, -0.225, 1, 1, 0.55, 0, 0, 0, 0, 1),
            (-0.08, 0, 0.275, 0.5, 0.86, 0.45, 1, 0, 0, 0, 0)],
    "truck": [(0.38, 0, -0.075, 0.24, 1, 0.85, 0, 0, 0, 0, 1),
              (-0.13, 0, 0, 0.74, 1, 1, 1, 0, 0, 0, 0)],
    "construction_vehicle": [(0, 0, -0.2, 1, 1, 0.6, 0, 0, 0, 0, 1),
                             (-0.2, 0, 0.3, 0.35, 0.8, 0.4, 1, 0, 0, 0, 0),
                             (0.3, 0, 0.25, 0.4, 0.15, 0.5, 2, 0, 0, 0, 0)],
    "bus": [(0, 0, 0, 1, 1, 1, 0, 2, 0.1, 0.6, 1)],
    "trailer": [(0, 0, 0.075, 1, 1, 0.85, 0, 0, 0, 0, 0),
                (0.47, 0, -0.35, 0.06, 0.25, 0.1, 2, 0, 0, 0, 0)],
    "barrier": [(0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0)],
    "motorcycle_rider": [(0, 0, -0.225, 1, 0.5, 0.55, 0, 0, 0, 0, 1),
                         (-0.1, 0, 0.2, 0.3, 0.8, 0.6, 1, 0, 0, 0, 0),
                         (-0.05, 0, 0.42, 0.15, 0.4, 0.16, 3, 0, 0, 0, 0)],
    "motorcycle": [(0, 0, -0.2, 1, 0.5, 0.6, 0, 0, 0, 0, 1),
                   (0.35, 0, 0.4, 0.1, 1, 0.2, 2, 0, 0, 0, 0)],
    "bicycle_rider": [(0, 0, -0.25, 1, 0.25, 0.5, 0, 0, 0, 0, 1),
                      (-0.1, 0, 0.2, 0.3, 0.9, 0.5, 1, 0, 0, 0, 0),
                      (-0.05, 0, 0.42, 0.16, 0.5, 0.16, 3, 0, 0, 0, 0)],
    "bicycle": [(0, 0, -0.15, 1, 0.25, 0.7, 0, 0, 0, 0, 1),
                (0.35, 0, 0.4, 0.1, 1, 0.2, 2, 0, 0, 0, 0)],
    "pedestrian": [(0, 0, -0.275, 0.5, 0.6, 0.45, 2, 0, 0, 0, 0),
                   (0, 0, 0.15, 0.6, 1.0, 0.4, 0, 0, 0, 0, 1),
                   (0, 0, 0.425, 0.35, 0.4, 0.15, 3, 0, 0, 0, 0)],
    "traffic_cone": [(0, 0, -0.45, 1, 1, 0.1, 0, 0, 0, 0, 0),
                     (0, 0, -0.1, 0.6, 0.6, 0.6, 0, 2, -0.3, 0.3, 0),
                     (0, 0, 0.3, 0.3, 0.3, 0.4, 0, 0, 0, 0, 0)],
}
_PART_ARR = {k: np.array(v, dtype=np.float64) for k, v in _PARTS.items()}

SKY_ZENITH = np.array([0.42, 0.58, 0.85], dtype=np.float32)
SKY_HORIZON = np.array([0.82, 0.86, 0.90], dtype=np.float32)
FOG = np.array([0.72, 0.75, 0.78], dtype=np.float32)


@dataclass
class Primitives:
    """P oriented boxes: ``center`` (P, 3) global float64, ``yaw`` (P,), ``half`` (P, 3) half
    sizes along local x (length), y (width), z; ``color`` (P, 3), ``color2`` (P, 3) (stripes /
    band colour), ``pattern`` (P,), ``band`` (P, 2), ``front`` (P,) bool (mark the +x face as
    the front and -x as the back), ``obj`` (P,) owning object index."""
    center: np.ndarray
    yaw: np.ndarray
    half: np.ndarray
    color: np.ndarray
    color2: np.ndarray
    pattern: np.ndarray
    band: np.ndarray
    front: np.ndarray
    obj: np.ndarray

    def __len__(self):
        return int(self.obj.shape[0])


def part_key(cls: int, rider: bool) -> str:
    name = CLASS_NAMES[int(cls)]
    if name in ("motorcycle", "bicycle") and rider:
        return name + "_rider"
    return name


def build_primitives(centers, yaw, wlh, cls, rider, colors=None) -> Primitives:
    """Class-specific solids of N boxes.

    centers (N, 3) global box centres (m), yaw (N,), wlh (N, 3) nuScenes sizes, cls (N,) class
    index, rider (N,) bool, colors (N, 4, 3) colour roles (None: grey, for masks only)."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    n = centers.shape[0]
    yaw = np.asarray(yaw, dtype=np.float64).reshape(n)
    wlh = np.asarray(wlh, dtype=np.float64).reshape(n, 3)
    keys = [part_key(c, r) for c, r in zip(np.asarray(cls).reshape(n), np.asarray(rider).reshape(n))]
    if colors is None:
        colors = np.full((n, 4, 3), 0.5, dtype=np.float32)
    if n == 0:
        z3, z = np.zeros((0, 3)), np.zeros(0)
        return Primitives(z3, z, z3.astype(np.float32), z3.astype(np.float32), z3.astype(np.float32),
                          z.astype(np.int8), np.zeros((0, 2)), z.astype(bool), z.astype(np.int32))
    counts = np.array([_PART_ARR[k].shape[0] for k in keys])
    table = np.concatenate([_PART_ARR[k] for k in keys], 0)  # (P, 11)
    obj = np.repeat(np.arange(n), counts)
    lwh = wlh[obj][:, [1, 0, 2]]  # local x = length, y = width
    off = table[:, 0:3] * lwh
    c, s = np.cos(yaw[obj]), np.sin(yaw[obj])
    center = centers[obj] + np.stack([c * off[:, 0] - s * off[:, 1], s * off[:, 0] + c * off[:, 1],
                                      off[:, 2]], -1)
    role = table[:, 6].astype(np.int64)
    col = colors[obj, role]
    pattern = table[:, 7].astype(np.int8)
    col2 = np.where((pattern == 2)[:, None] & (role == 0)[:, None] & (table[:, 8] > -0.2)[:, None],
                    colors[obj, 2], colors[obj, 1])
    half = table[:, 3:6] * lwh / 2.0
    half = np.maximum(half - 0.015, 0.8 * half)  # surfaces strictly inside the annotation box
    return Primitives(center=center, yaw=yaw[obj], half=half.astype(np.float32),
                      color=col.astype(np.float32), color2=col2.astype(np.float32), pattern=pattern,
                      band=table[:, 8:10], front=table[:, 10] > 0, obj=obj.astype(np.int32))


def box_corners(center, yaw, half) -> np.ndarray:
    """Corners (P, 8, 3) of oriented boxes (float64)."""
    sgn = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    loc = sgn[None] * np.asarray(half, dtype=np.float64)[:, None, :]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = c * loc[..., 0] - s * loc[..., 1]
    y = s * loc[..., 0] + c * loc[..., 1]
    return np.stack([x, y, loc[..., 2]], -1) + np.asarray(center)[:, None, :]


def _pairs(rects: np.ndarray, grid_w: int, wrap: bool = False):
    """Candidate (ray, prim) pairs of per-primitive rectangles ``rects`` (P, 4) = (c0, c1, r0, r1)
    (half-open, columns may exceed ``grid_w`` when ``wrap``). Returns ray index, prim index."""
    w = np.maximum(rects[:, 1] - rects[:, 0], 0)
    h = np.maximum(rects[:, 3] - rects[:, 2], 0)
    cnt = w * h
    total = int(cnt.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    prim = np.repeat(np.arange(rects.shape[0]), cnt)
    start = np.cumsum(cnt) - cnt
    k = np.arange(total) - start[prim]
    wp = w[prim]
    col = rects[prim, 0] + k % wp
    row = rects[prim, 2] + k // wp
    if wrap:
        col = col % grid_w
    return row * grid_w + col, prim


def _local_frame(origin, prims: Primitives):
    """Ray origin in every primitive's local frame (P, 3) and the primitives' cos/sin yaw."""
    rel = (origin[None, :] - prims.center).astype(np.float32)
    c = np.cos(prims.yaw).astype(np.float32)
    s = np.sin(prims.yaw).astype(np.float32)
    o_loc = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)
    return o_loc, c, s


def _slab(origin, dirs, prims: Primitives, ray, prim):
    """Slab test of unit rays (shared ``origin`` (3,) global) against oriented boxes for the
    candidate pairs (ray, prim). Returns hit (K,) bool and entry distance t (K,) float32."""
    o_loc, c, s = _local_frame(origin, prims)
    d = dirs[ray]
    cp, sp = c[prim], s[prim]
    o = o_loc[prim]
    hf = prims.half[prim]
    tn = np.full(ray.shape[0], -np.inf, np.float32)
    tf = np.full(ray.shape[0], np.inf, np.float32)
    for ax in range(3):  # three slabs
        if ax == 0:
            dl = cp * d[:, 0] + sp * d[:, 1]
        elif ax == 1:
            dl = -sp * d[:, 0] + cp * d[:, 1]
        else:
            dl = d[:, 2]
        inv = 1.0 / np.where(np.abs(dl) < 1e-9, np.float32(1e-9), dl)
        t1 = (-hf[:, ax] - o[:, ax]) * inv
        t2 = (hf[:, ax] - o[:, ax]) * inv
        np.maximum(tn, np.minimum(t1, t2), out=tn)
        np.minimum(tf, np.maximum(t1, t2), out=tf)
    hit = (tn <= tf) & (tn > 1e-3)
    return hit, tn


def _surface(origin, dirs, prims: Primitives, ray, prim, t):
    """Hit face of the (ray, prim) pairs at distance t: face axis (K,), outward sign (K,), local
    hit point (K, 3)."""
    o_loc, c, s = _local_frame(origin, prims)
    d = dirs[ray]
    cp, sp = c[prim], s[prim]
    d_loc = np.stack([cp * d[:, 0] + sp * d[:, 1], -sp * d[:, 0] + cp * d[:, 1], d[:, 2]], -1)
    local = o_loc[prim] + t[:, None] * d_loc
    rel = np.abs(local) / np.maximum(prims.half[prim], 1e-6)
    axis = np.argmax(rel, axis=1)
    sign = np.sign(np.take_along_axis(local, axis[:, None], 1)[:, 0])
    return axis, sign, local


def _nearest(ray, t, n_rays):
    """Index (into the pair arrays) of the nearest hit per ray; returns (rays, pair index)."""
    if ray.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((t, ray))
    r = ray[order]
    first = np.ones(r.shape[0], dtype=bool)
    first[1:] = r[1:] != r[:-1]
    return r[first], order[first]


def ground_color(gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Procedural ground texture at global positions (float64 metres) -> (n, 3) float32 RGB."""
    def h(ix, iy):
        v = (ix * 73856093) ^ (iy * 19349663) ^ ((ix * iy) * 83492791)
        return ((v >> 7) & 0xFFFF).astype(np.float32) / 65535.0

    fx, fy = np.floor(gx / 0.3).astype(np.int64), np.floor(gy / 0.3).astype(np.int64)
    fine = h(fx, fy)
    cx, cy = gx / 7.0, gy / 7.0
    ix, iy = np.floor(cx).astype(np.int64), np.floor(cy).astype(np.int64)
    ux, uy = (cx - ix).astype(np.float32), (cy - iy).astype(np.float32)
    ux, uy = ux * ux * (3 - 2 * ux), uy * uy * (3 - 2 * uy)
    coarse = (h(ix, iy) * (1 - ux) * (1 - uy) + h(ix + 1, iy) * ux * (1 - uy)
              + h(ix, iy + 1) * (1 - ux) * uy + h(ix + 1, iy + 1) * ux * uy)
    base = 0.30 + 0.10 * coarse + 0.07 * (fine - 0.5)
    rgb = np.stack([base, base, base * 1.04], -1)
    grass = np.clip((coarse - 0.72) * 6.0, 0.0, 1.0)[:, None]
    rgb = rgb * (1 - grass) + grass * np.array([0.25, 0.40, 0.18], np.float32) * (0.8 + 0.4 * fine[:, None])
    mx = np.mod(gx, 12.0)
    my = np.mod(gy, 12.0)
    line = ((mx < 0.15) & (np.mod(gy, 4.0) < 2.0)) | ((my < 0.15) & (np.mod(gx, 4.0) < 2.0))
    rgb[line] = np.array([0.85, 0.85, 0.80], np.float32)
    return rgb.astype(np.float32)


@dataclass
class CameraView:
    """A pinhole camera in the global frame: ``K`` (3, 3) for an image of ``size`` (W, H) pixels,
    ``R`` (3, 3) camera -> global rotation (OpenCV camera axes), ``position`` (3,) global."""
    K: np.ndarray
    R: np.ndarray
    position: np.ndarray
    size: tuple


@functools.lru_cache(maxsize=16)
def _camera_frame_rays(K: tuple, size: tuple, scale: float):
    w, h = int(round(size[0] * scale)), int(round(size[1] * scale))
    u = (np.arange(w) + 0.5) / scale - 0.5
    v = (np.arange(h) + 0.5) / scale - 0.5
    uu, vv = np.meshgrid(u, v)
    pix = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], 0)
    d = np.linalg.solve(np.array(K).reshape(3, 3), pix).T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d, w, h


def camera_rays(view: CameraView, scale: float = 1.0):
    """Unit ray directions (H' * W', 3) float32 global for the pixel centres of an internal grid of
    ``scale`` times the image size; internal pixel (i, j) centre = image pixel ((j + .5)/scale - .5,
    (i + .5)/scale - .5)."""
    K = tuple(float(v) for v in np.asarray(view.K, dtype=np.float64).ravel())
    d, w, h = _camera_frame_rays(K, tuple(int(v) for v in view.size), float(scale))
    return (d @ view.R.T).astype(np.float32), w, h


_EDGES = np.array([(a, b) for a in range(8) for b in range(8) if a < b and bin(a ^ b).count("1") == 1])


def _camera_rects(view: CameraView, prims: Primitives, scale, w, h, near: float = 0.05):
    """Conservative pixel rectangles (P, 4) = (c0, c1, r0, r1) of the primitives on the internal
    grid: projections of the front corners and of the edge crossings of the near plane."""
    corners = box_corners(prims.center, prims.yaw, prims.half)  # (P, 8, 3)
    cam = (corners - view.position) @ view.R  # global -> camera (R orthonormal)
    a, b = cam[:, _EDGES[:, 0]], cam[:, _EDGES[:, 1]]  # (P, 12, 3)
    za, zb = a[..., 2], b[..., 2]
    cross = (za - near) * (zb - near) < 0
    f = np.where(cross, (near - za) / np.where(cross, zb - za, 1.0), 0.0)
    pts = np.concatenate([cam, a + f[..., None] * (b - a)], 1)  # (P, 20, 3)
    valid = np.concatenate([cam[..., 2] >= near, cross], 1)
    z = np.where(valid, pts[..., 2], 1.0)
    uv = (pts[..., :2] / z[..., None]) @ view.K[:2, :2].T + view.K[:2, 2]
    gi = (uv + 0.5) * scale - 0.5
    big = 1e9
    lo = np.where(valid[..., None], gi, big).min(1)
    hi = np.where(valid[..., None], gi, -big).max(1)
    lo = np.clip(lo, -1, max(w, h) + 1)
    hi = np.clip(hi, -1, max(w, h) + 1)
    rects = np.stack([np.clip(np.floor(lo[:, 0]), 0, w), np.clip(np.ceil(hi[:, 0]) + 1, 0, w),
                      np.clip(np.floor(lo[:, 1]), 0, h), np.clip(np.ceil(hi[:, 1]) + 1, 0, h)], -1)
    rects[~valid.any(1)] = 0
    return rects.astype(np.int64)


def render_camera(view: CameraView, prims: Primitives, n_objects: int, sun=None, scale: float = 1.0,
                  shade: bool = True):
    """Ray-cast one camera.

    Returns ``rgb`` (H', W', 3) float32 in [0, 1] (None when ``shade`` is False), ``inst``
    (H', W') int32 object index or -1, ``visible`` (n_objects,) pixel counts where the object is
    the nearest surface and ``unoccluded`` (n_objects,) pixel counts the object would cover alone,
    at the internal grid of ``scale`` times ``view.size``."""
    dirs, w, h = camera_rays(view, scale)
    n_rays = dirs.shape[0]
    inst = np.full(n_rays, -1, dtype=np.int32)
    visible = np.zeros(n_objects, np.int64)
    unocc = np.zeros(n_objects, np.int64)
    origin = np.asarray(view.position, dtype=np.float64)
    win_ray = np.zeros(0, np.int64)
    if len(prims):
        rects = _camera_rects(view, prims, scale, w, h)
        ray, prim = _pairs(rects, w)
        if ray.size:
            hit, t = _slab(origin, dirs, prims, ray, prim)
            ray, prim, t = ray[hit], prim[hit], t[hit]
            if ray.size:
                obj = prims.obj[prim]
                key = np.unique(ray * max(n_objects, 1) + obj)
                unocc = np.bincount(key % max(n_objects, 1), minlength=n_objects)
                win_ray, win = _nearest(ray, t, n_rays)
                inst[win_ray] = obj[win]
                visible = np.bincount(obj[win], minlength=n_objects)
    rgb = None
    if shade:
        rgb = np.empty((n_rays, 3), np.float32)
        dz = dirs[:, 2]
        elev = np.clip(dz, 0.0, 1.0)[:, None]
        rgb[:] = SKY_HORIZON * (1 - elev ** 0.6) + SKY_ZENITH * elev ** 0.6
        ground = dz < -1e-4
        tg = np.where(ground, -origin[2] / np.where(ground, dz, -1.0), np.inf)
        ground &= tg < 400.0
        gi = np.nonzero(ground)[0]
        gx = origin[0] + tg[gi] * dirs[gi, 0]
        gy = origin[1] + tg[gi] * dirs[gi, 1]
        fog = (1.0 - np.exp(-tg[gi] / 140.0)).astype(np.float32)[:, None]
        rgb[gi] = ground_color(gx, gy) * (1 - fog) + FOG * fog
        if win_ray.size:
            sun = np.asarray(sun if sun is not None else (0.3, 0.2, 0.9), dtype=np.float32)
            p = prim[win]
            ax, sg, loc = _surface(origin, dirs, prims, win_ray, p, t[win])
            n_loc = np.zeros((p.shape[0], 3), np.float32)
            n_loc[np.arange(p.shape[0]), ax] = sg
            c = np.cos(prims.yaw[p]).astype(np.float32)
            s = np.sin(prims.yaw[p]).astype(np.float32)
            n_glob = np.stack([c * n_loc[:, 0] - s * n_loc[:, 1], s * n_loc[:, 0] + c * n_loc[:, 1],
                               n_loc[:, 2]], -1)
            lam = np.clip(n_glob @ (sun / np.linalg.norm(sun)), 0.0, 1.0)
            col = prims.color[p].copy()
            pat = prims.pattern[p]
            half = prims.half[p]
            stripe = (pat == 1) & (np.floor((loc[:, 1] + half[:, 1]) / 0.42).astype(np.int64) % 2 == 1)
            zf = loc[:, 2] / half[:, 2]
            band = prims.band[p]
            in_band = (pat == 2) & (zf >= band[:, 0]) & (zf <= band[:, 1]) & (ax != 2)
            col[stripe | in_band] = prims.color2[p][stripe | in_band]
            fr = prims.front[p] & (ax == 0)
            front_face = fr & (sg > 0)
            back_face = fr & (sg < 0)
            col[front_face] = 0.45 * col[front_face] + 0.55 * np.array([1.0, 0.97, 0.8], np.float32)
            col[back_face] = 0.55 * col[back_face] + 0.45 * np.array([0.75, 0.05, 0.05], np.float32)
            shade_f = (0.42 + 0.58 * lam)[:, None]
            dist = t[win][:, None]
            fog_o = (1.0 - np.exp(-dist / 140.0)).astype(np.float32)
            rgb[win_ray] = (col * shade_f) * (1 - fog_o) + FOG * fog_o
        rgb = np.clip(rgb, 0.0, 1.0).reshape(h, w, 3)
    return rgb, inst.reshape(h, w), visible, unocc


def lidar_scan(l2g: np.ndarray, prims: Primitives, n_objects: int, elevations_deg, n_azimuth: int = 1080,
               max_range: float = 70.0, rng: np.random.Generator | None = None):
    """Simulated rotating lidar at pose ``l2g`` (4x4 lidar -> global, float64).

    Returns ``points`` (M, 5) float32 [x, y, z, intensity, ring] in the lidar frame, ``obj``
    (M,) int32 object index per point (-1 = ground), ``counts`` (n_objects,) hits per object and
    ``ray_idx`` (M,) index of each point's ray (ring * n_azimuth + azimuth column)."""
    el = np.deg2rad(np.asarray(elevations_deg, dtype=np.float64))
    az = -np.pi + (np.arange(n_azimuth) + 0.5) * (2 * np.pi / n_azimuth)
    ce, se = np.cos(el)[:, None], np.sin(el)[:, None]
    d_l = np.stack([ce * np.cos(az)[None], ce * np.sin(az)[None], np.broadcast_to(se, (el.size, n_azimuth))], -1)
    d_l = d_l.reshape(-1, 3)
    R = l2g[:3, :3]
    origin = l2g[:3, 3].astype(np.float64)
    dirs = (d_l @ R.T).astype(np.float32)
    n_rays = dirs.shape[0]
    t_best = np.full(n_rays, np.inf, np.float32)
    obj_best = np.full(n_rays, -1, np.int32)
    gz = dirs[:, 2] < -1e-4
    tg = np.where(gz, -origin[2] / np.where(gz, dirs[:, 2], -1.0), np.inf).astype(np.float32)
    t_best = np.minimum(t_best, tg)
    counts = np.zeros(n_objects, np.int64)
    if len(prims):
        corners = box_corners(prims.center, prims.yaw, prims.half)
        loc = (corners - origin) @ R  # lidar frame
        r_xy = np.hypot(loc[..., 0], loc[..., 1])
        ctr = (prims.center - origin) @ R
        az_c = np.arctan2(ctr[:, 1], ctr[:, 0])
        rel = np.angle(np.exp(1j * (np.arctan2(loc[..., 1], loc[..., 0]) - az_c[:, None])))
        a0, a1 = az_c + rel.min(1), az_c + rel.max(1)
        step = 2 * np.pi / n_azimuth
        c0 = np.floor((a0 + np.pi) / step - 0.5).astype(np.int64)
        c1 = np.ceil((a1 + np.pi) / step - 0.5).astype(np.int64) + 1
        r_min = np.maximum(np.hypot(ctr[:, 0], ctr[:, 1]) - np.linalg.norm(prims.half[:, :2], axis=1), 0.05)
        r_max = r_xy.max(1)
        zmin, zmax = loc[..., 2].min(1), loc[..., 2].max(1)
        e_hi = np.arctan2(zmax, np.where(zmax > 0, r_min, r_max))
        e_lo = np.arctan2(zmin, np.where(zmin < 0, r_min, r_max))
        row0 = np.searchsorted(el, e_lo - 1e-6)
        row1 = np.searchsorted(el, e_hi + 1e-6)
        far = r_min > max_range
        c0 = c0 + n_azimuth  # keep non-negative before the modulo
        c1 = c1 + n_azimuth
        rects = np.stack([c0, np.minimum(c1, c0 + n_azimuth), row0, row1], -1)
        rects[far] = 0
        ray, prim = _pairs(rects, n_azimuth, wrap=True)
        if ray.size:
            hit, t = _slab(origin, dirs, prims, ray, prim)
            ray, prim, t = ray[hit], prim[hit], t[hit]
            wr, wi = _nearest(ray, t, n_rays)
            closer = t[wi] < t_best[wr]
            t_best[wr[closer]] = t[wi][closer]
            obj_best[wr[closer]] = prims.obj[prim[wi][closer]]
    keep = t_best <= max_range
    t_k = t_best[keep]
    if rng is not None:
        t_k = t_k + np.clip(rng.normal(0.0, 0.004, t_k.shape), -0.008, 0.008).astype(np.float32)
    pts = d_l[keep].astype(np.float32) * t_k[:, None]
    ob = obj_best[keep]
    ring = np.repeat(np.arange(el.size), n_azimuth)[keep].astype(np.float32)
    inten = np.where(ob >= 0, 40.0 + 8.0 * (ob % 5), 8.0).astype(np.float32)
    points = np.concatenate([pts, inten[:, None], ring[:, None]], 1).astype(np.float32)
    if n_objects:
        counts = np.bincount(ob[ob >= 0], minlength=n_objects)
    return points, ob, counts, np.nonzero(keep)[0]
