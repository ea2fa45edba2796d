"""Variants of the session's synthetic nuScenes dataroot for the bad-input tests: a cheap copy (tables
copied, sensor files symlinked one by one) whose tables or files are then edited."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def copy_world(src: Path, dst: Path, version: str = "v1.0-mini", new_version: str | None = None) -> Path:
    """``dst`` with ``src``'s tables (real copies, under ``new_version`` if given) and symlinks to every
    sensor / map file. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src / version, dst / (new_version or version))
    for top in ("samples", "sweeps", "maps"):
        if not (src / top).is_dir():
            continue
        for path in (src / top).rglob("*"):
            if path.is_file():
                target = dst / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path, target)
    return dst


def tables(root: Path, version: str) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (Path(root) / version).glob("*.json")}


def write_tables(root: Path, version: str, t: dict) -> None:
    for name, rows in t.items():
        (Path(root) / version / f"{name}.json").write_text(json.dumps(rows))


def camera_file(root: Path, version: str, index: int = 0, channel: str = "CAM_BACK") -> Path:
    """Path of the ``index``-th keyframe image of ``channel`` listed in sample_data.json."""
    rows = [sd for sd in tables(root, version)["sample_data"] if sd["is_key_frame"] and channel in sd["filename"]]
    return Path(root) / rows[index]["filename"]


def make_test_split(src: Path, dst: Path) -> Path:
    """A ``v1.0-test`` dataroot: the scenes renamed to official test-split names, no annotations."""
    from nuscenes.utils import splits
    copy_world(src, dst, "v1.0-mini", "v1.0-test")
    t = tables(dst, "v1.0-test")
    for scene, name in zip(t["scene"], splits.test):
        scene["name"] = name
    t["sample_annotation"], t["instance"] = [], []
    write_tables(dst, "v1.0-test", t)
    return dst


def drop_scene_annotations(root: Path, version: str, scene_index: int) -> list[str]:
    """Remove every annotation (and instance) of one scene: its samples have no boxes. Returns them."""
    t = tables(root, version)
    scene = t["scene"][scene_index]["token"]
    samples = {s["token"] for s in t["sample"] if s["scene_token"] == scene}
    gone = {a["token"] for a in t["sample_annotation"] if a["sample_token"] in samples}
    t["sample_annotation"] = [a for a in t["sample_annotation"] if a["token"] not in gone]
    t["instance"] = [i for i in t["instance"] if i["first_annotation_token"] not in gone]
    write_tables(root, version, t)
    return sorted(samples)


def keep_first_sample(root: Path, version: str, scene_index: int) -> str:
    """Cut one scene down to its first keyframe (a scene with one sample). Returns that sample token."""
    t = tables(root, version)
    scene = t["scene"][scene_index]
    first = scene["first_sample_token"]
    dropped = {s["token"] for s in t["sample"] if s["scene_token"] == scene["token"] and s["token"] != first}
    scene["nbr_samples"], scene["last_sample_token"] = 1, first
    t["sample"] = [s for s in t["sample"] if s["token"] not in dropped]
    for s in t["sample"]:
        if s["token"] == first:
            s["next"] = ""
    gone_sd = {sd["token"] for sd in t["sample_data"] if sd["sample_token"] in dropped}
    t["sample_data"] = [sd for sd in t["sample_data"] if sd["token"] not in gone_sd]
    for sd in t["sample_data"]:
        if sd["next"] in gone_sd:
            sd["next"] = ""
    gone_ann = {a["token"] for a in t["sample_annotation"] if a["sample_token"] in dropped}
    kept = [a for a in t["sample_annotation"] if a["token"] not in gone_ann]
    for a in kept:
        if a["next"] in gone_ann:
            a["next"] = ""
    t["sample_annotation"] = kept
    by_instance: dict[str, list] = {}
    for a in kept:
        by_instance.setdefault(a["instance_token"], []).append(a)
    instances = []
    for inst in t["instance"]:
        anns = by_instance.get(inst["token"])
        if not anns:
            continue
        tokens = {a["token"] for a in anns}
        inst["nbr_annotations"] = len(anns)
        inst["first_annotation_token"] = next(a["token"] for a in anns if a["prev"] not in tokens)
        inst["last_annotation_token"] = next(a["token"] for a in anns if a["next"] not in tokens)
        instances.append(inst)
    t["instance"] = instances
    write_tables(root, version, t)
    return first
