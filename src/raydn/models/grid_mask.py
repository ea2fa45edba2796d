"""GridMask augmentation as used by the official detector (spec §3.2 and §13 item 11).

One mask per call, shared by every image of the call (all B*N cameras), applied to the
**normalised** images (masked pixels become 0, i.e. the mean colour). Draws, in order, from the
torch RNG (or ``generator``)::

    u ~ U(0, 1); skip if u > prob
    d ~ randint(2, H)                         (H = image height)
    l = min(max(int(ratio * d + 0.5), 1), d - 1)
    st_h, st_w ~ randint(d)

On a (int(1.5 H), int(1.5 W)) canvas, ``hh // d`` horizontal stripes [d*i + st_h, d*i + st_h + l)
and ``ww // d`` vertical stripes are marked, the centre H x W crop is taken (no rotation:
official ``rotate=1`` means ``randint(1) == 0``). Mode 0 zeroes the stripes; mode 1 (official)
zeroes the squares **between** the stripes (~25 % of the area for ratio 0.5). No-op in eval mode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GridMask(nn.Module):
    """Args (official values as defaults): use_h, use_w (stripes along each axis), ratio (stripe
    width / period), mode (1 = keep stripes, zero the rest), prob (probability of applying)."""

    def __init__(self, use_h: bool = True, use_w: bool = True, ratio: float = 0.5, mode: int = 1,
                 prob: float = 0.7):
        super().__init__()
        if mode not in (0, 1):
            raise ValueError(f"GridMask: mode must be 0 or 1, got {mode}")
        self.use_h = use_h
        self.use_w = use_w
        self.ratio = ratio
        self.mode = mode
        self.prob = prob

    @staticmethod
    def _stripes(length: int, d: int, start: int, width: int, device) -> Tensor:
        """(length,) bool: index r is in a stripe d*i + start <= r < d*i + start + width for
        i in [0, length // d) (the official loop bounds)."""
        k = torch.arange(length, device=device) - start
        return (k >= 0) & (torch.div(k, d, rounding_mode="floor") < length // d) & (k % d < width)

    def make_mask(self, height: int, width: int, device=None, dtype=torch.float32,
                  generator: torch.Generator | None = None) -> Tensor | None:
        """Draw one mask (H, W) with 1 = keep, 0 = zeroed, or None when the draw skips it."""
        gdev = generator.device if generator is not None else "cpu"
        if float(torch.rand((), generator=generator, device=gdev)) > self.prob:
            return None
        if height <= 2:
            raise ValueError(f"GridMask: image height must be > 2, got {height}")
        hh, ww = int(1.5 * height), int(1.5 * width)
        d = int(torch.randint(2, height, (), generator=generator, device=gdev))
        l = min(max(int(d * self.ratio + 0.5), 1), d - 1)
        st_h = int(torch.randint(d, (), generator=generator, device=gdev))
        st_w = int(torch.randint(d, (), generator=generator, device=gdev))
        rows = self._stripes(hh, d, st_h, l, device) if self.use_h else torch.zeros(hh, dtype=torch.bool, device=device)
        cols = self._stripes(ww, d, st_w, l, device) if self.use_w else torch.zeros(ww, dtype=torch.bool, device=device)
        oh, ow = (hh - height) // 2, (ww - width) // 2
        stripe = rows[oh:oh + height, None] | cols[None, ow:ow + width]       # (H, W)
        keep = stripe if self.mode == 1 else ~stripe
        return keep.to(dtype)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x (..., H, W) normalised images (e.g. (B*N, 3, H, W)) -> same shape; identity in eval
        mode or when the probability draw skips."""
        if not self.training:
            return x
        mask = self.make_mask(x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype,
                              generator=generator)
        if mask is None:
            return x
        return x * mask
