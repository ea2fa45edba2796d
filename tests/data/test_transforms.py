"""Augmentation maths and pixel/geometry consistency of the official train/test transforms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from infos_helper import (CAMERA_NAMES, PALETTE, box_corners, camera_calib, lidar2img_orig,
                          make_render_world, project, write_jpeg)
from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.transforms import (
    AugConfig, GlobalAugParams, ImageAugParams, apply_global_rot_scale, aug_config_eva,
    aug_config_r50, filter_boxes_range, filter_invisible, global_rot_scale_matrix, ida_matrix,
    limit_yaw, normalize_images, sample_image_aug, transform_boxes_2d,
)


@pytest.fixture(scope="module")
def render_world(tmp_path_factory):
    return make_render_world(tmp_path_factory.mktemp("render"))


def _denorm(img: torch.Tensor, cfg: AugConfig) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) float RGB 0..255."""
    m = torch.tensor(cfg.img_mean).view(3, 1, 1)
    s = torch.tensor(cfg.img_std).view(3, 1, 1)
    return (img * s + m).permute(1, 2, 0).numpy()


def _check_render(sample: dict, owners, cfg: AugConfig) -> float:
    """For every painted box: the bbox of its colour in the augmented image equals the bbox of its
    (augmented) corners projected with the augmented lidar2img, clipped to the image. Returns the
    largest deviation in pixels."""
    fH, fW = cfg.final_dim
    boxes = sample.gt_boxes.double().numpy()
    assert len(boxes) == 12
    corners = box_corners(boxes)
    worst = 0.0
    checked = 0
    for ci, bi in owners:
        l2i = sample.lidar2img[ci].double().numpy()
        uv, d = project(corners[bi], l2i)
        assert (d > 0).all()
        lo, hi = uv.min(0), uv.max(0)
        lo_c = np.clip(lo, [0, 0], [fW, fH])
        hi_c = np.clip(hi, [0, 0], [fW, fH])
        img = _denorm(sample.images[ci], cfg)
        mask = np.abs(img - np.array(PALETTE[bi], dtype=np.float32)).max(-1) < 40
        if (hi_c - lo_c).min() < 4:  # (almost) cropped away: the colour must (almost) vanish
            assert mask.sum() <= 4 * max(1.0, (hi_c - lo_c).max())
            continue
        ys, xs = np.nonzero(mask)
        got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        want = np.concatenate([lo_c, hi_c])
        err = np.abs(got - want).max()
        worst = max(worst, err)
        assert err <= 2.0, (CAMERA_NAMES[ci], bi, got, want, sample.meta["aug"])
        # the projected centre lands on the object's colour
        cu, cd = project(boxes[bi, :3], l2i)
        if lo_c[0] + 3 < cu[0] < hi_c[0] - 3 and lo_c[1] + 3 < cu[1] < hi_c[1] - 3:
            assert mask[int(cu[1]), int(cu[0])]
        checked += 1
    assert checked >= 6
    return worst


@pytest.mark.parametrize("cfg, seeds", [
    (aug_config_r50(True), range(6)),
    (aug_config_r50(True, resize_lim=(0.38, 0.40)), range(3)),      # W' < 704: crop past the edge
    (aug_config_eva(True), range(2)),
    (aug_config_r50(False), [0]),
    (aug_config_r50(True, jpeg_draft=True), range(3)),
])
def test_projection_matches_pixels_after_augmentation(render_world, cfg, seeds):
    infos, _, owners = render_world
    ds = NuScenesStreamingDataset(infos, cfg)
    flips = set()
    for seed in seeds:
        ds.reseed(seed)
        s = ds[0]
        _check_render(s, owners, cfg)
        aug = s.meta["aug"]
        flips.add(aug["flip"])
        if cfg.training:
            assert aug["rot"] != 0.0 and aug["scale"] != 1.0
        if aug["flip"]:
            assert (s.intrinsics[:, 0, 0] < 0).all()
        else:
            assert (s.intrinsics[:, 0, 0] > 0).all()
        newW = int(1600 * aug["resize"])
        if newW < cfg.final_dim[1]:  # black fill beyond the resized image
            img = _denorm(s.images[0], cfg)
            cols = slice(0, cfg.final_dim[1] - newW) if aug["flip"] else slice(newW, None)
            assert np.abs(img[:, cols]).max() < 1e-3
    if cfg.training and cfg.rand_flip and len(seeds) >= 6:
        assert flips == {False, True}


def test_global_rot_scale_keeps_projection_and_global_points():
    rng = np.random.default_rng(0)
    l2i = np.stack([lidar2img_orig(c) for c in CAMERA_NAMES])
    yaw = 0.7
    ego = np.eye(4)
    ego[:3, :3] = [[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]]
    ego[:3, 3] = [600.0, 1600.0, 1.8]
    ego_inv = np.linalg.inv(ego)
    boxes = np.concatenate([rng.uniform(-30, 30, (5, 3)), rng.uniform(1, 4, (5, 3)),
                            rng.uniform(-3, 3, (5, 1)), rng.normal(size=(5, 2))], 1)
    g = GlobalAugParams(rot=0.3, scale=1.04)
    m = global_rot_scale_matrix(g)
    l2i_n, ego_n, ego_inv_n, boxes_n = apply_global_rot_scale(g, l2i, ego, ego_inv, boxes)
    p_old = np.concatenate([rng.uniform(-40, 40, (50, 3)), np.ones((50, 1))], 1)
    p_new = p_old @ m.T
    np.testing.assert_allclose(p_new @ np.swapaxes(l2i_n, 1, 2), p_old @ np.swapaxes(l2i, 1, 2),
                               rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(p_new @ ego_n.T, p_old @ ego.T, atol=1e-6)
    np.testing.assert_allclose((p_old @ ego.T) @ ego_inv_n.T, p_new, atol=1e-6)
    # boxes: corners move with the points; velocities rotate and scale like displacements
    c_old = box_corners(boxes).reshape(-1, 3)
    c_new = box_corners(boxes_n).reshape(-1, 3)
    np.testing.assert_allclose(c_old @ m[:3, :3].T, c_new, atol=1e-9)
    np.testing.assert_allclose(boxes[:, 7:9] @ m[:2, :2].T, boxes_n[:, 7:9], atol=1e-12)
    np.testing.assert_allclose(boxes_n[:, 6], boxes[:, 6] - 0.3)
    # Rθ rotates by -θ about z
    np.testing.assert_allclose(m[:2, :2] / 1.04, [[math.cos(0.3), math.sin(0.3)],
                                                  [-math.sin(0.3), math.cos(0.3)]])


def test_dataset_global_aug_leaves_intrinsics_extrinsics(render_world):
    infos, _, _ = render_world
    cfg = aug_config_r50(True)
    ds = NuScenesStreamingDataset(infos, cfg, seed=3)
    s = ds[0]
    aug = s.meta["aug"]
    # extrinsics are the raw calibration inverse (never augmented)
    want_ext = np.stack([np.linalg.inv(_c2l(c)) for c in CAMERA_NAMES])
    np.testing.assert_allclose(s.extrinsics.double().numpy(), want_ext, atol=1e-5)
    # intrinsics = A K of the image aug only
    p = ImageAugParams(aug["resize"], (int(1600 * aug["resize"]), int(900 * aug["resize"])),
                       aug["crop"], aug["flip"])
    for i, c in enumerate(CAMERA_NAMES):
        np.testing.assert_allclose(s.intrinsics[i, :3, :3].double().numpy(),
                                   ida_matrix(p) @ camera_calib(c)[0], rtol=1e-6, atol=1e-3)
    m = global_rot_scale_matrix(GlobalAugParams(aug["rot"], aug["scale"]))
    ie = (s.intrinsics.double() @ s.extrinsics.double()).numpy()
    np.testing.assert_allclose(s.lidar2img.double().numpy(), ie @ np.linalg.inv(m), rtol=1e-5, atol=1e-2)
    assert not np.allclose(s.lidar2img.numpy(), ie, atol=1e-2)  # the aug did change lidar2img


def _c2l(cam):
    _, r, t = camera_calib(cam)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r, t
    return out


def test_image_aug_sampling_matches_official_formulas():
    rng = np.random.default_rng(5)
    cfg = aug_config_r50(True)
    for _ in range(50):
        p = sample_image_aug(cfg, rng)
        assert 0.38 <= p.resize <= 0.55
        assert p.resize_dims == (int(1600 * p.resize), int(900 * p.resize))
        x0, y0, x1, y1 = p.crop
        assert (x1 - x0, y1 - y0) == (704, 256)
        assert y0 == p.resize_dims[1] - 256                     # bottom crop
        assert 0 <= x0 <= max(0, p.resize_dims[0] - 704)
    t = sample_image_aug(aug_config_r50(False), None)
    assert t.resize == pytest.approx(0.44) and t.resize_dims == (704, 396)
    assert t.crop == (0, 140, 704, 396) and not t.flip
    t = sample_image_aug(aug_config_eva(False), None)
    assert t.resize == 0.5 and t.resize_dims == (800, 450) and t.crop == (0, 130, 800, 450)
    a = ida_matrix(ImageAugParams(0.5, (800, 450), (10, 194, 714, 450), True))
    np.testing.assert_allclose(a, [[-0.5, 0, 714], [0, 0.5, -194], [0, 0, 1]])


def test_normalisation_is_rgb_mean_std(tmp_path):
    img = np.zeros((1, 4, 5, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 30
    out = normalize_images(img)
    assert out.shape == (1, 3, 4, 5) and out.dtype == torch.float32
    want = [(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (30 - 103.53) / 57.375]
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), want, rtol=1e-6)


def _filter_invisible_ref(bboxes, centers, labels, depths, fd):
    """The official loop, verbatim semantics (reference for the vectorised version)."""
    fH, fW = fd
    m = np.zeros((fH, fW))
    tmp = np.zeros_like(bboxes)
    tmp[:, :2] = np.ceil(bboxes[:, :2])
    tmp[:, 2:] = np.floor(bboxes[:, 2:])
    tmp = tmp.astype(np.int64)
    order = np.argsort(-depths, kind="stable")
    tmp, bboxes, depths, centers, labels = tmp[order], bboxes[order], depths[order], centers[order], labels[order]
    for i in range(len(bboxes)):
        u1, v1, u2, v2 = tmp[i]
        m[v1:v2, u1:u2] = i
    keep = np.unique(m).astype(np.int64)
    return bboxes[keep], centers[keep], labels[keep], depths[keep]


@pytest.mark.parametrize("seed", range(8))
def test_filter_invisible_equals_official_loop(seed):
    rng = np.random.default_rng(seed)
    fd = (64, 96)
    k = int(rng.integers(1, 25))
    xy = rng.uniform(-10, 100, (k, 2))
    wh = rng.uniform(2, 50, (k, 2))
    b = np.concatenate([xy, xy + wh], 1)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, fd[1])
    b[:, 1::2] = np.clip(b[:, 1::2], 0, fd[0])
    ok = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
    b = b[ok]
    if len(b) == 0:
        return
    c = rng.uniform(0, 60, (len(b), 2))
    lab = rng.integers(0, 10, len(b))
    d = np.round(rng.uniform(1, 10, len(b)), 0)  # ties exercise the stable sort
    got = filter_invisible(b, c, lab, d, fd)
    want = _filter_invisible_ref(b, c, lab, d, fd)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_transform_boxes_2d_official_semantics():
    p = ImageAugParams(0.5, (800, 450), (100, 194, 804, 450), True)
    b = np.array([[300.0, 500.0, 500.0, 800.0], [0.0, 0.0, 201.0, 300.0], [1500.0, 850.0, 1599.0, 899.0]])
    c = np.array([[400.0, 650.0], [50.0, 100.0], [1550.0, 870.0]])
    lab = np.array([1, 2, 3])
    d = np.array([10.0, 20.0, 30.0])
    nb, nc, nl, nd = transform_boxes_2d(b, c, lab, d, p, (256, 704))
    # box 0: x*0.5-100 -> [50, 150], y*0.5-194 -> [56, 206]; flip: [704-150, 704-50]
    np.testing.assert_allclose(nb[0], [554, 56, 654, 206])
    np.testing.assert_allclose(nc[0], [704 - 100, 131])
    # box 1: y entirely above the crop -> clipped to height 0 -> dropped
    assert list(nl) == [1, 3] and list(nd) == [10.0, 30.0]
    # box 2: x -> [650, 699.5], y -> [231, 255.5], flipped
    np.testing.assert_allclose(nb[1], [704 - 699.5, 231, 704 - 650, 255.5])
    np.testing.assert_allclose(nc[1], [704 - 675, 241])
    # centres are clipped to the image before the flip (official)
    _, nc2, _, _ = transform_boxes_2d(b[:1], np.array([[1800.0, 0.0]]), lab[:1], d[:1], p, (256, 704))
    np.testing.assert_allclose(nc2[0], [0.0, 0.0])


def test_range_filter_and_limit_yaw():
    boxes = np.zeros((4, 9))
    boxes[:, 0] = [51.2, 51.19, -51.2, 0.0]
    boxes[:, 1] = [0.0, 0.0, 0.0, -51.21]
    assert filter_boxes_range(boxes, (-51.2, -51.2, -5, 51.2, 51.2, 3)).tolist() == [False, True, False, False]
    y = limit_yaw(np.array([np.pi, -np.pi, 3.5, -7.0, 0.1]))
    assert (y >= -np.pi).all() and (y < np.pi).all()
    np.testing.assert_allclose(np.cos(y), np.cos([np.pi, -np.pi, 3.5, -7.0, 0.1]))
    assert y[0] == pytest.approx(-np.pi)


def test_jpeg_draft_pixels_close_to_full_decode(tmp_path):
    """draft() (DCT 1/2 scaling) changes pixels only slightly for resize factors <= 0.5."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1600]
    base = np.stack([(xx * 0.15) % 255, (yy * 0.3) % 255, ((xx + yy) * 0.1) % 255], -1)
    base += rng.normal(0, 6, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    path = write_jpeg(tmp_path / "a.jpg", img)
    from raydn.data.images import load_image
    from raydn.data.transforms import apply_image_aug
    p = ImageAugParams(0.44, (704, 396), (0, 140, 704, 396), False)
    full = np.asarray(apply_image_aug(load_image(path, (900, 1600)), p), dtype=np.float64)
    dr = load_image(path, (900, 1600), (800, 450))
    assert dr.size == (800, 450)
    fast = np.asarray(apply_image_aug(dr, p), dtype=np.float64)
    diff = np.abs(full - fast)
    assert diff.mean() < 3.0, diff.mean()


def test_fast_resize_equals_official_resize_then_crop():
    """resize(box=...) of the cropped region == resize-then-crop up to 1 grey level on < 0.1 %."""
    from raydn.data.transforms import apply_image_aug
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:900, 0:1600]
    a = np.stack([(xx * 0.37) % 255, (yy * 0.71) % 255, (xx * yy * 0.001) % 255], -1)
    img = Image.fromarray(np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8))
    cfgs = [aug_config_r50(True), aug_config_r50(True, resize_lim=(0.3, 0.42)), aug_config_eva(True),
            aug_config_r50(False)]
    for k in range(8):
        cfg = cfgs[k % len(cfgs)]
        p = sample_image_aug(cfg, rng)
        ref = np.asarray(apply_image_aug(img, p, fast=False)).astype(int)
        got = np.asarray(apply_image_aug(img, p, fast=True)).astype(int)
        assert got.shape == ref.shape == (*cfg.final_dim, 3)
        d = np.abs(got - ref)
        assert d.max() <= 1 and (d > 0).mean() < 1e-3, (p, d.max(), (d > 0).mean())
