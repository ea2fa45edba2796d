"""LiDAR points for depth supervision (NuScenesStreamingDataset(load_points=True)) on the real
synthetic world: after the full train augmentation (resize, crop, flip, BEV rotation and scale),
the depth targets built from the item's points and its augmented ``lidar2img``
(raydn.models.depth_head.depth_targets) equal the targets computed independently from the raw
LIDAR_TOP file, the raw calibration of the info record and the augmentation draw."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydn.data.dataset import NuScenesStreamingDataset, load_lidar_points
from raydn.data.images import resolve_image_path
from raydn.data.transforms import AugConfig, sample_image_aug
from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES
from raydn.models.depth_head import depth_targets

CFG = AugConfig(final_dim=(256, 704), resize_lim=(0.38, 0.55), rand_flip=True,
                rot_range=(-0.3925, 0.3925), scale_range=(0.95, 1.05), training=True)
SEED = 11
SHAPES = [(32, 88), (16, 44)]          # stride 8 and 16 grids of the 256 x 704 input
MIN_D, MAX_D = 1.0, 60.0


def _expected(rec: dict, raw: np.ndarray, key: int):
    """Independent targets: raw points -> camera with the record's sensor2lidar, K, then the
    augmentation's resize / crop / flip written out by hand; per level the nearest depth per cell.
    Returns (targets per level (6, h, w), per camera the (u, v, d) of the kept points)."""
    iap = sample_image_aug(CFG, np.random.default_rng([SEED, 0, key]))  # the item's own draw
    H, W = CFG.final_dim
    x0, y0 = iap.crop[:2]
    maps = [np.zeros((6, h, w)) for h, w in SHAPES]
    kept = []
    for c, name in enumerate(CAMERA_NAMES):
        cam = rec["cams"][name]
        R = np.asarray(cam["sensor2lidar_rotation"], np.float64)
        t = np.asarray(cam["sensor2lidar_translation"], np.float64).reshape(3)
        p_cam = (raw - t) @ R                                  # R^T (p - t), row vectors
        uvw = p_cam @ np.asarray(cam["cam_intrinsic"], np.float64).T
        d = uvw[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = uvw[:, 0] / d * iap.resize - x0
            v = uvw[:, 1] / d * iap.resize - y0
        if iap.flip:
            u = W - u
        ok = (d >= MIN_D) & (d <= MAX_D) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        u, v, d = u[ok], v[ok], d[ok]
        kept.append((u, v, d))
        for m, (h, w) in zip(maps, SHAPES):
            rows, cols = np.floor(v * h / H).astype(int), np.floor(u * w / W).astype(int)
            cell = np.full(h * w, np.inf)
            np.minimum.at(cell, rows * w + cols, d)
            m[c] = np.where(np.isinf(cell), 0.0, cell).reshape(h, w)
    return maps, kept, iap


def _keys_with_flip() -> dict[bool, int]:
    """The first draw keys whose image augmentation flips / does not flip."""
    out = {}
    for key in range(32):
        f = sample_image_aug(CFG, np.random.default_rng([SEED, 0, key])).flip
        out.setdefault(f, key)
        if len(out) == 2:
            return out
    raise AssertionError("no flipped and unflipped draws in 32 keys")


@pytest.mark.parametrize("flip", [True, False])
def test_depth_targets_match_the_raw_scan_through_the_augmentation(synth_infos, flip):
    ds = NuScenesStreamingDataset(str(synth_infos[1]["train"]), CFG, seed=SEED, load_points=True)
    key = _keys_with_flip()[flip]
    index = (3 * key + 1) % len(ds)
    item = ds[(index, (0, key))]
    rec = ds.infos[index]
    assert item.meta["aug"]["flip"] == flip and abs(item.meta["aug"]["rot"]) > 1e-3
    raw = load_lidar_points(resolve_image_path(rec["lidar_path"], None))
    assert item.points.shape == (len(raw), 3) and item.points.dtype == torch.float32
    # the BEV rotation/scale moved the points (as the boxes): they differ from the raw scan
    assert float((item.points.double() - torch.from_numpy(raw)).abs().max()) > 0.1

    expected, kept, iap = _expected(rec, raw, key)
    assert item.meta["aug"]["crop"] == iap.crop
    got = depth_targets([item.points], item.lidar2img[None], tuple(CFG.final_dim), SHAPES, MIN_D, MAX_D)
    for g, e in zip(got, expected):
        g = g[0].double().numpy()
        both = (g > 0) & (e > 0)
        assert both.sum() > 200                                # plenty of supervised cells
        # float32 geometry may move a point sitting on a cell edge: a few cells may differ
        assert ((g > 0) != (e > 0)).sum() <= 0.01 * both.sum()
        close = np.abs(g - e) <= 1e-3 + 1e-4 * e
        assert close[both].mean() >= 0.98

    # one known point: the nearest return of a camera whose pixel lies well inside its stride-8
    # cell and is alone in it by more than 0.1 m: its depth is the target at exactly that cell
    H, W = CFG.final_dim
    h, w = SHAPES[0]
    for c, (u, v, d) in enumerate(kept):
        fu, fv = u * w / W, v * h / H
        inner = (np.abs(fu - np.round(fu)) > 0.05) & (np.abs(fv - np.round(fv)) > 0.05)
        cell = np.floor(fv).astype(int) * w + np.floor(fu).astype(int)
        order = np.lexsort((d, cell))
        first = np.r_[True, cell[order][1:] != cell[order][:-1]]
        second_gap = np.r_[d[order][1:] - d[order][:-1], np.inf]
        alone = first & (second_gap > 0.1) & inner[order]
        if alone.any():
            i = order[np.flatnonzero(alone)[0]]
            r, col = divmod(int(cell[i]), w)
            assert got[0][0, c, r, col].item() == pytest.approx(d[i], abs=1e-3)
            break
    else:
        raise AssertionError("no isolated LiDAR return in any camera")

    # the check has teeth: the raw (un-augmented) scan through the augmented lidar2img misses
    wrong = depth_targets([torch.from_numpy(raw).float()], item.lidar2img[None], tuple(CFG.final_dim),
                          SHAPES[:1], MIN_D, MAX_D)[0][0].double().numpy()
    both = (wrong > 0) & (expected[0] > 0)
    assert (np.abs(wrong - expected[0]) <= 1e-3 + 1e-4 * expected[0])[both].mean() < 0.8


def test_points_only_when_asked_and_bad_files_are_named(synth_infos, tmp_path):
    infos = str(synth_infos[1]["train"])
    assert NuScenesStreamingDataset(infos, CFG, seed=SEED)[0].points is None
    ds = NuScenesStreamingDataset(infos, CFG, seed=SEED, load_points=True)
    rec = dict(ds.infos[0])
    bad = tmp_path / "truncated.pcd.bin"
    bad.write_bytes(np.arange(7, dtype=np.float32).tobytes())   # 7 floats: not whole 5-float points
    with pytest.raises(DataError, match="truncated.pcd.bin.*not a whole number of points"):
        load_lidar_points(bad)
    with pytest.raises(DataError, match="missing.pcd.bin: LiDAR point file not found"):
        load_lidar_points(tmp_path / "missing.pcd.bin")
    nan = tmp_path / "nan.pcd.bin"
    nan.write_bytes(np.array([1, 2, np.nan, 0, 0], dtype=np.float32).tobytes())
    with pytest.raises(DataError, match="nan.pcd.bin: LiDAR point file holds NaN"):
        load_lidar_points(nan)
    del rec["lidar_path"]
    ds.infos = [rec] + ds.infos[1:]
    with pytest.raises(DataError, match="field 'lidar_path' is missing"):
        ds[0]
