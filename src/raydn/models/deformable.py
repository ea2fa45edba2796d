"""Multi-view, multi-scale deformable feature sampling as a pure function (spec §7.2).

Numerically equivalent to mmcv's ``MultiScaleDeformableAttnFunction`` (CUDA kernel) as called by
the official ``DeformableFeatureAggregationCuda``: for every level the sampling position in
feature-pixel units is ``(x * W_l - 0.5, y * H_l - 0.5)``, bilinear, zero outside. The same
normalised location is used by all groups and levels (the official call repeats it), which lets us
sample all channels with ONE ``grid_sample`` per level and apply the per-group weights afterwards.

Two interchangeable implementations with the same contract, selected through :data:`SAMPLERS` /
:func:`get_sampler`: :func:`deformable_sample` (reference, ``F.grid_sample`` per level) and
:func:`deformable_sample_gather` (fused bilinear x attention weights through ``F.embedding_bag``,
the default of the head; much faster on CPU). A custom fused kernel can be added the same way.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_levels(name: str, BN: int, locations: Tensor, weights: Tensor, spatial_shapes,
                  level_start) -> tuple[list, list]:
    """Shared argument checks of the samplers; level shapes/starts as Python int lists."""
    _, A, _, L, P = weights.shape
    if locations.shape != (BN, A, P, 2):
        raise ValueError(f"{name}: locations must be {(BN, A, P, 2)}, got {tuple(locations.shape)}")
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = [tuple(int(v) for v in s) for s in spatial_shapes.tolist()]
    if isinstance(level_start, Tensor):
        level_start = [int(v) for v in level_start.tolist()]
    if len(spatial_shapes) != L:
        raise ValueError(f"{name}: {len(spatial_shapes)} levels but weights have {L}")
    return list(spatial_shapes), list(level_start)


def deformable_sample(value: Tensor, spatial_shapes: Sequence[tuple[int, int]] | Tensor,
                      level_start: Sequence[int] | Tensor, locations: Tensor,
                      weights: Tensor) -> Tensor:
    """Weighted bilinear sampling of flattened multi-level feature maps.

    Args:
        value: (BN, sum_l H_l*W_l, C) flattened features (BN = batch * cameras), level-major,
            row-major inside a level; channels group-major (group g = channels g*C/G .. ).
        spatial_shapes: L pairs (H_l, W_l) (list or (L, 2) long tensor).
        level_start: L start offsets of each level in ``value`` (exclusive cumsum of H_l*W_l).
        locations: (BN, A, P, 2) normalised image coordinates (x, y) in [0, 1] (0/1 = image
            border); shared by all groups and levels. Values outside are allowed (zero sample).
        weights: (BN, A, G, L, P) attention weights.

    Returns:
        (BN, A, C): ``sum_l sum_p w[g, l, p] * bilinear(value_l[group g], loc_p)``, channel order
        group-major, in ``value``'s dtype (keep fp32).
    """
    BN, _, C = value.shape
    _, A, G, L, P = weights.shape
    if C % G:
        raise ValueError(f"deformable_sample: channels {C} not divisible by groups {G}")
    spatial_shapes, level_start = _check_levels("deformable_sample", BN, locations, weights,
                                                spatial_shapes, level_start)
    # grid in [-1, 1] (align_corners=False): pixel = loc * W - 0.5, as mmcv's kernel.
    # Clamp keeps far-away points exactly zero and finite.
    grid = (locations.clamp(-1.0, 2.0) * 2.0 - 1.0).to(value.dtype)
    w = weights.permute(0, 2, 3, 1, 4)  # (BN, G, L, A, P)
    out = None
    for lvl, (H, W) in enumerate(spatial_shapes):  # loop over the (4) levels only
        start = level_start[lvl]
        v = value[:, start:start + H * W].transpose(1, 2).reshape(BN, C, H, W)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        s = s.view(BN, G, C // G, A, P)                      # (BN, G, Cg, A, P)
        contrib = torch.einsum("bgcap,bgap->bagc", s, w[:, :, lvl])
        out = contrib if out is None else out + contrib
    return out.reshape(BN, A, C)


def _bilinear_corners(locations: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                      level_start: Sequence[int], num_rows: int) -> tuple[Tensor, Tensor]:
    """Flat row indices and bilinear weights of the 4 corners of every sample on every level.

    locations (BN, A, P, 2) normalised (x, y) -> (idx, w), both (BN, A, L, P, 4); ``idx`` indexes
    rows of the (BN * num_rows, C) flattened value; out-of-map corners get weight 0 (and a dummy
    valid index), exactly the zero padding of mmcv's kernel / ``grid_sample``.
    """
    BN = locations.shape[0]
    L = len(spatial_shapes)
    dev = locations.device
    Hf = torch.tensor([float(h) for h, _ in spatial_shapes], dtype=locations.dtype, device=dev).view(1, 1, L, 1)
    Wf = torch.tensor([float(w) for _, w in spatial_shapes], dtype=locations.dtype, device=dev).view(1, 1, L, 1)
    Hi = torch.tensor([int(h) for h, _ in spatial_shapes], device=dev).view(1, 1, L, 1)
    Wi = torch.tensor([int(w) for _, w in spatial_shapes], device=dev).view(1, 1, L, 1)
    st = torch.tensor([int(v) for v in level_start], device=dev).view(1, 1, L, 1)
    loc = locations.clamp(-1.0, 2.0)
    x = loc[..., 0].unsqueeze(2) * Wf - 0.5                     # (BN, A, L, P) feature pixels
    y = loc[..., 1].unsqueeze(2) * Hf - 0.5
    x0f, y0f = x.floor(), y.floor()
    lx, ly = x - x0f, y - y0f                                    # differentiable in x, y
    x0, y0 = x0f.long(), y0f.long()
    idx_l, w_l = [], []
    for dy, wy in ((0, 1 - ly), (1, ly)):                        # 4 corners, fixed order
        for dx, wx in ((0, 1 - lx), (1, lx)):
            xi, yi = x0 + dx, y0 + dy
            valid = (xi >= 0) & (xi < Wi) & (yi >= 0) & (yi < Hi)
            idx = st + yi.clamp(min=0) * Wi + xi.clamp(min=0)
            idx_l.append(torch.where(valid, idx, torch.zeros_like(idx)))
            w_l.append(wy * wx * valid.to(wx.dtype))
    base = (torch.arange(BN, device=dev) * num_rows).view(BN, 1, 1, 1, 1)
    return torch.stack(idx_l, -1) + base, torch.stack(w_l, -1)


class GroupedValue:
    """Features re-laid out for :func:`deformable_sample_gather`: ``table`` (G, BN * S, C / G)
    contiguous, built once per frame by :func:`group_value` and shared by all decoder layers."""

    __slots__ = ("table", "bn", "rows")

    def __init__(self, table: Tensor, bn: int, rows: int):
        self.table, self.bn, self.rows = table, bn, rows

    @property
    def shape(self) -> tuple[int, int, int]:
        G, _, Cg = self.table.shape
        return (self.bn, self.rows, G * Cg)


def group_value(value: Tensor, num_groups: int) -> GroupedValue:
    """(BN, S, C) group-major channels -> :class:`GroupedValue` (one copy)."""
    BN, S, C = value.shape
    if C % num_groups:
        raise ValueError(f"group_value: channels {C} not divisible by groups {num_groups}")
    table = value.reshape(BN * S, num_groups, C // num_groups).transpose(0, 1).contiguous()
    return GroupedValue(table, BN, S)


def deformable_sample_gather(value: Tensor | GroupedValue,
                             spatial_shapes: Sequence[tuple[int, int]] | Tensor,
                             level_start: Sequence[int] | Tensor, locations: Tensor,
                             weights: Tensor) -> Tensor:
    """Same contract and result as :func:`deformable_sample` (up to float rounding), computed as
    ONE weighted gather per group with ``F.embedding_bag(mode='sum', per_sample_weights=...)``:
    bilinear corner weights x attention weights are fused, so each output channel is a single
    208-term (4 levels x 13 points x 4 corners) weighted sum and no (C, A, P) intermediate is
    materialised. Several times less CPU time than the ``grid_sample`` version for the R50 head.
    Differentiable w.r.t. ``value``, ``locations`` and ``weights``.

    ``value`` may be a :class:`GroupedValue` (see :func:`group_value`) to skip the per-call
    re-layout. ``weights`` may be any strided (BN, A, G, L, P) tensor; a permuted view of a
    contiguous (G, BN, A, L, P) tensor (what the head produces) avoids a copy.
    """
    if not isinstance(value, GroupedValue):
        value = group_value(value, weights.shape[2])
    BN, S, C = value.shape
    _, A, G, L, P = weights.shape
    if value.table.shape[0] != G:
        raise ValueError(f"deformable_sample_gather: value has {value.table.shape[0]} groups, weights {G}")
    spatial_shapes, level_start = _check_levels("deformable_sample_gather", BN, locations, weights,
                                                spatial_shapes, level_start)
    dtype = value.table.dtype
    idx, bw = _bilinear_corners(locations.to(dtype), spatial_shapes, level_start, S)
    n = L * P * 4
    idx = idx.reshape(BN * A, n)
    # (G, BN, A, L, P, 4): contiguous per group when ``weights`` is G-major underneath
    cw = weights.to(dtype).permute(2, 0, 1, 3, 4).unsqueeze(-1) * bw.unsqueeze(0)
    cw = cw.reshape(G, BN * A, n)
    outs = [F.embedding_bag(idx, value.table[g], mode="sum", per_sample_weights=cw[g])
            for g in range(G)]                                             # loop over groups (8)
    return torch.stack(outs, 1).reshape(BN, A, C)


deformable_sample_gather.prepare = group_value  # type: ignore[attr-defined]


from raydn.models.deformable_fast import deformable_sample_fused  # noqa: E402

#: Available sampler implementations (explicit table). "fused" (default of the head): custom
#: autograd op with a hand-written backward (see :mod:`raydn.models.deformable_fast`);
#: "gather": embedding-bag forward with autograd backward; "grid_sample": the plain reference.
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "fused": deformable_sample_fused,
    "grid_sample": deformable_sample,
    "gather": deformable_sample_gather,
}


def get_sampler(name: str = "grid_sample") -> Callable[..., Tensor]:
    """Return the sampling function called ``name`` (see :data:`SAMPLERS`)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown deformable sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None
