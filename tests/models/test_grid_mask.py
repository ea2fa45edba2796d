"""GridMask (spec §3.2): mode 1 zeroes ~25 %, one mask per call, eval identity, seeded."""
from __future__ import annotations

import torch

from raydn.models.grid_mask import GridMask


def _reference_mask(h, w, d, l, st_h, st_w, mode=1):
    """Literal transliteration of the official numpy loops (rotate=1 -> no rotation)."""
    hh, ww = int(1.5 * h), int(1.5 * w)
    m = torch.ones(hh, ww)
    for i in range(hh // d):
        s = d * i + st_h
        m[s:min(s + l, hh), :] = 0
    for i in range(ww // d):
        s = d * i + st_w
        m[:, s:min(s + l, ww)] = 0
    m = m[(hh - h) // 2:(hh - h) // 2 + h, (ww - w) // 2:(ww - w) // 2 + w]
    return 1 - m if mode == 1 else m


def test_mask_equals_official_construction():
    gm = GridMask(prob=1.0)
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        mask = gm.make_mask(40, 96, generator=g)
        g = torch.Generator().manual_seed(seed)
        torch.rand((), generator=g)
        d = int(torch.randint(2, 40, (), generator=g))
        l = min(max(int(d * 0.5 + 0.5), 1), d - 1)
        st_h = int(torch.randint(d, (), generator=g))
        st_w = int(torch.randint(d, (), generator=g))
        assert torch.equal(mask, _reference_mask(40, 96, d, l, st_h, st_w)), seed


def test_zero_fraction_about_a_quarter():
    gm = GridMask(prob=1.0).train()
    g = torch.Generator().manual_seed(0)
    fr = [1.0 - gm.make_mask(64, 176, generator=g).mean().item() for _ in range(300)]
    mean = sum(fr) / len(fr)
    assert 0.20 < mean < 0.30, mean


def test_same_mask_for_all_images_and_eval_identity():
    gm = GridMask(prob=1.0).train()
    x = torch.randn(2, 6, 3, 32, 48) + 5.0          # strictly non-zero
    y = gm(x, generator=torch.Generator().manual_seed(1))
    zero = y == 0
    assert zero.any() and (~zero).any()
    assert bool((zero == zero[0, 0, 0]).all())       # one (H, W) mask for every image and channel
    assert torch.equal(y[~zero], x[~zero])
    gm.eval()
    assert gm(x) is x


def test_probability_and_determinism():
    gm = GridMask().train()                          # official prob 0.7
    x = torch.ones(2, 3, 16, 24)
    applied = sum(bool((gm(x, generator=torch.Generator().manual_seed(s)) == 0).any()) for s in range(200))
    assert 110 < applied < 170                       # ~ 0.7 * 200
    a = gm(x, generator=torch.Generator().manual_seed(7))
    b = gm(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    torch.manual_seed(11)
    c = gm(x)
    torch.manual_seed(11)
    assert torch.equal(c, gm(x))
