"""Fast multi-view, multi-scale deformable sampling with a hand-written backward (spec §7.2).

Same maths and signature as :func:`raydn.models.deformable.deformable_sample` (the
``grid_sample`` reference) and as mmcv's ``ms_deform_attn`` kernel used officially: for level
``l`` with shape ``(H_l, W_l)`` the sampling position in feature-pixel units is
``(x * W_l - 0.5, y * H_l - 0.5)``, bilinear with zero padding outside, per-group attention weights
(channels group-major), the same normalised location for all groups and levels, summed over levels
and points. Gradients flow to ``value``, ``locations`` and ``weights``.

Formulation
-----------
For every (camera-batch ``n``, query ``a``, point ``p``, level ``l``, corner ``k``) there is one
*corner entry* ``e`` with a flat row ``key[e]`` into ``value`` viewed as ``(BN * sum_HW, C)`` and a
bilinear weight ``b[e]`` (0 for a corner outside the map). Folding the per-group attention weight in,
the whole op is ONE sparse matrix product::

    out[(n, a, g), :] = sum_e  w[n, a, g, l(e), p(e)] * b[e] * value[(key[e], g), :]
    i.e.  out (BN*A*G, Cg) = S (BN*A*G, BN*sum_HW*G) @ value (BN*sum_HW*G, Cg)

``S`` has exactly ``P*L*4`` entries per row, so its CSR row pointer is an ``arange``; the product
is evaluated as a weighted-sum ``F.embedding_bag`` (fbgemm on CPU; ~1.5-2x faster here than MKL's
CSR product). Backward:

* ``d value = S^T @ d out``: ``S^T`` is built as CSR by one integer sort of the corner keys
  (rows ordered ``(g, pixel)``), then one more weighted ``embedding_bag``;
* ``d S`` (sampled dense-dense product, ``torch.sparse.sampled_addmm``) = per entry the dot of
  ``d out[(n, a, g)]`` with ``value[(key, g)]``; from it ``d weights`` (sum over corners with ``b``)
  and ``d b`` (sum over groups with ``w``), and ``d locations`` via the bilinear derivatives
  (``d b / d x_pix = ±w_y``, ``d x_pix / d x = W_l``).

**Only points that can touch a feature map enter S.** Every key point is projected into every
camera, but it lies in (at most) one or two of the N images: at the demo's training shapes ~19 % of
the (camera, query, point) triples fall inside an image. A point whose normalised location is
outside ``[-0.5 / W_min, 1 + 0.5 / W_min] x [-0.5 / H_min, 1 + 0.5 / H_min]`` (``W_min`` / ``H_min``
the smallest level's size) has all-zero bilinear weights on every level, hence contributes
nothing and receives zero gradient; the sparse back end drops these triples before building S
(rows of S then have variable length, which CSR / ``embedding_bag`` offsets express directly) and
scatters the weight / location gradients of the kept ones back into zero tensors. Same sums, so
the same result up to float rounding, for ~5x less work.

No tensor of shape ``(BN, A, L, P, 4, C)`` is ever formed. The work runs in chunks of query rows
whose largest temporary (``G * 4L`` entries per kept point) stays under ``chunk_bytes`` (16 MiB
by default: fits the allocator's reuse threshold, no page faults). Only the three inputs are saved
for backward; the corner entries are recomputed per chunk.
Measured (benchmarks/bench_deformable.py, 2 threads): ~8x the reference's speed for
forward+backward at the training shapes before the point compaction, ~10x in eval, ~1/4 of its
peak memory.

Back ends
---------
* ``"sparse"`` (CPU, float32/float64; the default there): described above.
* ``"gather"`` (any device and dtype, the default off the CPU): the same entries, evaluated with
  dense ``index_select`` / ``index_add_`` over chunks of queries (memory bounded by ``chunk_bytes``).

Differences to the reference are float rounding (the pixel coordinate is computed as
``x * W - 0.5`` instead of grid_sample's ``((2x - 1 + 1) * W - 1) / 2``); location gradients are
discontinuous at exact integer pixel positions, where both use the corner pair
``floor(x_pix), floor(x_pix) + 1``, so they agree except when rounding moves a point across a
pixel border (measure zero). Locations are clamped to [-1, 2] exactly as in the reference (the clamp
never changes a value: every point outside [-1, 2] is outside every level, so it samples 0 and gets
zero gradient either way).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DeformableSampleFunction", "deformable_sample_fused", "SAMPLE_BACKENDS"]

#: Accepted values of the ``backend`` argument of :func:`deformable_sample_fused`.
SAMPLE_BACKENDS = ("auto", "sparse", "gather")

_SPARSE_CHUNK_BYTES = 16 * 2 ** 20
_GATHER_CHUNK_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class _Layout:
    """Static shape information of one call (python ints only)."""

    BN: int
    A: int
    G: int
    L: int
    P: int
    C: int
    hw_total: int
    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]

    @property
    def cg(self) -> int:
        return self.C // self.G

    @property
    def k(self) -> int:
        """Corner entries per (camera-batch, query, group) row: P * L * 4."""
        return self.P * self.L * 4


def _layout(value: Tensor, spatial_shapes, level_start, locations: Tensor, weights: Tensor) -> _Layout:
    if value.dim() != 3:
        raise ValueError(f"deformable_sample_fused: value must be (BN, sum_HW, C), got {tuple(value.shape)}")
    if weights.dim() != 5:
        raise ValueError(f"deformable_sample_fused: weights must be (BN, A, G, L, P), got {tuple(weights.shape)}")
    BN, hw_total, C = value.shape
    _, A, G, L, P = weights.shape
    if weights.shape[0] != BN:
        raise ValueError(f"deformable_sample_fused: weights batch {weights.shape[0]} != value batch {BN}")
    if locations.shape != (BN, A, P, 2):
        raise ValueError(f"deformable_sample_fused: locations must be {(BN, A, P, 2)}, got {tuple(locations.shape)}")
    if C % G:
        raise ValueError(f"deformable_sample_fused: channels {C} not divisible by groups {G}")
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if isinstance(level_start, Tensor):
        level_start = level_start.tolist()
    starts = tuple(int(s) for s in level_start)
    if len(shapes) != L or len(starts) != L:
        raise ValueError(f"deformable_sample_fused: {len(shapes)} spatial shapes / {len(starts)} level starts "
                         f"but weights have {L} levels")
    for (h, w), s in zip(shapes, starts):
        if s < 0 or s + h * w > hw_total:
            raise ValueError(f"deformable_sample_fused: level ({h}, {w}) at offset {s} exceeds value rows {hw_total}")
    return _Layout(BN, A, G, L, P, C, hw_total, shapes, starts)


def _corner_entries(loc: Tensor, base: Tensor, lay: _Layout, n_rows: int, dtype: torch.dtype):
    """Bilinear corner rows and weights of every (query row, level, point, corner).

    Args:
        loc: (q, P, 2) normalised (x, y) of a chunk of query rows, 0/1 = image border.
        base: (q,) int64 first ``value`` row of each query's camera image (``local camera * sum_HW``).
        n_rows: number of ``value`` rows addressed by the chunk (keys are clamped into [0, n_rows)).
        dtype: compute dtype (the value dtype).

    Returns:
        key: (q, 4, L, P) int64 row into the chunk's ``value`` rows; corners outside the map (weight
            0) are clamped into range.
        b: (q, 4, L, P) bilinear weights (0 outside), corner order (y0,x0), (y0,x1), (y1,x0), (y1,x1).
        (Corner-major so that sums over corners or groups run over contiguous L*P rows.)
        aux: what :func:`_location_grad` needs: masked 1-D weights ``wx0, wx1, wy0, wy1`` and 1-D
            corner validities ``vx0, vx1, vy0, vy1`` (all (q, L, P)), level sizes ``Wf, Hf`` (L, 1).
    """
    dev = loc.device
    Wf = torch.tensor([[float(w)] for _, w in lay.shapes], dtype=dtype, device=dev)   # (L, 1)
    Hf = torch.tensor([[float(h)] for h, _ in lay.shapes], dtype=dtype, device=dev)
    Wi = torch.tensor([[w] for _, w in lay.shapes], dtype=torch.long, device=dev)
    Hi = torch.tensor([[h] for h, _ in lay.shapes], dtype=torch.long, device=dev)
    xy = loc.to(dtype).clamp(-1.0, 2.0)
    limit = 3.0 * float(max(max(s) for s in lay.shapes))
    out = []
    for c, size_f, size_i in ((0, Wf, Wi), (1, Hf, Hi)):      # x then y, each (q, L, P)
        pix = xy[..., c].unsqueeze(1) * size_f - 0.5           # feature-pixel coordinate
        p0 = pix.floor()
        frac = pix - p0
        # NaN/inf never become wild indices (every such corner is outside the map anyway)
        i0 = p0.nan_to_num_(nan=-2.0).clamp_(-2.0, limit).long()
        v0 = (i0 >= 0) & (i0 < size_i)
        v1 = (i0 >= -1) & (i0 < size_i - 1)
        zero = torch.zeros((), dtype=dtype, device=dev)
        out.append((i0, torch.where(v0, 1.0 - frac, zero), torch.where(v1, frac, zero), v0, v1))
    (x0, wx0, wx1, vx0, vx1), (y0, wy0, wy1, vy0, vy1) = out
    b = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=1)               # (q, 4, L, P)
    starts = torch.tensor([[s] for s in lay.starts], dtype=torch.long, device=dev)    # (L, 1)
    k = base.view(-1, 1, 1) + starts + y0 * Wi + x0                                    # (q, L, P)
    key = torch.stack([k, k + 1, k + Wi, k + (Wi + 1)], dim=1).clamp_(0, n_rows - 1)  # (q, 4, L, P)
    return key, b, (wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1, Wf, Hf)


def _location_grad(grad_b: Tensor, loc: Tensor, aux) -> Tensor:
    """d loss / d locations from d loss / d b (masked bilinear corner weights).

    ``b = [wy0 wx0, wy0 wx1, wy1 wx0, wy1 wx1]`` with ``wx0 = 1 - fx``, ``wx1 = fx`` (when the corner
    column is inside the map, else 0), ``d fx / d x_pix = 1``, ``d x_pix / d x = W_l``; same for y.

    Args:
        grad_b: (q, 4, L, P) gradient w.r.t. ``b`` of :func:`_corner_entries`.
        loc: (q, P, 2) the (unclamped) locations.
    Returns:
        (q, P, 2) in ``grad_b.dtype``.
    """
    wx0, wx1, wy0, wy1, vx0, vx1, vy0, vy1, Wf, Hf = aux
    g00, g01, g10, g11 = grad_b.unbind(1)
    zero = torch.zeros((), dtype=grad_b.dtype, device=grad_b.device)
    g_px = torch.where(vx1, g01 * wy0 + g11 * wy1, zero) - torch.where(vx0, g00 * wy0 + g10 * wy1, zero)
    g_py = torch.where(vy1, g10 * wx0 + g11 * wx1, zero) - torch.where(vy0, g00 * wx0 + g01 * wx1, zero)
    g = torch.stack([(g_px * Wf).sum(1), (g_py * Hf).sum(1)], dim=-1)               # (q, P, 2)
    inside = (loc >= -1.0) & (loc <= 2.0)                       # backward of clamp(-1, 2)
    return torch.where(inside, g, zero)


# ----------------------------------------------------------------------------------------------
# chunking: query rows (camera-major), never mixing partial cameras
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rows:
    """A chunk of query rows and the camera images they address."""
    r0: int          # first query row (of BN * A)
    r1: int          # end query row
    n0: int          # first camera image touched
    n1: int          # end camera image


@dataclass(frozen=True)
class _Chunk(_Rows):
    first: bool      # first chunk touching cameras n0..n1 (write grad_value instead of adding)


def _row_chunks(lay: _Layout, bytes_per_row: int, chunk_bytes: int) -> list[_Chunk]:
    """Split the BN*A query rows into chunks whose largest temporary stays under ``chunk_bytes``.

    A chunk holds whole camera images (balanced count) or, when one image is too big, part of one.
    """
    rows = max(1, chunk_bytes // max(1, bytes_per_row))
    if rows >= lay.A:
        n_chunks = -(-lay.BN // (rows // lay.A))
        per = -(-lay.BN // n_chunks)
        return [_Chunk(n * lay.A, min(lay.BN, n + per) * lay.A, n, min(lay.BN, n + per), True)
                for n in range(0, lay.BN, per)]
    n_sub = -(-lay.A // rows)
    per = -(-lay.A // n_sub)
    return [_Chunk(n * lay.A + s, n * lay.A + min(lay.A, s + per), n, n + 1, s == 0)
            for n in range(lay.BN) for s in range(0, lay.A, per)]


def _group_major(weights: Tensor, lay: _Layout) -> Tensor:
    """(BN, A, G, L, P) -> (G, BN*A, L, P); a view when ``weights`` is a permuted G-major tensor
    (what the head produces), one copy otherwise."""
    return weights.permute(2, 0, 1, 3, 4).reshape(lay.G, lay.BN * lay.A, lay.L, lay.P)


class _ChunkEntries:
    """Corner entries of one chunk: keys, bilinear weights, group-folded weights (G, q, 4, L, P).

    ``wgl``: the attention weights as (G, BN*A, L, P) (a view when they are G-major underneath).
    """

    def __init__(self, ch: _Chunk, loc: Tensor, wgl: Tensor, lay: _Layout, dtype: torch.dtype):
        nq = lay.BN * lay.A
        self.q = ch.r1 - ch.r0
        self.n_cams = ch.n1 - ch.n0
        self.loc = loc.reshape(nq, lay.P, 2)[ch.r0:ch.r1]
        rows = torch.arange(ch.r0, ch.r1, device=loc.device)
        base = (torch.div(rows, lay.A, rounding_mode="floor") - ch.n0) * lay.hw_total
        self.key, self.b, self.aux = _corner_entries(self.loc, base, lay, self.n_cams * lay.hw_total, dtype)
        self.wg = wgl[:, ch.r0:ch.r1].to(dtype)                                 # (G, q, L, P)
        self.vals = torch.empty((lay.G, self.q, 4, lay.L, lay.P), dtype=dtype, device=loc.device)
        torch.mul(self.wg.unsqueeze(2), self.b, out=self.vals)                     # (G, q, 4, L, P)


# ----------------------------------------------------------------------------------------------
# sparse (CPU) back end: the kept points only, per chunk
# ----------------------------------------------------------------------------------------------

def _csr(crow: Tensor, col: Tensor, val: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2 ** 31 - 1 else torch.int64


def _spmm(crow: Tensor, col: Tensor, val: Tensor, dense: Tensor) -> Tensor:
    """CSR (crow, col, val) @ dense (n, Cg) -> (rows, Cg), as a weighted-sum ``embedding_bag``
    (fbgemm on CPU; ~1.5-2x faster here than MKL's sparse product); empty rows give 0."""
    return F.embedding_bag(col, dense, crow, mode="sum", per_sample_weights=val, include_last_offset=True)


def _group_offsets(row_ptr: Tensor, groups: int, per_group: int, itype: torch.dtype) -> Tensor:
    """CSR row pointer of ``groups`` stacked copies of the rows described by ``row_ptr`` (n+1,),
    copy g shifted by ``g * per_group`` entries -> (groups * n + 1,)."""
    g = torch.arange(groups, device=row_ptr.device, dtype=torch.long).view(-1, 1) * per_group
    last = torch.full((1,), groups * per_group, dtype=torch.long, device=row_ptr.device)
    return torch.cat([(row_ptr[:-1].unsqueeze(0) + g).reshape(-1), last]).to(itype)


def _kept_points(locations: Tensor, lay: _Layout, dtype: torch.dtype) -> Tensor:
    """Flat indices (K,) into the BN*A*P points (ascending) of those that can touch a feature map.

    A location (x, y) samples a non-zero bilinear corner of level l only if
    ``x * W_l - 0.5`` lies in (-1, W_l), i.e. ``x`` in (-0.5 / W_l, 1 + 0.5 / W_l) (same for y): the
    smallest level bounds all. NaN locations are dropped (they sample 0 everywhere)."""
    wmin = float(min(w for _, w in lay.shapes))
    hmin = float(min(h for h, _ in lay.shapes))
    xy = locations.to(dtype)  # the cast _corner_entries applies: the same numbers decide
    x, y = xy[..., 0], xy[..., 1]
    keep = (x >= -0.5 / wmin) & (x <= 1.0 + 0.5 / wmin) & (y >= -0.5 / hmin) & (y <= 1.0 + 0.5 / hmin)
    return keep.reshape(-1).nonzero().squeeze(1)


@dataclass(frozen=True)
class _KeptChunk(_Rows):
    k0: int          # first kept point (index into the kept list)
    k1: int          # end kept point


def _kept_chunks(kept: Tensor, lay: _Layout, chunk_bytes: int, itemsize: int) -> list[_KeptChunk]:
    """Split the query rows into chunks of whole rows holding at most ~``chunk_bytes`` of
    group-folded entries (``G * 4L`` per kept point; at least one row per chunk)."""
    n_rows = lay.BN * lay.A
    per_point = lay.G * 4 * lay.L * itemsize
    max_pts = max(1, chunk_bytes // per_point)
    cum = torch.cumsum(torch.bincount(torch.div(kept, lay.P, rounding_mode="floor"), minlength=n_rows), 0)
    chunks, r0, k0 = [], 0, 0
    while r0 < n_rows:                    # a few chunks (one at the demo's shapes)
        r1 = int(torch.searchsorted(cum, k0 + max_pts, right=True))
        r1 = min(n_rows, max(r1, r0 + 1))
        k1 = int(cum[r1 - 1])
        chunks.append(_KeptChunk(r0, r1, r0 // lay.A, (r1 - 1) // lay.A + 1, k0, k1))
        r0, k0 = r1, k1
    return chunks


class _KeptEntries:
    """Corner entries of the kept points of one chunk.

    ``pts`` (K,) flat point indices; ``rows`` (K,) their query row inside the chunk; ``loc``
    (K, 1, 2); ``key`` / ``b`` (K, 4, L) (as :func:`_corner_entries` with one point per row);
    ``widx`` (K, L) flat indices of their weights in the (BN*A, L, P) layout; ``wg`` (G, K, L) those
    weights; ``vals`` (G, K, 4, L) the entries of S; ``row_ptr`` (q+1,) entries of one group per
    query row (a row holds its kept points, each with its 4 corners x L levels)."""

    def __init__(self, ch: _KeptChunk, kept: Tensor, locations: Tensor, wgl: Tensor, lay: _Layout,
                 dtype: torch.dtype):
        dev = locations.device
        self.pts = kept[ch.k0:ch.k1]
        self.K, self.q, self.n_cams = self.pts.numel(), ch.r1 - ch.r0, ch.n1 - ch.n0
        rows = torch.div(self.pts, lay.P, rounding_mode="floor")
        self.rows = rows - ch.r0
        self.loc = locations.reshape(-1, 2).index_select(0, self.pts).view(self.K, 1, 2)
        base = (torch.div(rows, lay.A, rounding_mode="floor") - ch.n0) * lay.hw_total
        key, b, self.aux = _corner_entries(self.loc, base, lay, self.n_cams * lay.hw_total, dtype)
        self.key, self.b = key.view(self.K, 4, lay.L), b.view(self.K, 4, lay.L)
        p = self.pts - rows * lay.P
        lv = torch.arange(lay.L, device=dev)
        self.widx = ((rows * lay.L).unsqueeze(1) + lv) * lay.P + p.unsqueeze(1)       # (K, L)
        self.wg = wgl.reshape(lay.G, -1).index_select(1, self.widx.reshape(-1)).view(lay.G, self.K, lay.L).to(dtype)
        self.vals = self.wg.unsqueeze(2) * self.b.unsqueeze(0)                      # (G, K, 4, L)
        self.row_ptr = torch.zeros(self.q + 1, dtype=torch.long, device=dev)
        torch.cumsum(torch.bincount(self.rows, minlength=self.q) * (4 * lay.L), 0, out=self.row_ptr[1:])

    @property
    def entries(self) -> int:
        """Entries of one group (E = K * 4 * L)."""
        return self.key.numel()

    def csr(self, lay: _Layout) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """CSR structure of S (G*q, n_cams*sum_HW*G): rows (group, query), columns (value row,
        group); the values are ``vals`` flattened."""
        rows, ncols, E = lay.G * self.q, self.n_cams * lay.hw_total * lay.G, self.entries
        itype = _index_dtype(lay.G * E, rows, ncols)
        g = torch.arange(lay.G, device=self.key.device, dtype=itype).view(lay.G, 1)
        col = (self.key.reshape(1, -1).to(itype) * lay.G + g).reshape(-1)
        return _group_offsets(self.row_ptr, lay.G, E, itype), col, (rows, ncols)

    def value_grad(self, go: Tensor, lay: _Layout) -> Tensor:
        """``S^T @ go`` with S^T built as CSR, rows (group, value row), by one sort of the corner
        keys. go (G*q, Cg) rows (group, query) -> (n_cams, sum_HW, G, Cg) (a permuted view)."""
        n_pix, E, dev = self.n_cams * lay.hw_total, self.entries, self.key.device
        itype = _index_dtype(E * lay.G, n_pix * lay.G, self.q * lay.G)
        keyf = self.key.reshape(-1)
        perm = torch.sort(keyf.to(torch.int32) if n_pix < 2 ** 31 else keyf).indices   # entries by pixel
        rowptr = torch.zeros(n_pix + 1, dtype=torch.long, device=dev)
        torch.cumsum(torch.bincount(keyf, minlength=n_pix), 0, out=rowptr[1:])
        point = torch.div(perm, 4 * lay.L, rounding_mode="floor")                  # kept point of each entry
        g = torch.arange(lay.G, device=dev, dtype=itype).view(-1, 1)
        colT = (self.rows.index_select(0, point).to(itype).unsqueeze(0) + g * self.q).reshape(-1)
        m = point * lay.L + torch.remainder(perm, lay.L)                           # (point, level)
        valT = torch.mul(self.wg.reshape(lay.G, -1).index_select(1, m),
                         self.b.reshape(-1).index_select(0, perm)).reshape(-1)
        gv = _spmm(_group_offsets(rowptr, lay.G, E, itype), colT, valT, go)
        return gv.view(lay.G, self.n_cams, lay.hw_total, lay.cg).permute(1, 2, 0, 3)


def _sparse_forward(value: Tensor, locations: Tensor, wgl: Tensor, lay: _Layout, chunk_bytes: int):
    """Forward of the sparse back end -> (out (BN*A, G, Cg), kept, chunks)."""
    dtype = value.dtype
    out = value.new_zeros(lay.BN * lay.A, lay.G, lay.cg)
    kept = _kept_points(locations, lay, dtype)
    chunks = _kept_chunks(kept, lay, chunk_bytes, value.element_size())
    for ch in chunks:                               # loop over memory chunks
        if ch.k1 == ch.k0:
            continue                                # no point of these rows touches an image
        ce = _KeptEntries(ch, kept, locations, wgl, lay, dtype)
        V = value[ch.n0:ch.n1].reshape(-1, lay.cg)
        crow, col, _ = ce.csr(lay)
        o = _spmm(crow, col, ce.vals.view(-1), V)                                  # (G*q, Cg)
        out[ch.r0:ch.r1] = o.view(lay.G, ce.q, lay.cg).transpose(0, 1)
    return out, kept, chunks


def _sparse_backward(grad_out: Tensor, value: Tensor, locations: Tensor, weights: Tensor, lay: _Layout,
                     kept: Tensor, chunks: list[_KeptChunk], need_v: bool, need_l: bool, need_w: bool):
    """Backward of the sparse back end: zero gradients everywhere but at the kept points."""
    dtype = value.dtype
    nq = lay.BN * lay.A
    go_all = grad_out.to(dtype).reshape(nq, lay.G, lay.cg)
    gv = torch.zeros_like(value) if need_v else None
    gl = locations.new_zeros(nq * lay.P, 2, dtype=dtype) if need_l else None
    gw = weights.new_zeros(lay.G, nq * lay.L * lay.P, dtype=dtype) if need_w else None
    wgl = _group_major(weights, lay)
    for ch in chunks:                               # loop over memory chunks
        if ch.k1 == ch.k0:
            continue
        ce = _KeptEntries(ch, kept, locations, wgl, lay, dtype)
        go = go_all[ch.r0:ch.r1].transpose(0, 1).reshape(lay.G * ce.q, lay.cg)       # rows (group, query)
        if need_v:           # before the in-place entry gradient, which overwrites ce.vals
            gv_c = ce.value_grad(go, lay)
            gv[ch.n0:ch.n1].view(gv_c.shape).add_(gv_c)
        if need_l or need_w:
            V = value[ch.n0:ch.n1].reshape(-1, lay.cg)
            crow, col, size = ce.csr(lay)
            ge = _sparse_entry_grad_(go, V, _csr(crow, col, ce.vals.view(-1), size))
            ge = ge.view(lay.G, ce.K, 4, lay.L)
            if need_w:
                gw.index_copy_(1, ce.widx.reshape(-1), (ge * ce.b.unsqueeze(0)).sum(2).reshape(lay.G, -1))
            if need_l:
                gb = (ge * ce.wg.unsqueeze(2)).sum(0)                                  # (K, 4, L)
                gl.index_copy_(0, ce.pts, _location_grad(gb.unsqueeze(-1), ce.loc, ce.aux).view(ce.K, 2))
    return gv, gl, gw


def _sparse_entry_grad_(go: Tensor, V: Tensor, S: Tensor) -> Tensor:
    """Per-entry gradient ``go[row] . V[col]`` (sampled dense-dense product) written IN PLACE into
    the values of ``S``; returns them flat."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.sampled_addmm(S, go, V.t(), beta=0.0, alpha=1.0, out=S).values()


# ----------------------------------------------------------------------------------------------
# autograd Function
# ----------------------------------------------------------------------------------------------

def _resolve_backend(backend: str, value: Tensor) -> str:
    if backend not in SAMPLE_BACKENDS:
        raise ValueError(f"deformable_sample_fused: backend must be one of {SAMPLE_BACKENDS}, got {backend!r}")
    sparse_ok = value.device.type == "cpu" and value.dtype in (torch.float32, torch.float64)
    if backend == "auto":
        return "sparse" if sparse_ok else "gather"
    if backend == "sparse" and not sparse_ok:
        raise ValueError("deformable_sample_fused: backend 'sparse' needs a float32/float64 CPU tensor, "
                         f"got {value.dtype} on {value.device}")
    return backend


def _bytes_per_row(lay: _Layout, itemsize: int) -> int:
    """Gather back end: size of the gathered corners of one query row."""
    return lay.k * lay.C * itemsize


class DeformableSampleFunction(torch.autograd.Function):
    """Autograd Function ``(value, locations, weights) -> (BN, A, C)`` with a hand-written backward.

    ``apply(value, locations, weights, lay, backend, chunk_bytes)``; call
    :func:`deformable_sample_fused` instead. Only the three inputs are saved for backward; the
    corner entries are recomputed chunk by chunk (cheap next to the products).
    """

    @staticmethod
    def forward(ctx, value: Tensor, locations: Tensor, weights: Tensor, lay: _Layout, backend: str,
                chunk_bytes: int) -> Tensor:
        dtype = value.dtype
        value = value.contiguous()
        wgl = _group_major(weights, lay)
        ctx.lay, ctx.backend = lay, backend
        ctx.save_for_backward(value, locations, weights)
        if backend == "sparse":
            out, ctx.kept, ctx.chunks = _sparse_forward(value, locations, wgl, lay, chunk_bytes)
            return out.view(lay.BN, lay.A, lay.C)
        nq = lay.BN * lay.A
        out = value.new_empty(nq, lay.G, lay.cg)
        chunks = _row_chunks(lay, _bytes_per_row(lay, value.element_size()), chunk_bytes)
        for ch in chunks:                               # loop over memory chunks
            ce = _ChunkEntries(ch, locations, wgl, lay, dtype)
            vrows = value[ch.n0:ch.n1].reshape(-1, lay.G, lay.cg)
            gath = vrows.index_select(0, ce.key.reshape(-1)).view(ce.q, lay.k, lay.G, lay.cg)
            w = ce.vals.view(lay.G, ce.q, lay.k).permute(1, 2, 0).unsqueeze(-1)  # (q, K, G, 1)
            out[ch.r0:ch.r1] = (gath * w).sum(1)
        ctx.chunks = chunks
        return out.view(lay.BN, lay.A, lay.C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        value, locations, weights = ctx.saved_tensors
        lay: _Layout = ctx.lay
        need_v, need_l, need_w = ctx.needs_input_grad[:3]
        if ctx.backend == "sparse":
            gv, gl, gw = _sparse_backward(grad_out, value, locations, weights, lay, ctx.kept, ctx.chunks,
                                          need_v, need_l, need_w)
        else:
            gv, gl, gw = _gather_backward(grad_out, value, locations, weights, lay, ctx.chunks,
                                          need_v, need_l, need_w)
        return (gv,
                gl.view(locations.shape).to(locations.dtype) if need_l else None,
                gw.view(lay.G, lay.BN, lay.A, lay.L, lay.P).permute(1, 2, 0, 3, 4).to(weights.dtype)
                if need_w else None,
                None, None, None)


def _gather_backward(grad_out: Tensor, value: Tensor, locations: Tensor, weights: Tensor, lay: _Layout,
                     chunks: list[_Chunk], need_v: bool, need_l: bool, need_w: bool):
    """Backward of the gather back end (dense ``index_select`` / ``index_add_`` per chunk)."""
    dtype = value.dtype
    nq = lay.BN * lay.A
    go_all = grad_out.to(dtype).reshape(nq, lay.G, lay.cg)
    gv = torch.empty_like(value) if need_v else None
    gl = locations.new_empty(nq, lay.P, 2, dtype=dtype) if need_l else None
    gw = weights.new_empty(lay.G, nq, lay.L, lay.P, dtype=dtype) if need_w else None
    wgl = _group_major(weights, lay)
    for ch in chunks:                               # loop over memory chunks
        ce = _ChunkEntries(ch, locations, wgl, lay, dtype)
        go_q = go_all[ch.r0:ch.r1]                                                  # (q, G, Cg)
        vrows = value[ch.n0:ch.n1].reshape(-1, lay.G, lay.cg)
        idx = ce.key.reshape(-1)
        ge = None
        if need_l or need_w:
            gath = vrows.index_select(0, idx).view(ce.q, lay.k, lay.G, lay.cg)
            ge = (gath * go_q.unsqueeze(1)).sum(-1).permute(2, 0, 1).reshape(lay.G, ce.q, 4, lay.L, lay.P)
        if need_v:
            src = ce.vals.view(lay.G, ce.q, lay.k).permute(1, 2, 0).unsqueeze(-1) * go_q.unsqueeze(1)
            gv_c = torch.zeros_like(vrows).index_add_(0, idx, src.reshape(-1, lay.G, lay.cg))
            dst = gv[ch.n0:ch.n1].view(gv_c.shape)
            if ch.first:
                dst.copy_(gv_c)
            else:
                dst += gv_c
        if need_w:
            torch.sum(ge * ce.b, dim=2, out=gw[:, ch.r0:ch.r1])                           # (G, q, L, P)
        if need_l:
            gb = (ge * ce.wg.unsqueeze(2)).sum(0)                                         # (q, 4, L, P)
            gl[ch.r0:ch.r1] = _location_grad(gb, ce.loc, ce.aux)
    return gv, gl, gw


def _default_chunk_bytes(backend: str, device: torch.device) -> int:
    if backend == "sparse":
        return _SPARSE_CHUNK_BYTES
    return _GATHER_CHUNK_BYTES if device.type == "cpu" else 4 * _GATHER_CHUNK_BYTES


def deformable_sample_fused(value: Tensor, spatial_shapes: Sequence[tuple[int, int]] | Tensor,
                            level_start: Sequence[int] | Tensor, locations: Tensor, weights: Tensor,
                            *, backend: str = "auto", chunk_bytes: int | None = None) -> Tensor:
    """Weighted bilinear sampling of flattened multi-level feature maps (fast, custom backward).

    Drop-in replacement of :func:`raydn.models.deformable.deformable_sample` (same arguments,
    result and gradients up to float rounding).

    Args:
        value: (BN, sum_l H_l*W_l, C) flattened features (BN = batch * cameras), level-major,
            row-major inside a level; channels group-major (group g = channels g*C/G ..).
        spatial_shapes: L pairs (H_l, W_l) (list or (L, 2) long tensor).
        level_start: L start offsets of each level in ``value``.
        locations: (BN, A, P, 2) normalised image coordinates (x, y), 0/1 = image border, shared
            by all groups and levels; values outside (points behind the camera) sample 0.
        weights: (BN, A, G, L, P) attention weights.
        backend: ``"auto"`` (``"sparse"`` for float32/float64 on CPU, ``"gather"`` otherwise),
            ``"sparse"`` or ``"gather"``.
        chunk_bytes: bound of the largest per-chunk temporary (default 16 MiB for ``"sparse"``;
            64 MiB on CPU / 256 MiB elsewhere for ``"gather"``).

    Returns:
        (BN, A, C) in ``value.dtype``: ``sum_l sum_p w[g, l, p] * bilinear(value_l[group g], loc_p)``.
    """
    lay = _layout(value, spatial_shapes, level_start, locations, weights)
    backend = _resolve_backend(backend, value)
    if lay.BN * lay.A == 0:
        return value.new_zeros(lay.BN, lay.A, lay.C) + 0 * weights.sum() + 0 * locations.sum()
    if chunk_bytes is None:
        chunk_bytes = _default_chunk_bytes(backend, value.device)
    return DeformableSampleFunction.apply(value, locations, weights, lay, backend, int(chunk_bytes))
