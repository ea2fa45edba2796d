"""Query denoising for training: the standard box-noise groups and **ray denoising** (RayDN).

Spec §6 (official ``RayDNHead.prepare_for_dn``). During training the decoder receives, besides its
Q learnable and P propagated "matching" queries, extra *denoising* (DN) queries whose reference
points are noisy copies of the ground-truth (GT) centres. Their targets are known, so no Hungarian
matching is needed; they teach the decoder to reconstruct boxes from nearby points.

**Standard groups** (DN-DETR / StreamPETR, spec §6.1, :func:`box_noise_groups`). ``scalar`` (10)
copies of every GT; each centre is moved by ``delta * (dims / 2 + noise_trans) * noise_scale`` with
``delta ~ U(-1, 1)^3`` per axis (yaw ignored). A copy is a positive (label = GT class) if
``||delta||_2 <= split`` (0.75), otherwise background (label = ``num_classes``).

**Ray denoising** (the RayDN contribution, spec §6.2). Depth is the hard direction for camera-only
3D detection: a query slid along the camera ray through an object projects to the same pixel, so
image features cannot tell it from the true object and the detector produces duplicates along
the ray. RayDN therefore adds, per ray group, ``num_rays`` (5) samples per GT placed *on the camera
ray through the GT centre*, at depth offsets ``sigma * s`` with ``sigma = mean(l, w, h) / 2``
(metres) and ``s = (2 * Beta(alpha=8, beta=2) - 1) * radius(3)``, a right-skewed distribution,
so most samples lie *behind* the object. Exactly one sample per GT is the positive: the one with
the smallest ``|s|`` (:func:`ray_depth_steps`); its step becomes ``|s|`` (sign dropped, as
officially), and if ``|s| > split`` it is re-drawn from ``U(-split, split)``. The other
``num_rays - 1`` samples are labelled background ("hard negatives": same pixel, wrong depth).
All of them regress the original GT box.

The geometry (:func:`shift_along_rays`): the ORIGINAL GT centre is projected into every camera
with the augmented ``lidar2img``; the camera is usable if the depth ``z' > 0`` and the pixel lies
inside the padded image ``[0, W) x [0, H)``. In camera ``v`` the sample keeps the pixel and gets
depth ``z' + sigma * s`` (the shift is along the camera's optical-axis depth, so the point slides
along the pixel ray), and is lifted back with ``lidar2img^-1``. When several cameras see the
centre, the **last** one in camera order wins; if none sees it, all samples stay at the exact GT
centre (faithful to the official code, spec §13 item 6).

**Query layout** (spec §6.3, :func:`pad_into_slots`). With S = max boxes per sample and
G_tot = scalar + ray_groups * num_rays, the batch gets D = S * G_tot DN slots before the Q
learnable reference points. Copy (group g, local box k of sample b) goes to slot g * S + k of
row b; unused slots stay at (0, 0, 0). Ray sub-sample r of ray group h is group
``scalar + h * num_rays + r``.

**Attention mask** (spec §6.4, :func:`denoising_attention_mask`), True = blocked. Matching
queries never see DN queries; each standard group sees only itself among DN queries; each ray
group (``num_rays * S`` slots) is one block that sees itself entirely (so a GT's positive and its
negatives attend to each other); every DN query sees all matching queries and the memory.

Random numbers: the same three calls in the same order as the official code, so that after
``torch.manual_seed(seed)`` the result is bit-identical (fixture ``dn_case_2.pt``):
``torch.rand_like`` of shape (scalar * n, 3), then per ray group ``Beta(alpha, beta).sample(
[num_rays * n])`` and ``torch.rand(K)`` (K = number of reset positives). With an explicit
``generator`` the same shapes are drawn from it (Beta via ``torch._sample_dirichlet``, which is
what ``Beta.sample`` calls internally, so a generator seeded like the default one gives the same
numbers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raydn.config import DenoisingConfig
from raydn.errors import DataError
from raydn.geometry import PC_RANGE, normalize_points


@dataclass
class DenoisingQueries:
    """Denoising queries of one training batch (official ``mask_dict``), spec §6.

    n = total GT boxes in the batch, G_tot = scalar + ray groups * num_rays (15 officially),
    S = max boxes of a sample, D = pad_size = S * G_tot, Q = learnable queries,
    P = propagated queries, M = memory length.

    * ``reference_points`` (B, D + Q, 3): normalised; DN slots [0, D) then the learnable points.
    * ``attn_mask`` (D + Q + P, D + Q + M) bool, True = attention blocked (PyTorch MHA semantics).
    * ``pad_size``: D.
    * ``known_labels`` (G_tot * n,) int64: class of the GT or ``num_classes`` (background) for
      negatives; entry order group-major then batch-major boxes (index g * n + i).
    * ``known_boxes`` (G_tot * n, 9): the ORIGINAL GT box of each entry (LiDAR frame, gravity
      centre) - the regression target of every DN query, negatives included.
    * ``known_bid`` (G_tot * n,) int64: batch row of each entry.
    * ``map_known_indice`` (G_tot * n,) int64: query slot in [0, D) of each entry.
    * ``known_indice`` (G_tot * n,) int64: index of the GT within the batch (arange(n) repeated).
    * ``known_num`` list[int]: boxes per sample.
    """
    reference_points: Tensor
    attn_mask: Tensor
    pad_size: int
    known_labels: Tensor
    known_boxes: Tensor
    known_bid: Tensor
    map_known_indice: Tensor
    known_indice: Tensor
    known_num: list


# ----------------------------------------------------------------------------------------------
# random draws (official call order; optional explicit generator)
# ----------------------------------------------------------------------------------------------

def _uniform(shape: tuple, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) of ``shape`` on ``like.device``; officially ``torch.rand_like`` / ``torch.rand``."""
    if generator is None:
        return torch.rand(shape, dtype=like.dtype, device=like.device)
    out = torch.rand(shape, dtype=like.dtype, device=generator.device, generator=generator)
    return out.to(like.device)


def sample_beta(alpha: float, beta: float, num: int,
                generator: torch.Generator | None = None) -> Tensor:
    """(num,) float32 samples of Beta(alpha, beta) on the CPU (or the generator's device).

    ``generator=None``: exactly the official ``torch.distributions.Beta(alpha, beta).sample([num])``
    (default generator). With a generator: the same kernel (``torch._sample_dirichlet`` on the
    concentration pair, first component), drawn from ``generator``.
    """
    if generator is None:
        return torch.distributions.Beta(alpha, beta).sample([num])
    conc = torch.tensor([float(alpha), float(beta)], device=generator.device)
    return torch._sample_dirichlet(conc.expand(num, 2).contiguous(), generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------
# the concepts
# ----------------------------------------------------------------------------------------------

def box_noise_groups(boxes: Tensor, labels: Tensor, scalar: int, noise_scale: float,
                     noise_trans: float, split: float, num_classes: int, pc_range=PC_RANGE,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Standard DN groups (spec §6.1).

    Args: ``boxes`` (n, 9) LiDAR frame ``[x, y, z, l, w, h, yaw, vx, vy]`` (metres);
    ``labels`` (n,) int64.
    Returns ``(centers, known_labels, delta)``: ``centers`` (scalar * n, 3) normalised to the
    pc-range and clamped to [0, 1]; ``known_labels`` (scalar * n,) int64 (``num_classes`` where
    ``||delta|| > split``); ``delta`` (scalar * n, 3) the U(-1, 1) draw. Order: index g * n + i.
    Makes one random call (``rand_like`` of shape (scalar * n, 3)) iff ``noise_scale > 0``.
    """
    known_labels = labels.repeat(scalar).long()
    centers = boxes[:, :3].repeat(scalar, 1)
    if noise_scale > 0:
        scale = boxes[:, 3:6].repeat(scalar, 1)
        delta = _uniform(tuple(centers.shape), centers, generator) * 2 - 1.0
        centers = centers + torch.mul(delta, scale / 2 + noise_trans) * noise_scale
        known_labels = torch.where(torch.norm(delta, 2, 1) > split,
                                   torch.full_like(known_labels, num_classes), known_labels)
    else:
        delta = torch.zeros_like(centers)
    centers = normalize_points(centers, pc_range).clamp(min=0.0, max=1.0)
    return centers, known_labels, delta


def ray_depth_steps(num_boxes: int, num_rays: int, alpha: float, beta: float, radius: float,
                    split: float, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Depth steps of one ray group (spec §6.2), dimensionless (multiply by sigma for metres).

    Draws ``s = (2 * Beta(alpha, beta) - 1) * radius`` of shape (num_rays, num_boxes) (one Beta
    call of ``num_rays * num_boxes`` samples, ray-major), picks per box the positive
    ``r* = argmin_r |s|``, sets its step to ``|s|`` or, if that exceeds ``split``, to a fresh
    ``U(-split, split)`` (one ``rand(K)`` call, K = resets).
    Returns ``(steps (num_rays, num_boxes) float32, positive (num_boxes,) int64)``.
    """
    steps = (sample_beta(alpha, beta, num_rays * num_boxes, generator) * 2 - 1.0) * radius
    steps = steps.view(num_rays, num_boxes)
    min_value, positive = steps.abs().min(dim=0)
    reset = min_value > split
    num_reset = int(reset.sum())
    if generator is None:
        fresh = torch.rand(num_reset)
    else:
        fresh = torch.rand(num_reset, generator=generator, device=generator.device)
    fresh = (fresh.to(min_value.device) * 2 - 1) * split
    min_value = min_value.masked_scatter(reset, fresh)
    steps = steps.scatter(0, positive.unsqueeze(0), min_value.unsqueeze(0))
    return steps, positive


def project_to_cameras(points: Tensor, lidar2img: Tensor, pad_shape: tuple[int, int]
                       ) -> tuple[Tensor, Tensor]:
    """Project LiDAR points into every camera of their sample.

    Args: ``points`` (n, 3) metres; ``lidar2img`` (n, V, 4, 4) the matrices of each point's
    sample; ``pad_shape`` (H, W) pixels.
    Returns ``(proj (n, V, 4), visible (n, V) bool)``: ``proj`` = ``(px, py, z', w)`` with the pixel
    ``px = x' / (z' +- 1e-6)`` (sign of z'), raw depth ``z'`` and homogeneous ``w``; ``visible`` =
    ``z' > 0`` and the pixel inside ``[0, W) x [0, H)``.
    """
    homo = torch.cat([points, points.new_ones(points.shape[0], 1)], dim=-1)
    cam = (lidar2img @ homo[:, None, :, None]).squeeze(-1)              # (n, V, 4)
    depth = cam[..., 2:3]
    in_front = depth[..., 0] > 0
    eps = in_front.unsqueeze(-1) * 1e-6 - (~in_front).unsqueeze(-1) * 1e-6
    pixel = cam[..., :2] / (depth + eps)
    pad_h, pad_w = pad_shape
    visible = (in_front & (pixel[..., 0] < pad_w) & (pixel[..., 0] >= 0)
               & (pixel[..., 1] < pad_h) & (pixel[..., 1] >= 0))
    return torch.cat([pixel, cam[..., 2:4]], dim=-1), visible


def shift_along_rays(centers: Tensor, depth_offsets: Tensor, lidar2img: Tensor,
                     box_bid: Tensor, pad_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Slide GT centres along the camera ray (spec §6.2), vectorised over rays/boxes/cameras.

    Args: ``centers`` (n, 3) GT centres, LiDAR frame, metres; ``depth_offsets`` (R, n) metres
    (``sigma * step``) added to the camera depth; ``lidar2img`` (B, V, 4, 4); ``box_bid`` (n,)
    sample of each box; ``pad_shape`` (H, W).
    Returns ``(shifted (R, n, 3) metres, camera (n,) int64)``: ``camera`` is the last camera (in
    ``CAMERA_NAMES`` order) in which the centre is visible, -1 if none; such boxes keep the
    unchanged centre for every ray sample.
    """
    mats = lidar2img[box_bid]                                           # (n, V, 4, 4)
    proj, visible = project_to_cameras(centers, mats, pad_shape)        # (n, V, 4), (n, V)
    num_cams = mats.shape[1]
    # last visible camera: argmax over a reversed index ramp of the visibility flags
    ramp = torch.arange(1, num_cams + 1, device=centers.device)
    camera = (visible.long() * ramp).argmax(dim=-1)
    any_visible = visible.any(dim=-1)
    camera = torch.where(any_visible, camera, torch.full_like(camera, -1))

    cam_idx = camera.clamp(min=0)
    sel = proj[torch.arange(proj.shape[0], device=proj.device), cam_idx]  # (n, 4)
    inv = torch.linalg.inv(lidar2img)[box_bid, cam_idx]                   # (n, 4, 4)
    depth = sel[None, :, 2] + depth_offsets                               # (R, n)
    moved = torch.stack([sel[None, :, 0] * depth, sel[None, :, 1] * depth, depth,
                         sel[None, :, 3].expand_as(depth)], dim=-1)       # (R, n, 4)
    back = (inv[None] @ moved.unsqueeze(-1)).squeeze(-1)[..., :3]         # (R, n, 3)
    shifted = torch.where(any_visible[None, :, None], back, centers[None].expand_as(back))
    return shifted, camera


def slot_indices(known_num: list[int], num_groups: int, device=None) -> Tensor:
    """Query slot of each DN entry (spec §6.3): (num_groups * n,) int64, entry g * n + i of local
    box k goes to slot g * S + k (S = max(known_num))."""
    single_pad = max(known_num)
    local = torch.cat([torch.arange(k, device=device) for k in known_num])
    offsets = torch.arange(num_groups, device=device) * single_pad
    return (offsets[:, None] + local[None, :]).reshape(-1)


def pad_into_slots(reference_points: Tensor, centers: Tensor, known_bid: Tensor,
                   map_known_indice: Tensor, batch_size: int, pad_size: int) -> Tensor:
    """(B, D + Q, 3): zeros for the D DN slots then the Q learnable ``reference_points`` (Q, 3)
    for every row; the DN entries ``centers`` (E, 3) are written to ``(known_bid, map_known_indice)``.
    Differentiable with respect to ``reference_points``."""
    padding = reference_points.new_zeros(pad_size, 3)
    padded = torch.cat([padding, reference_points], dim=0).unsqueeze(0).repeat(batch_size, 1, 1)
    return padded.index_put((known_bid, map_known_indice), centers.to(padded.dtype))


def denoising_attention_mask(pad_size: int, single_pad: int, scalar: int, ray_groups: int,
                             num_rays: int, num_query: int, num_propagated: int, memory_len: int,
                             device=None) -> Tensor:
    """Self-attention mask (D + Q + P, D + Q + M) bool, True = blocked (spec §6.4).

    Queries: D DN slots, Q learnable, P propagated. Keys: D DN slots, Q learnable, M memory (the
    P propagated queries then the M - P other memory entries). DN slots are partitioned into
    blocks: each standard group (S slots) and each ray group (``num_rays * S`` slots) is a block;
    a DN query sees only its own block among DN keys, plus everything else; non-DN queries never
    see DN keys. With ``ray_groups = 0`` this is StreamPETR's mask.
    """
    if pad_size != single_pad * (scalar + ray_groups * num_rays):
        raise ValueError(f"pad_size {pad_size} != single_pad {single_pad} x "
                         f"(scalar {scalar} + ray_groups {ray_groups} x num_rays {num_rays})")
    rows = pad_size + num_query + num_propagated
    cols = pad_size + num_query + memory_len
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    if pad_size == 0:
        return mask
    group = torch.arange(pad_size, device=device) // single_pad          # 0 .. G_tot-1
    block = torch.where(group < scalar, group, scalar + (group - scalar) // num_rays)
    mask[:pad_size, :pad_size] = block[:, None] != block[None, :]
    mask[pad_size:, :pad_size] = True
    return mask


# ----------------------------------------------------------------------------------------------
# the builder
# ----------------------------------------------------------------------------------------------

def _check_inputs(gt_boxes, gt_labels, reference_points, lidar2img) -> None:
    if len(gt_boxes) != len(gt_labels):
        raise DataError(f"gt_boxes has {len(gt_boxes)} samples but gt_labels {len(gt_labels)}")
    if lidar2img.dim() != 4 or lidar2img.shape[-2:] != (4, 4):
        raise DataError(f"lidar2img: expected (B, N, 4, 4), got {tuple(lidar2img.shape)}")
    if len(gt_boxes) != lidar2img.shape[0]:
        raise DataError(f"gt_boxes has {len(gt_boxes)} samples but lidar2img batch is "
                        f"{lidar2img.shape[0]}")
    if reference_points.dim() != 2 or reference_points.shape[1] != 3:
        raise DataError(f"reference_points: expected (Q, 3), got {tuple(reference_points.shape)}")
    for b, (box, lab) in enumerate(zip(gt_boxes, gt_labels)):
        if box.dim() != 2 or box.shape[1] < 6:
            raise DataError(f"gt_boxes[{b}]: expected (n, 9), got {tuple(box.shape)}")
        if lab.shape != (box.shape[0],):
            raise DataError(f"gt_labels[{b}]: expected ({box.shape[0]},), got {tuple(lab.shape)}")


def build_denoising_queries(gt_boxes: list[Tensor], gt_labels: list[Tensor],
                            reference_points: Tensor, lidar2img: Tensor,
                            pad_shape: tuple[int, int], cfg: DenoisingConfig, *,
                            pc_range=PC_RANGE, num_classes: int = 10, num_propagated: int = 128,
                            memory_len: int = 512, generator: torch.Generator | None = None
                            ) -> DenoisingQueries | None:
    """Build the DN queries of one training batch (official ``prepare_for_dn``, spec §6).

    Args:
        gt_boxes: B tensors (n_b, 9) ``[x, y, z_center, l, w, h, yaw, vx, vy]``, LiDAR frame, metres.
        gt_labels: B tensors (n_b,) int64 class indices.
        reference_points: (Q, 3) learnable normalised reference points (gradient flows through).
        lidar2img: (B, N, 4, 4) augmented LiDAR -> image (pixel * depth) matrices.
        pad_shape: (H, W) padded image size used for the visibility test.
        cfg: scalar, noise_scale, noise_trans, split and ``cfg.ray`` (groups, num_rays, alpha,
            beta, radius, enabled).
        generator: optional; default None draws from torch's default generator exactly as the
            official code does.
    Returns None when ``cfg.enabled`` is False or the batch has no box at all (D = 0).
    """
    _check_inputs(gt_boxes, gt_labels, reference_points, lidar2img)
    if not cfg.enabled:
        return None
    known_num = [int(b.shape[0]) for b in gt_boxes]
    if sum(known_num) == 0:
        return None
    device = reference_points.device
    ray_groups = cfg.ray.groups if cfg.ray.enabled else 0
    num_rays = cfg.ray.num_rays
    num_groups = cfg.scalar + ray_groups * num_rays

    boxes = torch.cat(gt_boxes).to(device=device, dtype=torch.float32)       # (n, 9)
    labels = torch.cat(gt_labels).to(device).long()                          # (n,)
    n = boxes.shape[0]
    batch_idx = torch.cat([torch.full((k,), b, dtype=torch.long, device=device)
                           for b, k in enumerate(known_num)])

    centers, known_labels, _ = box_noise_groups(
        boxes, labels, cfg.scalar, cfg.noise_scale, cfg.noise_trans, cfg.split, num_classes,
        pc_range, generator)
    all_centers, all_labels = [centers], [known_labels]

    if ray_groups:
        sigma = boxes[:, 3:6].mean(dim=-1) / 2                               # (n,) metres
        mats = lidar2img.to(device=device, dtype=torch.float32)
        for _ in range(ray_groups):   # per group: Beta draw then reset draw (official order)
            steps, positive = ray_depth_steps(n, num_rays, cfg.ray.alpha, cfg.ray.beta,
                                              cfg.ray.radius, cfg.split, generator)
            steps = steps.to(device)
            shifted, _ = shift_along_rays(boxes[:, :3], sigma[None] * steps, mats, batch_idx,
                                          pad_shape)
            ray_labels = torch.full((num_rays, n), num_classes, dtype=torch.long, device=device)
            ray_labels.scatter_(0, positive.to(device)[None], labels[None])
            all_centers.append(normalize_points(shifted.reshape(-1, 3), pc_range)
                               .clamp(min=0.0, max=1.0))
            all_labels.append(ray_labels.reshape(-1))

    single_pad = max(known_num)
    pad_size = single_pad * num_groups
    known_bid = batch_idx.repeat(num_groups)
    map_known_indice = slot_indices(known_num, num_groups, device)
    padded = pad_into_slots(reference_points, torch.cat(all_centers), known_bid,
                            map_known_indice, len(gt_boxes), pad_size)
    attn_mask = denoising_attention_mask(pad_size, single_pad, cfg.scalar, ray_groups, num_rays,
                                         reference_points.shape[0], num_propagated, memory_len,
                                         device=device)
    return DenoisingQueries(
        reference_points=padded,
        attn_mask=attn_mask,
        pad_size=pad_size,
        known_labels=torch.cat(all_labels),
        known_boxes=boxes.repeat(num_groups, 1),
        known_bid=known_bid,
        map_known_indice=map_known_indice,
        known_indice=torch.arange(n, device=device).repeat(num_groups),
        known_num=known_num,
    )
