"""NuScenesStreamingDataset: sorting, grouping, prev_exists, per-frame tensors, GT, batching, loaders."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from pyquaternion import Quaternion

from infos_helper import CAMERA_NAMES, camera_calib, make_infos, make_record, write_jpeg
from raydn.data.batch import FrameBatch
from raydn.data.dataset import NuScenesStreamingDataset, sequence_groups
from raydn.data.images import resolve_image_path
from raydn.data.loader import build_eval_loader, build_train_loader, collate_frames
from raydn.data.transforms import aug_config_r50, limit_yaw


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return root, make_infos(root, scene_lengths=(5, 4, 6, 3, 7), boxes_per_sample=8, seed=1)


def test_sorted_groups_and_prev_exists(world):
    _, infos = world
    ds = NuScenesStreamingDataset(infos, aug_config_r50(True), seq_split_num=2)
    ts = [r["timestamp"] for r in ds.infos]
    assert ts == sorted(ts)
    assert ds.scene_ids.tolist() == [0] * 5 + [1] * 4 + [2] * 6 + [3] * 3 + [4] * 7
    # ceil(n/2) chunks: 5 -> 3+2, 4 -> 2+2, 6 -> 3+3, 3 -> 2+1, 7 -> 4+3
    sizes = [len(g) for g in ds.group_indices()]
    assert sizes == [3, 2, 2, 2, 3, 3, 2, 1, 4, 3] and ds.num_groups == 10
    starts = np.cumsum([0] + sizes[:-1])
    want = np.ones(len(ds), dtype=np.float32)
    want[starts] = 0
    np.testing.assert_array_equal(ds.prev_exists, want)
    # eval: prev_exists from scene changes only
    ev = NuScenesStreamingDataset(infos, aug_config_r50(False))
    want = np.ones(len(ds), dtype=np.float32)
    want[[0, 5, 9, 15, 18]] = 0
    np.testing.assert_array_equal(ev.prev_exists, want)
    assert ev[9].prev_exists == 0.0 and ev[10].prev_exists == 1.0


def test_scene_token_fallback_and_split_rule():
    g = sequence_groups(np.array([0] * 41 + [1] * 40), 2)
    assert np.bincount(g).tolist() == [21, 20, 20, 20]
    assert np.bincount(sequence_groups(np.array([0] * 5), 4)).tolist() == [2, 2, 1]
    # a record with sweeps but a new scene token still starts a scene
    recs = [make_record(f"t{i}", "A" if i < 3 else "B", 1000 + i, i == 0, {c: "x.jpg" for c in CAMERA_NAMES})
            for i in range(6)]
    ds = NuScenesStreamingDataset(recs, aug_config_r50(False))
    assert ds.scene_ids.tolist() == [0, 0, 0, 1, 1, 1]


def test_item_tensors_match_calibration(world):
    _, infos = world
    ds = NuScenesStreamingDataset(infos, aug_config_r50(False))
    s = ds[7]
    rec = ds.infos[7]
    assert s.images.shape == (6, 3, 256, 704) and s.images.dtype == torch.float32
    for k in ("intrinsics", "extrinsics", "lidar2img"):
        assert getattr(s, k).shape == (6, 4, 4) and getattr(s, k).dtype == torch.float32
    # ego_pose = E2G · L2E (lidar -> global), checked with pyquaternion
    e2g = Quaternion(rec["ego2global_rotation"]).transformation_matrix
    e2g[:3, 3] = rec["ego2global_translation"]
    l2e = Quaternion(rec["lidar2ego_rotation"]).transformation_matrix
    l2e[:3, 3] = rec["lidar2ego_translation"]
    np.testing.assert_allclose(s.ego_pose.double().numpy(), e2g @ l2e, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose((s.ego_pose.double() @ s.ego_pose_inv.double()).numpy(), np.eye(4), atol=1e-4)
    assert isinstance(s.timestamp, float) and s.timestamp == rec["timestamp"] / 1e6
    # test transform: K' = A K with r = 0.44, crop (0, 140); lidar2img = intrinsics · extrinsics
    for i, cam in enumerate(CAMERA_NAMES):
        k, r, t = camera_calib(cam)
        a = np.array([[0.44, 0, 0], [0, 0.44, -140], [0, 0, 1]])
        np.testing.assert_allclose(s.intrinsics[i, :3, :3].double().numpy(), a @ k, rtol=1e-6)
        assert s.intrinsics[i, 3, 3] == 1 and s.intrinsics[i, :3, 3].abs().max() == 0
        np.testing.assert_allclose(s.extrinsics[i, :3, :3].double().numpy(), r.T, atol=1e-6)
        np.testing.assert_allclose(s.extrinsics[i, :3, 3].double().numpy(), -r.T @ t, atol=1e-6)
    np.testing.assert_allclose(s.lidar2img.numpy(), (s.intrinsics @ s.extrinsics).numpy(), rtol=1e-5, atol=1e-3)
    assert s.gt_boxes_2d is None  # test pipeline: no 2D labels
    assert s.meta["sample_token"] == rec["token"] and s.meta["index"] == 7
    assert s.meta["pad_shape"] == (256, 704)
    # uniform image colour -> exact normalised RGB value
    px = s.images[:, :, 100, 100]
    want = (torch.tensor([90.0, 120.0, 150.0]) - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    assert (px - want).abs().max() < 0.05


def test_gt_filtering(tmp_path):
    img = write_jpeg(tmp_path / "a.jpg", __import__("PIL.Image", fromlist=["Image"]).new("RGB", (1600, 900)))
    boxes = np.array([
        [1.0, 2.0, -0.5, 4.0, 2.0, 1.5, 3.5],     # kept, yaw wrapped
        [60.0, 0.0, 0.0, 1, 1, 1, 0.0],          # out of range
        [3.0, 3.0, 0.0, 1, 1, 1, 0.0],           # invalid flag
        [4.0, -4.0, 0.0, 1, 1, 1, 0.0],          # unknown class -> dropped
        [-5.0, 6.0, 0.2, 0.8, 0.6, 1.7, -1.0],   # kept, NaN velocity -> 0
    ])
    names = ["car", "bus", "truck", "animal", "pedestrian"]
    vel = np.array([[1.0, 2.0], [0, 0], [0, 0], [0, 0], [np.nan, np.nan]])
    rec = make_record("g0", "S", 5_000_000, True, {c: img for c in CAMERA_NAMES}, boxes, names, vel,
                      valid=[True, True, False, True, True])
    ds = NuScenesStreamingDataset([rec], aug_config_r50(False))
    s = ds[0]
    assert s.gt_labels.tolist() == [0, 8]
    want = np.concatenate([boxes[[0, 4]], [[1.0, 2.0], [0.0, 0.0]]], 1)
    want[:, 6] = limit_yaw(want[:, 6])
    np.testing.assert_allclose(s.gt_boxes.double().numpy(), want, rtol=1e-6)  # gravity centre kept
    assert s.gt_boxes[0, 6] < np.pi
    # training: the 2D labels go through resize/crop/flip and are inside the image
    tr = NuScenesStreamingDataset([rec], aug_config_r50(True), seed=4)
    t = tr[0]
    assert len(t.gt_boxes_2d) == 6
    for b, c in zip(t.gt_boxes_2d, t.centers_2d):
        if len(b):
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= 704).all() and (b[:, 3] <= 256).all()
            assert ((b[:, 2] - b[:, 0]) >= 2).all() and (c[:, 0] <= 704).all()


def test_collate_and_loaders_deterministic(world):
    _, infos = world
    ds = NuScenesStreamingDataset(infos, aug_config_r50(True))
    b = collate_frames([ds[0], ds[1]])
    assert isinstance(b, FrameBatch) and b.images.shape == (2, 6, 3, 256, 704)
    assert b.timestamp.dtype == torch.float64 and b.prev_exists.dtype == torch.float32
    assert b.lidar2img.shape == (2, 6, 4, 4) and b.ego_pose.shape == (2, 4, 4)
    assert len(b.gt_boxes) == 2 and b.gt_boxes[0].shape[1] == 9 and len(b.gt_boxes_2d[0]) == 6
    assert b.pad_shape == (256, 704)

    def run(seed, workers):
        dl = build_train_loader(ds, 2, num_workers=workers, seed=seed, persistent_workers=False)
        out = []
        for i, fb in zip(range(3), dl):
            out.append((fb.meta[0]["index"], fb.meta[1]["index"], fb.lidar2img.clone(), fb.prev_exists.clone()))
        return out
    a, a2, c = run(0, 2), run(0, 2), run(1, 0)
    for x, y in zip(a, a2):
        assert x[:2] == y[:2] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
    assert [x[:2] for x in a] != [x[:2] for x in c] or not all(torch.equal(x[2], y[2]) for x, y in zip(a, c))
    # slots walk sub-sequences: prev_exists 0 exactly at group starts
    for x in a:
        for j in range(2):
            idx = x[j]
            first = idx == 0 or ds.group_ids[idx - 1] != ds.group_ids[idx]
            assert x[3][j].item() == (0.0 if first else 1.0)


def test_eval_loader_scene_order_and_ddp_reset(tmp_path):
    infos = make_infos(tmp_path, scene_lengths=(3, 2, 4), boxes_per_sample=2, seed=2)
    ds = NuScenesStreamingDataset(infos, aug_config_r50(False))
    seen = []
    for r in range(2):
        dl = build_eval_loader(ds, num_workers=0, rank=r, world_size=2)
        seen.append([(fb.meta[0]["index"], fb.prev_exists.item()) for fb in dl])
    assert len(seen[0]) == len(seen[1])
    merged = dl.sampler.gather([[i for i, _ in s] for s in seen])
    assert merged == list(range(len(ds)))
    # cut at a scene start: the second rank starts a scene, so prev_exists is 0 there
    assert seen[1][0][1] == 0.0 and seen[1][0][0] in set(ds.scene_starts().tolist())
    assert [i for i, _ in seen[0]] == [0, 1, 2, 3, 4] and [i for i, _ in seen[1]] == [5, 6, 7, 8, 8]
    # fewer scenes than ranks -> official cuts; a rank starting mid-scene gets prev_exists = 0
    one = NuScenesStreamingDataset({"infos": [r for r in infos["infos"] if r["scene_token"] == "scene2"]},
                                   aug_config_r50(False))
    dl = build_eval_loader(one, num_workers=0, rank=1, world_size=2)
    assert dl.sampler.starts_mid_scene and next(iter(dl)).prev_exists.item() == 0.0


def test_info_pickle_and_data_root(world, tmp_path):
    root, infos = world
    path = tmp_path / "nuscenes2d_temporal_infos_train.pkl"
    path.write_bytes(pickle.dumps(infos, protocol=2))  # mmcv writes protocol 2
    ds = NuScenesStreamingDataset(path, aug_config_r50(False))
    assert len(ds) == 25 and ds[0].images.shape == (6, 3, 256, 704)
    assert resolve_image_path("./data/nuscenes/samples/CAM_FRONT/x.jpg", "/d/nus").as_posix() == "/d/nus/samples/CAM_FRONT/x.jpg"
    assert resolve_image_path("samples/CAM_BACK/y.jpg", None).as_posix() == "samples/CAM_BACK/y.jpg"
