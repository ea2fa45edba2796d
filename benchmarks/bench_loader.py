"""Image pipeline throughput: decode + resize-crop-flip + normalise of 1600x900 JPEGs -> 256x704.

Writes ``--frames`` synthetic six-camera frames (smooth structure + noise, JPEG quality 90, roughly
the size of nuScenes camera JPEGs) to a temporary folder, then measures

1. per-image stage times in the main process (PIL decode, bicubic resize + crop, normalise), with
   full decode and with ``jpeg_draft`` (libjpeg DCT 1/2 scaling, used only when r <= 0.5);
   The "official" row is resize-then-crop; "fast" resamples only the cropped region (the default,
   AugConfig.fast_resize); "draft" adds DCT 1/2 decoding (AugConfig.jpeg_draft, off by default).
2. images/s of the training DataLoader (``build_train_loader``) with 0, 1, 2 workers.

Usage: ``python benchmarks/bench_loader.py [--frames 24] [--workers 0 1 2] [--draft]``.
Numbers depend heavily on the CPU (and on other load on it); they are printed, not asserted.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.images import load_image
from raydn.data.loader import build_train_loader
from raydn.data.transforms import (ImageAugParams, apply_image_aug, aug_config_r50,
                                   normalize_images)
from raydn.geometry import CAMERA_NAMES


def _write_images(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:900, 0:1600].astype(np.float32)
    paths = []
    for i in range(n):
        f = rng.uniform(0.005, 0.03, 3)
        img = np.stack([127 + 100 * np.sin(xx * f[0] + yy * f[1] + i),
                        127 + 100 * np.cos(yy * f[2] - xx * f[1]),
                        127 + 80 * np.sin((xx + yy) * f[0] * 0.5)], -1)
        img += rng.normal(0, 5, img.shape).astype(np.float32)
        p = root / "samples" / f"img{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(str(p))
    return paths


def _record(i: int, paths: list[str], n_scene: int) -> dict:
    cams = {}
    for j, cam in enumerate(CAMERA_NAMES):
        psi = math.radians([0, -55, 55, 180, 110, -110][j])
        r = np.stack([[math.cos(psi), math.sin(psi), 0], [0, 0, -1], [-math.sin(psi), math.cos(psi), 0]], 1)
        cams[cam] = {"data_path": paths[(i * 6 + j) % len(paths)], "timestamp": i * 500_000,
                     "cam_intrinsic": np.array([[1266.0, 0, 816], [0, 1266, 491], [0, 0, 1]]),
                     "sensor2lidar_rotation": r, "sensor2lidar_translation": np.zeros(3)}
    return {"token": f"t{i}", "scene_token": f"s{i // n_scene}", "timestamp": i * 500_000,
            "sweeps": [] if i % n_scene == 0 else [{}], "cams": cams,
            "lidar2ego_translation": [0, 0, 1.8], "lidar2ego_rotation": [1, 0, 0, 0],
            "ego2global_translation": [600, 1600, 0], "ego2global_rotation": [1, 0, 0, 0]}


def _stage_times(paths: list[str], reps: int) -> dict:
    p = ImageAugParams(0.44, (704, 396), (0, 140, 704, 396), False)
    torch.set_num_threads(1)  # one core, as in a DataLoader worker
    full = np.asarray(apply_image_aug(load_image(Path(paths[0]), (900, 1600)), p), dtype=np.float64)
    fast = np.asarray(apply_image_aug(load_image(Path(paths[0]), (900, 1600), (800, 450)), p), dtype=np.float64)
    out = {"draft_vs_full_mean_abs_diff": float(np.abs(full - fast).mean()),
           "draft_vs_full_p99_abs_diff": float(np.percentile(np.abs(full - fast), 99))}
    for name, draft, fast in (("official", None, False), ("fast", None, True),
                              ("draft", (800, 450), True)):
        t_dec = t_aug = t_norm = 0.0
        for k in range(reps):
            path = paths[k % len(paths)]
            t0 = time.perf_counter()
            img = load_image(Path(path), (900, 1600), draft)
            t1 = time.perf_counter()
            arr = np.asarray(apply_image_aug(img, p, fast))
            t2 = time.perf_counter()
            normalize_images(arr[None])
            t3 = time.perf_counter()
            t_dec, t_aug, t_norm = t_dec + t1 - t0, t_aug + t2 - t1, t_norm + t3 - t2
        out[name] = {"decode_ms": 1e3 * t_dec / reps, "resize_crop_ms": 1e3 * t_aug / reps,
                     "normalise_ms": 1e3 * t_norm / reps,
                     "images_per_s": reps / (t_dec + t_aug + t_norm)}
    return out


def _loader_rate(ds, workers: int, iters: int, batch: int) -> float:
    dl = build_train_loader(ds, batch, num_workers=workers, seed=0, persistent_workers=False)
    it = iter(dl)
    next(it)  # worker start-up and first batch excluded
    t0 = time.perf_counter()
    for _ in range(iters):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return iters * batch * 6 / dt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=24, help="distinct six-camera frames")
    ap.add_argument("--iters", type=int, default=6, help="loader iterations timed per setting")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--draft", action="store_true", help="also time the loader with jpeg_draft=True")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_images(Path(tmp), 12)
        print(f"JPEG size ~{np.mean([Path(p).stat().st_size for p in paths]) / 1e3:.0f} kB (1600x900)")
        stages = _stage_times(paths, 24)
        print(f"draft vs full decode after resize r=0.44: mean |diff| "
              f"{stages.pop('draft_vs_full_mean_abs_diff'):.2f}, p99 {stages.pop('draft_vs_full_p99_abs_diff'):.1f} (uint8)")
        for name, st in stages.items():
            print(f"stages [{name:8s}] decode {st['decode_ms']:.1f} ms, resize+crop "
                  f"{st['resize_crop_ms']:.1f} ms, normalise {st['normalise_ms']:.1f} ms "
                  f"-> {st['images_per_s']:.1f} images/s (one core)")
        recs = [_record(i, paths, 6) for i in range(args.frames)]
        for draft in ([False, True] if args.draft else [False]):
            ds = NuScenesStreamingDataset(recs, aug_config_r50(True, jpeg_draft=draft), load_annotations=False)
            for w in args.workers:
                rate = _loader_rate(ds, w, args.iters, args.batch)
                print(f"loader workers={w} jpeg_draft={draft}: {rate:.1f} images/s "
                      f"({rate / 6:.1f} frames/s, batch {args.batch})")


if __name__ == "__main__":
    main()
