"""A synthetic world written as a genuine nuScenes dataroot (``raydn synth``).

* :func:`generate_world` -- simulate, render and write ``{out}/v1.0-mini`` (or ``v1.0-trainval``)
  with all 13 tables, ``samples/CAM_*/*.jpg`` (1600 x 900), ``samples/LIDAR_TOP/*.pcd.bin``
  (float32 N x 5: x, y, z, intensity, ring) and ``maps/*.png``. Keyframes only, 2 Hz, prev/next
  links filled; scene names come from the official splits so ``mini_train``/``mini_val`` (or
  ``train``/``val``) evaluation sets work unchanged.
* :func:`render_instance_masks` -- per-camera instance-id masks of a sample, from the tables
  alone (same camera model, any intrinsics/size): pixel value = index into the returned list of
  sample-annotation tokens, -1 = background.

Everything is deterministic for a seed (also with several worker processes). The dataroot is
built in a hidden temporary sibling folder and renamed into place at the end, so an interrupted
run never leaves a dataroot that looks complete.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raydn.core.frames import pose_matrix
from raydn.data import nuscenes_calib as calib
from raydn.data.synth.render import CameraView, build_primitives, render_camera
from raydn.data.synth.world import KEYFRAME_DT, simulate_scene
from raydn.data.synth.writer import (
    build_tables,
    cached_scene,
    render_sample_task,
    write_tables,
)
from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES, CLASS_NAMES

__all__ = ["generate_world", "scene_names", "render_instance_masks", "simulate_scene"]

_VERSIONS = {"mini": "v1.0-mini", "trainval": "v1.0-trainval"}
from raydn.data.prepare import NAME_MAPPING as _NAME_TO_CLASS  # noqa: E402  (mmdet3d NameMapping)
from raydn.data.synth.world import get_profile


def scene_names(n_scenes: int, split: str = "mini") -> list[str]:
    """Official scene names for a world of ``n_scenes``: training-split names first, then
    validation names. ``mini``: 10 -> the 8 mini_train + 2 mini_val scenes; fewer scenes keep
    the same 4:1 ratio with at least one validation scene (so ``mini_val`` is never empty).
    ``trainval``: the same rule with the train/val lists (ratio 700:150)."""
    try:
        from nuscenes.utils.splits import (
            create_splits_scenes,  # optional: raydn[nuscenes]
        )
    except ImportError as e:  # pragma: no cover - optional dependency
        raise DataError("raydn synth needs nuscenes-devkit (pip install 'raydn[nuscenes]')") from e
    sp = create_splits_scenes()
    if split not in _VERSIONS:
        raise DataError(f"--split must be one of {sorted(_VERSIONS)}, got {split!r}")
    train, val = (sp["mini_train"], sp["mini_val"]) if split == "mini" else (sp["train"], sp["val"])
    if not 1 <= n_scenes <= len(train) + len(val):
        raise DataError(f"--scenes must be in [1, {len(train) + len(val)}] for split {split!r}, got {n_scenes}")
    n_val = min(len(val), max(1, round(n_scenes * len(val) / (len(train) + len(val)))))
    n_train = n_scenes - n_val
    if n_train > len(train):
        n_train, n_val = len(train), n_scenes - len(train)
    return list(train[:n_train]) + list(val[:n_val])


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")


def generate_world(out_dir, scenes: int = 10, seed: int = 0, split: str = "mini", samples_per_scene: int = 40,
                   workers: int = 1, scale: float = 0.4, quality: int = 90, overwrite: bool = False,
                   progress: bool = True, profile: str = "realistic") -> Path:
    """Generate the synthetic nuScenes dataroot at ``out_dir`` and return its path.

    ``scenes`` scenes of ``samples_per_scene`` keyframes (0.5 s apart), deterministic for ``seed``;
    images are rendered at ``scale`` x 1600 x 900 and upscaled (bilinear) before JPEG encoding with
    ``quality``; ``workers`` processes render keyframes in parallel (results do not depend on it).
    ``profile`` chooses the layout (:data:`raydn.data.synth.world.PROFILES`): ``realistic``
    (nuScenes-like, objects up to ~60 m) or ``demo`` (slow ego, objects within ~35 m)."""
    try:
        profile = get_profile(profile).name
    except ValueError as e:
        raise DataError(str(e)) from None
    out = Path(out_dir)
    if samples_per_scene < 2:
        raise DataError(f"--samples-per-scene must be >= 2 (velocities need two keyframes), got {samples_per_scene}")
    names = scene_names(int(scenes), split)
    version = _VERSIONS[split]
    _prepare_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tasks = [(int(seed), i, name, int(samples_per_scene), k, str(tmp), float(scale), int(quality), profile)
             for i, name in enumerate(names) for k in range(samples_per_scene)]
    bar = tqdm(total=len(tasks), desc="raydn synth", unit="sample", disable=not progress)
    results = []
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(int(workers)) as pool:
            for r in pool.imap(render_sample_task, tasks, chunksize=1):
                results.append(r)
                bar.update(1)
    else:
        for t in tasks:
            results.append(render_sample_task(t))
            bar.update(1)
    bar.close()
    sims = [cached_scene(int(seed), i, name, int(samples_per_scene), profile) for i, name in enumerate(names)]
    records = [results[i * samples_per_scene:(i + 1) * samples_per_scene] for i in range(len(names))]
    tables = build_tables(int(seed), sims, records)
    write_tables(tmp, version, tables)
    with open(tmp / "raydn_synth.json", "w") as f:
        json.dump(dict(seed=int(seed), profile=profile, scenes=names, split=split, version=version,
                       samples_per_scene=int(samples_per_scene), scale=float(scale), quality=int(quality)), f, indent=1)
    if out.exists():
        trash = out.parent / f".{out.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, out)
    return out


@functools.lru_cache(maxsize=2)
def _load_tables(table_dir: str, mtime: float) -> dict:
    names = ("sample", "sample_data", "calibrated_sensor", "sensor", "ego_pose", "sample_annotation",
             "instance", "category", "attribute")
    tabs = {}
    for n in names:
        with open(os.path.join(table_dir, f"{n}.json")) as f:
            tabs[n] = {r["token"]: r for r in json.load(f)}
    by_sample = {}
    for r in tabs["sample_annotation"].values():
        by_sample.setdefault(r["sample_token"], []).append(r["token"])
    sd_by_sample = {}
    for r in tabs["sample_data"].values():
        ch = tabs["sensor"][tabs["calibrated_sensor"][r["calibrated_sensor_token"]]["sensor_token"]]["channel"]
        sd_by_sample.setdefault(r["sample_token"], {})[ch] = r["token"]
    tabs["_anns_by_sample"] = by_sample
    tabs["_sd_by_sample"] = sd_by_sample
    return tabs


def _find_version_dir(dataroot: Path, version: str | None) -> Path:
    cands = [version] if version else ["v1.0-mini", "v1.0-trainval", "v1.0-test"]
    for v in cands:
        if (dataroot / v / "sample.json").is_file():
            return dataroot / v
    raise DataError(f"no nuScenes tables found under {dataroot} (looked for {cands})")


def render_instance_masks(dataroot, sample_token: str, version: str | None = None,
                          intrinsics: np.ndarray | None = None, size: tuple[int, int] = calib.IMAGE_SIZE,
                          at_camera_time: bool = True, cameras=CAMERA_NAMES):
    """Instance-id masks of one sample's cameras, rendered from the tables of ``dataroot``.

    Args:
        intrinsics: optional (C, 3, 3) intrinsics replacing the calibrated ones (any camera model
            change that keeps the pinhole: resize, crop, flip -- a negative fx is allowed);
        size: output (W, H) in pixels;
        at_camera_time: move moving objects to each camera's timestamp using their neighbouring
            annotations (exactly what the JPEGs show); False renders the annotation boxes as-is.

    Returns ``masks`` (C, H, W) int32 (index into ``ann_tokens``, -1 = background) and
    ``ann_tokens`` (list of the sample's annotation tokens, in table order). The parts rendered
    are the same class-specific solids as in the images (derived from category, size and the
    cycle rider attribute)."""
    tdir = _find_version_dir(Path(dataroot), version)
    tabs = _load_tables(str(tdir), os.path.getmtime(tdir / "sample_annotation.json"))
    if sample_token not in tabs["sample"]:
        raise DataError(f"sample token {sample_token!r} not found in {tdir / 'sample.json'}")
    sample = tabs["sample"][sample_token]
    ann_tokens = tabs["_anns_by_sample"].get(sample_token, [])
    anns = [tabs["sample_annotation"][t] for t in ann_tokens]
    t0 = sample["timestamp"] * 1e-6
    centers = np.array([a["translation"] for a in anns], dtype=np.float64).reshape(-1, 3)
    vel = np.zeros_like(centers)
    for j, a in enumerate(anns):  # per annotation neighbour lookup (test utility, not a hot path)
        prev = tabs["sample_annotation"].get(a["prev"]) if a["prev"] else None
        nxt = tabs["sample_annotation"].get(a["next"]) if a["next"] else None
        p0 = prev or a
        p1 = nxt or a
        dt = (tabs["sample"][p1["sample_token"]]["timestamp"] - tabs["sample"][p0["sample_token"]]["timestamp"]) * 1e-6
        if dt > 0:
            vel[j] = (np.array(p1["translation"]) - np.array(p0["translation"])) / dt
    yaw = np.array([2.0 * np.arctan2(a["rotation"][3], a["rotation"][0]) for a in anns])
    wlh = np.array([a["size"] for a in anns], dtype=np.float64).reshape(-1, 3)
    cls, rider = [], []
    for a in anns:
        cat = tabs["category"][tabs["instance"][a["instance_token"]]["category_token"]]["name"]
        cname = _NAME_TO_CLASS.get(cat, "barrier")
        cls.append(CLASS_NAMES.index(cname))
        rider.append(any(tabs["attribute"][t]["name"] == "cycle.with_rider" for t in a["attribute_tokens"]))
    masks = np.full((len(cameras), size[1], size[0]), -1, dtype=np.int32)
    for c, cam in enumerate(cameras):  # six cameras
        sd = tabs["sample_data"][tabs["_sd_by_sample"][sample_token][cam]]
        cs = tabs["calibrated_sensor"][sd["calibrated_sensor_token"]]
        ep = tabs["ego_pose"][sd["ego_pose_token"]]
        c2g = pose_matrix(ep["rotation"], ep["translation"]) @ pose_matrix(cs["rotation"], cs["translation"])
        K = np.asarray(intrinsics[c] if intrinsics is not None else cs["camera_intrinsic"], dtype=np.float64)
        dt = sd["timestamp"] * 1e-6 - t0 if at_camera_time else 0.0
        prims = build_primitives(centers + vel * dt, yaw, wlh, np.array(cls), np.array(rider))
        view = CameraView(K=K, R=c2g[:3, :3], position=c2g[:3, 3], size=tuple(size))
        _, inst, _, _ = render_camera(view, prims, len(anns), scale=1.0, shade=False)
        masks[c] = inst
    return masks, list(ann_tokens)


del KEYFRAME_DT
