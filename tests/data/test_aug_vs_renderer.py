"""Augmentation consistency on the real synthetic world, checked against the renderer's own
instance masks: after the train augmentation (resize-crop-flip + global rotation/scale), projecting
each GT box centre with the augmented ``lidar2img`` lands on the pixels where the augmented image
shows that object (within 2 px), and the augmented ``ego_pose`` maps the augmented box back to the
annotation's global position."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raydn.data.dataset import NuScenesStreamingDataset
from raydn.core.frames import pose_matrix
from raydn.data.synth import render_instance_masks
from raydn.data.transforms import AugConfig, apply_image_aug, sample_image_aug
from raydn.geometry import CAMERA_NAMES


def _encode(mask: np.ndarray) -> Image.Image:
    ids = mask.astype(np.int64) + 1                      # 0 = background
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _decode(img: Image.Image) -> np.ndarray:
    a = np.asarray(img).astype(np.int64)
    return a[..., 0] + 256 * a[..., 1] - 1


@pytest.mark.parametrize("key", [0, 1, 2, 3, 4, 5])
def test_projected_gt_centres_hit_the_augmented_object(synth_world, synth_infos, synth_nusc, key):
    cfg = AugConfig(final_dim=(256, 704), resize_lim=(0.38, 0.55), rand_flip=True,
                    rot_range=(-0.3925, 0.3925), scale_range=(0.95, 1.05), training=True)
    ds = NuScenesStreamingDataset(str(synth_infos[1]["train"]), cfg, seed=11)
    index = (key * 5) % len(ds)
    item = ds[(index, (0, key))]
    iap = sample_image_aug(cfg, np.random.default_rng([11, 0, key]))  # the same draw as the item
    assert item.meta["aug"]["flip"] == iap.flip and item.meta["aug"]["crop"] == iap.crop
    token = item.meta["sample_token"]
    masks, ann_tokens = render_instance_masks(synth_world, token)
    aug_masks = [_decode(apply_image_aug(_encode(m), iap, fast=True)) for m in masks]

    boxes = item.gt_boxes.double().numpy()
    l2i = item.lidar2img.double().numpy()
    ego = item.ego_pose.double().numpy()
    anns = [synth_nusc.get("sample_annotation", t) for t in ann_tokens]
    ann_xyz = np.array([a["translation"] for a in anns])
    H, W = cfg.final_dim
    rec = ds.infos[index]
    ego_orig = pose_matrix(rec["ego2global_rotation"], rec["ego2global_translation"]) @ \
        pose_matrix(rec["lidar2ego_rotation"], rec["lidar2ego_translation"])
    extr = item.extrinsics.double().numpy()          # un-augmented LiDAR -> camera
    raw_l2i = []
    for cam, name in enumerate(CAMERA_NAMES):
        K = np.eye(4)
        K[:3, :3] = np.asarray(rec["cams"][name]["cam_intrinsic"])
        raw_l2i.append(K @ extr[cam])
    checked = 0
    for b in boxes:
        g = ego[:3, :3] @ b[:3] + ego[:3, 3]               # augmented LiDAR -> global
        d = np.linalg.norm(ann_xyz - g, axis=1)
        j = int(d.argmin())
        assert d[j] < 0.05, f"augmented box does not map back to an annotation ({d[j]:.3f} m)"
        for cam in range(len(CAMERA_NAMES)):
            p = l2i[cam] @ np.r_[b[:3], 1.0]
            if p[2] < 1.0:
                continue
            u, v = p[0] / p[2], p[1] / p[2]
            if not (3 <= u < W - 3 and 3 <= v < H - 3):
                continue
            # only objects whose centre is visible and unoccluded in the ORIGINAL image
            # (renderer's mask at the un-augmented projection) and not tiny
            p0 = raw_l2i[cam] @ np.r_[np.linalg.solve(ego_orig, np.r_[g, 1.0])[:3], 1.0]
            u0, v0 = int(p0[0] / p0[2]), int(p0[1] / p0[2])
            if not (0 <= u0 < 1600 and 0 <= v0 < 900) or masks[cam][v0, u0] != j:
                continue
            if (masks[cam] == j).sum() < 400:
                continue
            win = aug_masks[cam][int(v) - 2:int(v) + 3, int(u) - 2:int(u) + 3]
            assert (win == j).any(), (f"{CAMERA_NAMES[cam]}: projected centre ({u:.1f}, {v:.1f}) "
                                      f"does not show annotation {j} in the augmented image")
            checked += 1
    assert checked >= 3, "too few unoccluded visible objects to check"
