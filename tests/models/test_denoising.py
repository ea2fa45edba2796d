"""Property tests of the denoising-query builder (spec §6) on random scenes with 6 pinhole
cameras around the ego (FRONT, FRONT_RIGHT, FRONT_LEFT, BACK, BACK_LEFT, BACK_RIGHT)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from raydn.config import DenoisingConfig, RayDenoisingConfig
from raydn.errors import DataError
from raydn.geometry import denormalize_points
from raydn.models.denoising import (box_noise_groups, build_denoising_queries,
                                    denoising_attention_mask, project_to_cameras,
                                    ray_depth_steps, sample_beta, shift_along_rays)

PAD = (256, 704)
NUM_CLASSES = 10
CAM_YAWS_DEG = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)


def make_lidar2img(batch: int = 2, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, 6, 4, 4) LiDAR (x fwd, y left, z up) -> pixel*depth for a 704x256 image; per sample a
    small random yaw jitter so the samples differ."""
    mats = []
    for b in range(batch):
        jitter = 0.0 if gen is None else float(torch.rand((), generator=gen) - 0.5) * 0.2
        per_cam = []
        for yaw_deg in CAM_YAWS_DEG:
            t = math.radians(yaw_deg) + jitter
            fwd = torch.tensor([math.cos(t), math.sin(t), 0.0])
            right = torch.tensor([math.sin(t), -math.cos(t), 0.0])
            down = torch.tensor([0.0, 0.0, -1.0])
            rot = torch.stack([right, down, fwd])                     # rows: cam axes in LiDAR
            centre = torch.tensor([0.8 * math.cos(t), 0.8 * math.sin(t), 1.6])
            ext = torch.eye(4)
            ext[:3, :3] = rot
            ext[:3, 3] = -rot @ centre
            k = torch.eye(4)
            k[0, 0], k[1, 1], k[0, 2], k[1, 2] = 560.0, 560.0, 352.0, 64.0
            per_cam.append(k @ ext)
        mats.append(torch.stack(per_cam))
    return torch.stack(mats)


def random_scene(counts, gen: torch.Generator):
    """Boxes (n_b, 9) well inside the pc-range, 4..40 m from the ego, and labels (n_b,)."""
    boxes, labels = [], []
    for n in counts:
        r = 4 + 36 * torch.rand(n, generator=gen)
        a = 2 * math.pi * torch.rand(n, generator=gen)
        z = -1.5 + 2.0 * torch.rand(n, generator=gen)
        dims = 0.4 + 4.0 * torch.rand(n, 3, generator=gen)
        rest = torch.randn(n, 3, generator=gen)
        boxes.append(torch.cat([torch.stack([r * a.cos(), r * a.sin(), z], -1), dims, rest], -1))
        labels.append(torch.randint(0, NUM_CLASSES, (n,), generator=gen))
    return boxes, labels


def ref_points(q: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(q, 3, generator=torch.Generator().manual_seed(seed))


def build(counts=(7, 4), cfg: DenoisingConfig = DenoisingConfig(), seed: int = 0, q: int = 20,
          generator=True, **kw):
    gen = torch.Generator().manual_seed(seed)
    boxes, labels = random_scene(counts, gen)
    l2i = make_lidar2img(len(counts), gen)
    g = torch.Generator().manual_seed(seed + 1000) if generator else None
    out = build_denoising_queries(boxes, labels, ref_points(q), l2i, PAD, cfg, generator=g,
                                  num_propagated=kw.get("num_propagated", 8),
                                  memory_len=kw.get("memory_len", 16))
    return out, boxes, labels, l2i


def replay_ray_steps(n: int, cfg: DenoisingConfig, seed: int):
    """The ray steps a builder run with ``Generator().manual_seed(seed + 1000)`` used."""
    g = torch.Generator().manual_seed(seed + 1000)
    torch.rand((cfg.scalar * n, 3), generator=g)              # standard groups draw
    return [ray_depth_steps(n, cfg.ray.num_rays, cfg.ray.alpha, cfg.ray.beta, cfg.ray.radius,
                            cfg.split, g) for _ in range(cfg.ray.groups)]


# ---------------------------------------------------------------------------- geometry of rays

def test_ray_queries_lie_on_the_camera_ray_with_depth_offset_sigma_step():
    cfg = replace(DenoisingConfig(), ray=RayDenoisingConfig(groups=2, num_rays=4))
    counts = (9, 6)
    out, boxes, labels, l2i = build(counts, cfg, seed=3)
    b = torch.cat(boxes)
    n = b.shape[0]
    bid = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    proj_gt, vis = project_to_cameras(b[:, :3], l2i[bid], PAD)
    assert vis.any(dim=1).sum() >= n // 2         # the scene is mostly visible
    sigma = b[:, 3:6].mean(-1) / 2
    entries = denormalize_points(
        out.reference_points[out.known_bid, out.map_known_indice]).view(-1, n, 3)
    for h, (steps, _) in enumerate(replay_ray_steps(n, cfg, seed=3)):
        rays = entries[cfg.scalar + h * 4: cfg.scalar + (h + 1) * 4]              # (R, n, 3)
        cam = torch.where(vis, torch.arange(6), -1).amax(dim=1)                    # last visible
        seen = cam >= 0
        mats = l2i[bid, cam.clamp(min=0)]                                          # (n, 4, 4)
        homo = torch.cat([rays, torch.ones_like(rays[..., :1])], -1)
        p = (mats[None] @ homo[..., None]).squeeze(-1)                             # (R, n, 4)
        pix = p[..., :2] / p[..., 2:3]
        gt_pix = proj_gt[torch.arange(n), cam.clamp(min=0), :2]
        assert (pix - gt_pix[None]).abs()[:, seen].max() < 2e-2                    # same pixel
        depth_gt = proj_gt[torch.arange(n), cam.clamp(min=0), 2]
        offset = p[..., 2] - depth_gt[None]
        torch.testing.assert_close(offset[:, seen], (sigma[None] * steps)[:, seen],
                                   atol=2e-3, rtol=0)
        # centres seen by no camera stay on the GT centre
        torch.testing.assert_close(rays[:, ~seen], b[None, ~seen, :3].expand(4, -1, -1),
                                   atol=1e-4, rtol=0)


def test_shift_along_rays_last_visible_camera_and_invisible_boxes():
    l2i = make_lidar2img(1)
    centres = torch.tensor([[10.0, 0.0, 1.6],      # FRONT only, on its optical axis
                            [8.83, -4.69, 0.0],    # FRONT and FRONT_RIGHT overlap
                            [-10.0, 0.2, 0.0],     # BACK
                            [0.5, 0.0, 30.0],      # straight above: no camera
                            [0.0, 0.0, 0.0]])      # ego centre: behind/under the cameras
    bid = torch.zeros(5, dtype=torch.long)
    _, vis = project_to_cameras(centres, l2i[bid], PAD)
    offsets = torch.tensor([[1.0, 2.0, -1.0, 3.0, 0.5]])
    shifted, cam = shift_along_rays(centres, offsets, l2i, bid, PAD)
    expected = torch.where(vis, torch.arange(6), -1).amax(dim=1)
    assert torch.equal(cam, expected)
    assert cam[0] == 0 and cam[2] == 3 and cam[3] == -1
    assert vis[1, 0] and vis[1, 1] and cam[1] == 1         # overlap: the later camera wins
    assert torch.equal(shifted[0, 3], centres[3])
    # Euclidean shift = offset / cos(angle to the optical axis) >= |offset|
    dist = (shifted[0] - centres).norm(dim=-1)
    assert (dist[:3] >= offsets[0, :3].abs() - 1e-4).all()
    torch.testing.assert_close(dist[0], torch.tensor(1.0), atol=1e-4, rtol=0)  # on the axis


# ---------------------------------------------------------------------------- labels and steps

def test_exactly_one_positive_per_gt_and_ray_group():
    cfg = replace(DenoisingConfig(), ray=RayDenoisingConfig(groups=3, num_rays=6))
    out, boxes, labels, _ = build((8, 5), cfg, seed=5)
    n = 13
    lab = torch.cat(labels)
    g_tot = cfg.scalar + 3 * 6
    assert out.known_labels.shape == (g_tot * n,)
    ray = out.known_labels[cfg.scalar * n:].view(3, 6, n)
    is_pos = ray < NUM_CLASSES
    assert torch.equal(is_pos.sum(dim=1), torch.ones(3, n, dtype=torch.long))
    assert torch.equal(ray.amin(dim=1), lab.expand(3, n))   # positive carries the GT class
    assert ((ray == lab) | (ray == NUM_CLASSES)).all()
    # positives sit where replayed steps are smallest
    for h, (steps, positive) in enumerate(replay_ray_steps(n, cfg, seed=5)):
        assert torch.equal(is_pos[h].float().argmax(0), positive)


def test_ray_depth_steps_positive_is_small_and_smallest():
    g = torch.Generator().manual_seed(11)
    steps, positive = ray_depth_steps(4000, 5, 8.0, 2.0, 3.0, 0.75, g)
    assert steps.shape == (5, 4000)
    pos = steps.gather(0, positive[None])[0]
    assert (pos.abs() <= 0.75).all()
    assert torch.equal(steps.abs().argmin(0), positive)
    neg = torch.ones_like(steps, dtype=torch.bool).scatter(0, positive[None], False)
    assert (steps[neg].abs() <= 3.0).all()
    # Beta(8, 2) statistics (spec §6.2): s mean ~ +1.8, ~62 % of positives reset
    raw = (sample_beta(8.0, 2.0, 5 * 4000, torch.Generator().manual_seed(11)) * 2 - 1) * 3
    assert abs(raw.mean().item() - 1.8) < 0.05
    assert torch.equal(steps[neg], raw.view(5, 4000)[neg])   # negatives keep their raw step
    reset = raw.view(5, 4000).abs().amin(0) > 0.75
    assert abs(reset.float().mean().item() - 0.62) < 0.03
    assert (pos[~reset] >= 0).all()                     # kept positives lose their sign
    assert (pos[reset] < 0).float().mean().item() > 0.4  # resets are U(-0.75, 0.75)


def test_sample_beta_generator_matches_default_generator():
    torch.manual_seed(123)
    a = sample_beta(8, 2, 1000)
    b = sample_beta(8, 2, 1000, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.8) < 0.02            # Beta(8, 2) mean = 0.8


def test_generator_mode_equals_default_mode_and_is_deterministic():
    gen = torch.Generator().manual_seed(2)
    boxes, labels = random_scene((5, 3), gen)
    l2i = make_lidar2img(2, gen)
    cfg = DenoisingConfig()
    torch.manual_seed(77)
    a = build_denoising_queries(boxes, labels, ref_points(), l2i, PAD, cfg)
    torch.manual_seed(77)
    b = build_denoising_queries(boxes, labels, ref_points(), l2i, PAD, cfg)
    c = build_denoising_queries(boxes, labels, ref_points(), l2i, PAD, cfg,
                                generator=torch.Generator().manual_seed(77))
    for other in (b, c):
        assert torch.equal(a.reference_points, other.reference_points)
        assert torch.equal(a.known_labels, other.known_labels)
    state = torch.get_rng_state()
    build_denoising_queries(boxes, labels, ref_points(), l2i, PAD, cfg,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)      # generator mode leaves default alone


def test_box_noise_positives_within_split_and_within_box_extent():
    gen = torch.Generator().manual_seed(4)
    boxes, labels = random_scene((30,), gen)
    b, lab = boxes[0], labels[0]
    centres, known, delta = box_noise_groups(b, lab, 10, 1.0, 0.0, 0.75, NUM_CLASSES,
                                             generator=gen)
    assert centres.shape == (300, 3) and known.shape == (300,)
    norm = delta.norm(dim=-1)
    pos = known < NUM_CLASSES
    assert (norm[pos] <= 0.75).all() and (norm[~pos] > 0.75).all()
    assert pos.any() and (~pos).any()
    assert torch.equal(known[pos], lab.repeat(10)[pos])
    metres = denormalize_points(centres)
    dev = (metres - b[:, :3].repeat(10, 1)).abs()
    assert (dev <= b[:, 3:6].repeat(10, 1) / 2 + 1e-4).all()
    assert (delta.abs() <= 1).all()


# ---------------------------------------------------------------------------- layout and mask

def _official_style_mask(pad, s, scalar, groups, num_rays, q, p, m, ray_last_group_special):
    """Loop construction transcribed from the official code (reference for the vectorised one)."""
    mask = torch.zeros(pad + q, pad + q, dtype=torch.bool)
    mask[pad:, :pad] = True
    for i in range(scalar):
        if i == 0:
            mask[s * i:s * (i + 1), s * (i + 1):pad] = True
        if ray_last_group_special and i == scalar - 1:      # StreamPETR variant
            mask[s * i:s * (i + 1), :s * i] = True
        else:
            mask[s * i:s * (i + 1), s * (i + 1):pad] = True
            mask[s * i:s * (i + 1), :s * i] = True
    for i in range(groups):
        lo, hi = s * (scalar + i * num_rays), s * (scalar + (i + 1) * num_rays)
        mask[lo:hi, hi:pad] = True
        mask[lo:hi, :lo] = True
    full = torch.zeros(pad + q + p, pad + q + m, dtype=torch.bool)
    full[:pad + q, :pad + q] = mask
    full[pad:, :pad] = True
    return full


@pytest.mark.parametrize("scalar,groups,num_rays", [(10, 1, 5), (3, 2, 4), (1, 0, 5), (4, 0, 5)])
def test_attention_mask_semantics(scalar, groups, num_rays):
    s, q, p, m = 3, 5, 2, 7
    pad = s * (scalar + groups * num_rays)
    mask = denoising_attention_mask(pad, s, scalar, groups, num_rays, q, p, m)
    assert mask.shape == (pad + q + p, pad + q + m) and mask.dtype == torch.bool
    assert torch.equal(mask, _official_style_mask(pad, s, scalar, groups, num_rays, q, p, m,
                                                  ray_last_group_special=groups == 0))
    assert mask[pad:, :pad].all()                           # matching queries never see DN
    assert not mask[pad:, pad:].any()                       # ... but see matching + memory
    assert not mask[:pad, pad:].any()                       # DN sees matching + memory
    for g in range(scalar):                                 # standard group sees only itself
        rows = slice(g * s, (g + 1) * s)
        own = torch.zeros(pad, dtype=torch.bool)
        own[rows] = True
        assert (~mask[rows, :pad] == own).all()
    for h in range(groups):                                 # ray block sees itself entirely
        lo, hi = s * (scalar + h * num_rays), s * (scalar + (h + 1) * num_rays)
        own = torch.zeros(pad, dtype=torch.bool)
        own[lo:hi] = True
        assert (~mask[lo:hi, :pad] == own).all()


def test_ray_disabled_gives_streampetr_layout():
    cfg = replace(DenoisingConfig(), ray=RayDenoisingConfig(enabled=False))
    out, boxes, _, _ = build((6, 2), cfg, seed=8, num_propagated=4, memory_len=9)
    assert out.pad_size == 6 * 10
    assert out.known_labels.shape == (8 * 10,)
    assert out.attn_mask.shape == (60 + 20 + 4, 60 + 20 + 9)
    assert torch.equal(out.attn_mask, _official_style_mask(60, 6, 10, 0, 5, 20, 4, 9, True))
    # no ray draws: the default generator is untouched, one rand call on the generator only
    torch.manual_seed(0)
    state = torch.get_rng_state()
    build((6, 2), cfg, seed=8, generator=False)
    assert not torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    torch.rand(80, 3)
    state_after_one_call = torch.get_rng_state()
    torch.manual_seed(0)
    build((6, 2), cfg, seed=8, generator=False)
    assert torch.equal(torch.get_rng_state(), state_after_one_call)


def test_slots_padding_and_empty_sample():
    out, boxes, labels, _ = build((0, 5), seed=9)
    n, g_tot = 5, 15
    assert out.known_num == [0, 5]
    assert out.pad_size == 5 * g_tot
    assert (out.known_bid == 1).all()
    assert torch.equal(out.map_known_indice,
                       (torch.arange(g_tot)[:, None] * 5 + torch.arange(5)).reshape(-1))
    assert torch.count_nonzero(out.reference_points[0, :out.pad_size]) == 0
    torch.testing.assert_close(out.reference_points[:, out.pad_size:], ref_points().expand(2, -1, -1))
    assert torch.equal(out.known_boxes, boxes[1].repeat(g_tot, 1))
    assert torch.equal(out.known_indice, torch.arange(n).repeat(g_tot))
    assert ((out.reference_points >= 0) & (out.reference_points <= 1)).all()


def test_unused_slots_stay_at_origin():
    out, *_ = build((4, 2), seed=10)
    s, used = 4, torch.zeros(2, out.pad_size, dtype=torch.bool)
    used[out.known_bid, out.map_known_indice] = True
    assert used[0].all() and used[1].sum() == 2 * 15
    assert torch.count_nonzero(out.reference_points[1, :out.pad_size][~used[1]]) == 0
    assert s * 15 == out.pad_size


def test_no_box_in_batch_returns_none_and_disabled_returns_none():
    l2i = make_lidar2img(2)
    empty = [torch.zeros(0, 9), torch.zeros(0, 9)]
    lab = [torch.zeros(0, dtype=torch.long)] * 2
    assert build_denoising_queries(empty, lab, ref_points(), l2i, PAD, DenoisingConfig()) is None
    out, *_ = build((2, 1), replace(DenoisingConfig(), enabled=False))
    assert out is None


def test_gradient_reaches_learnable_reference_points():
    gen = torch.Generator().manual_seed(1)
    boxes, labels = random_scene((3, 2), gen)
    ref = ref_points().requires_grad_(True)
    out = build_denoising_queries(boxes, labels, ref, make_lidar2img(2), PAD, DenoisingConfig(),
                                  generator=gen)
    out.reference_points.sum().backward()
    torch.testing.assert_close(ref.grad, torch.full_like(ref, 2.0))


def test_bad_inputs_raise_clear_errors():
    l2i = make_lidar2img(2)
    with pytest.raises(DataError, match="lidar2img batch"):
        build_denoising_queries([torch.zeros(1, 9)], [torch.zeros(1, dtype=torch.long)],
                                ref_points(), l2i, PAD, DenoisingConfig())
    with pytest.raises(DataError, match=r"gt_labels\[1\]"):
        build_denoising_queries([torch.zeros(1, 9), torch.zeros(2, 9)],
                                [torch.zeros(1, dtype=torch.long), torch.zeros(3, dtype=torch.long)],
                                ref_points(), l2i, PAD, DenoisingConfig())


def test_official_sizes_2x60_boxes():
    """R50 preset sizes (Q=300, P=128, M=512) with 60 boxes per sample: D = 60 x 15 DN queries and
    the mask / reference points sized from them. The builder's time at these sizes is a benchmark
    figure (benchmarks/bench_denoising.py), not a test."""
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_scene((60, 60), gen)
    l2i = make_lidar2img(2, gen)
    out = build_denoising_queries(boxes, labels, ref_points(300), l2i, PAD, DenoisingConfig(),
                                  num_propagated=128, memory_len=512, generator=gen)
    assert out.pad_size == 60 * 15
    assert out.attn_mask.shape == (900 + 300 + 128, 900 + 300 + 512)
    assert out.reference_points.shape == (2, 900 + 300, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_in_generator_mode():
    gen = torch.Generator().manual_seed(0)
    boxes, labels = random_scene((7, 3), gen)
    l2i = make_lidar2img(2, gen)
    cpu = build_denoising_queries(boxes, labels, ref_points(), l2i, PAD, DenoisingConfig(),
                                  generator=torch.Generator().manual_seed(5))
    gpu = build_denoising_queries([b.cuda() for b in boxes], [x.cuda() for x in labels],
                                  ref_points().cuda(), l2i.cuda(), PAD, DenoisingConfig(),
                                  generator=torch.Generator().manual_seed(5))
    assert gpu.reference_points.is_cuda and gpu.attn_mask.is_cuda
    torch.testing.assert_close(gpu.reference_points.cpu(), cpu.reference_points,
                               atol=1e-5, rtol=0)
    assert torch.equal(gpu.known_labels.cpu(), cpu.known_labels)
    assert torch.equal(gpu.attn_mask.cpu(), cpu.attn_mask)
