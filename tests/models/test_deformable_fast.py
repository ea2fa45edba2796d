"""Fused deformable sampling (custom autograd Function) vs the grid_sample reference."""
from __future__ import annotations

import pytest
import torch

from raydn.models.deformable import deformable_sample
from raydn.models.deformable_fast import DeformableSampleFunction, _layout, deformable_sample_fused

SHAPES = [(6, 10), (3, 5), (2, 3)]
STARTS = [0, 60, 75]
HW = 81
# (backend, chunk_bytes): default chunks, several cameras per chunk, parts of one camera per chunk
CONFIGS = [("sparse", None), ("sparse", 4000), ("sparse", 300), ("gather", None), ("gather", 3000)]


def _away_from_pixel_borders(loc: torch.Tensor, margin: float = 2e-3) -> torch.Tensor:
    """Nudge coordinates whose feature-pixel position x*W-0.5 is within ``margin`` of an integer on
    any level (the bilinear weights have a kink there; finite differences would straddle it)."""
    loc = loc.clone()
    for _ in range(100):
        bad = torch.zeros_like(loc, dtype=torch.bool)
        for h, w in SHAPES:
            for c, size in ((0, w), (1, h)):
                pix = loc[..., c] * size - 0.5
                frac = pix - pix.floor()
                bad[..., c] |= (frac < margin) | (frac > 1 - margin)
        if not bad.any():
            return loc
        loc[bad] += 0.0037
    raise AssertionError("could not move the points away from pixel borders")


def _inputs(dtype=torch.float64, BN=3, A=7, G=4, P=5, C=16, seed=0, far=True):
    gen = torch.Generator().manual_seed(seed)
    L = len(SHAPES)
    value = torch.randn(BN, HW, C, generator=gen, dtype=dtype)
    loc = torch.rand(BN, A, P, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.3   # in and out
    if far:  # points "behind the camera": far outside, beyond the [-1, 2] clamp
        loc[:, 0, 0] = torch.tensor([1e4, -3e5], dtype=torch.float64)
        loc[:, 1, 1] = torch.tensor([-1.7, 0.5], dtype=torch.float64)
        loc[:, 2, 2] = torch.tensor([0.4, 2.6], dtype=torch.float64)
    loc = _away_from_pixel_borders(loc).to(dtype)
    w = torch.rand(G, BN, A, L, P, generator=gen, dtype=dtype)    # G-major as in the head
    return value, loc, w.permute(1, 2, 0, 3, 4)


@pytest.mark.parametrize("backend,chunk", CONFIGS)
def test_forward_matches_reference_fp32(backend, chunk):
    value, loc, w = _inputs(torch.float32)
    # also exact borders / pixel centres (kinks do not matter for the value)
    loc[0, 3, :3] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.05, 0.25]])
    ref = deformable_sample(value, SHAPES, STARTS, loc, w)
    out = deformable_sample_fused(value, SHAPES, STARTS, loc, w, backend=backend, chunk_bytes=chunk)
    assert out.shape == ref.shape == (3, 7, 16) and out.dtype == torch.float32
    assert (out - ref).abs().max().item() <= 1e-5
    assert ref.abs().max() > 0.1  # non-trivial
    # a point far outside every image contributes nothing: zero its weights -> same output
    w2 = w.clone()
    w2[:, 0, :, :, 0] = 0.0
    out2 = deformable_sample_fused(value, SHAPES, STARTS, loc, w2, backend=backend, chunk_bytes=chunk)
    assert torch.equal(out2[:, 0], out[:, 0]) or (out2[:, 0] - out[:, 0]).abs().max() < 1e-6


def test_forward_tensor_shapes_and_contiguous_weights():
    value, loc, w = _inputs(torch.float32)
    ref = deformable_sample(value, SHAPES, STARTS, loc, w)
    out = deformable_sample_fused(value, torch.tensor(SHAPES), torch.tensor(STARTS), loc, w.contiguous())
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["sparse", "gather"])
def test_gradcheck_float64(backend):
    value, loc, w = _inputs(torch.float64, BN=2, A=3, G=2, P=3, C=4, seed=1)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    w = w.detach().requires_grad_(True)
    lay = _layout(value, SHAPES, STARTS, loc, w)
    for chunk in (1 << 20, 200):   # one chunk / sub-camera chunks (accumulated value gradient)

        def fn(v, lo, ww, chunk=chunk):
            return DeformableSampleFunction.apply(v, lo, ww, lay, backend, chunk)

        assert torch.autograd.gradcheck(fn, (value, loc, w), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend,chunk", CONFIGS)
def test_gradients_match_reference_autograd(backend, chunk):
    value, loc, w = _inputs(torch.float64, seed=2)
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, w)]
    ref = deformable_sample(*leaves[:1], SHAPES, STARTS, *leaves[1:])
    go = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, leaves, go)
    out = deformable_sample_fused(leaves[0], SHAPES, STARTS, leaves[1], leaves[2], backend=backend,
                                  chunk_bytes=chunk)
    g_out = torch.autograd.grad(out, leaves, go)
    for name, a, b in zip(("value", "locations", "weights"), g_out, g_ref):
        assert a.shape == b.shape, name
        assert b.abs().max() > 1e-3, name          # the check is not vacuous
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    # far-away points get exactly zero location gradient
    assert torch.all(g_out[1][:, 0, 0] == 0) and torch.all(g_out[1][:, 2, 2] == 0)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
def test_partial_requires_grad(needs):
    value, loc, w = _inputs(torch.float64, seed=3)
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((value, loc, w), needs)]
    wanted = [t for t in leaves if t.requires_grad]
    ref = deformable_sample(leaves[0], SHAPES, STARTS, leaves[1], leaves[2])
    go = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, wanted, go)
    g_out = torch.autograd.grad(deformable_sample_fused(leaves[0], SHAPES, STARTS, leaves[1], leaves[2]),
                                wanted, go)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fp32_training_shapes_small_match_reference():
    """fp32 forward + backward at the real level layout / group count, few queries."""
    shapes = [(32, 88), (16, 44), (8, 22), (4, 11)]
    starts = [0, 2816, 3520, 3696]
    gen = torch.Generator().manual_seed(4)
    value = torch.randn(2, 3740, 256, generator=gen, requires_grad=True)
    loc = (torch.rand(2, 20, 13, 2, generator=gen) * 1.4 - 0.2).requires_grad_(True)
    w = torch.softmax(torch.randn(2, 20, 8, 52, generator=gen), -1).view(2, 20, 8, 4, 13).requires_grad_(True)
    ref = deformable_sample(value, shapes, starts, loc, w)
    go = torch.randn(ref.shape, generator=gen)
    g_ref = torch.autograd.grad(ref, (value, loc, w), go)
    out = deformable_sample_fused(value, shapes, starts, loc, w)
    g_out = torch.autograd.grad(out, (value, loc, w), go)
    assert (out - ref).abs().max() <= 1e-5
    for a, b in zip(g_out, g_ref):
        assert ((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_low_precision_dtype_preserved_on_gather_backend():
    value, loc, w = _inputs(torch.float32, seed=5)
    ref = deformable_sample(value, SHAPES, STARTS, loc, w)
    out = deformable_sample_fused(value.bfloat16(), SHAPES, STARTS, loc, w.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_nan_and_empty_inputs_are_safe():
    value, loc, w = _inputs(torch.float32, seed=6, far=False)
    loc[0, 0, 0, 0] = float("nan")
    loc[0, 0, 1] = float("inf")
    out = deformable_sample_fused(value, SHAPES, STARTS, loc, w)
    assert torch.isfinite(out).all()
    empty = deformable_sample_fused(value, SHAPES, STARTS, loc[:, :0], w[:, :0])
    assert empty.shape == (3, 0, 16)


def test_errors():
    value, loc, w = _inputs(torch.float32)
    with pytest.raises(ValueError, match="locations must be"):
        deformable_sample_fused(value, SHAPES, STARTS, loc[:, :, :2], w)
    with pytest.raises(ValueError, match="backend"):
        deformable_sample_fused(value, SHAPES, STARTS, loc, w, backend="cuda_kernel")
    with pytest.raises(ValueError, match="sparse"):
        deformable_sample_fused(value.half(), SHAPES, STARTS, loc, w.half(), backend="sparse")
    with pytest.raises(ValueError, match="levels"):
        deformable_sample_fused(value, SHAPES[:2], STARTS[:2], loc, w)
    with pytest.raises(ValueError, match="exceeds"):
        deformable_sample_fused(value, [(6, 10), (3, 5), (3, 3)], STARTS, loc, w)
