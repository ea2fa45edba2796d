"""Comparing ranked outputs with a reference computed on another CPU: rows ordered by a score (decoded
boxes, memory rows kept by top-k) may swap places where two scores are closer than the float rounding
between machines (observed here: decoded scores 2e-8 apart, our error 3e-8). Exact positional equality
would then test the CPU, not the code. :func:`align_rows` pairs every reference row with the nearest of
our rows within a few positions (identity wherever the order is clear), so the values can still be
compared row by row at the usual tolerances."""
from __future__ import annotations

import torch


def align_rows(ours: torch.Tensor, ref: torch.Tensor, max_shift: int = 3) -> torch.Tensor:
    """Permutation ``p`` (LongTensor) such that ``ours[p]`` lines up with ``ref`` row by row: each reference
    row takes the unused row of ``ours`` within ``max_shift`` positions that is nearest (L-inf over the
    row's values), the same position on ties. ``ours``, ``ref``: (N, ...) with the same shape."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    n = ours.shape[0]
    a, b = ours.reshape(n, -1).double(), ref.reshape(n, -1).double()
    used = torch.zeros(n, dtype=torch.bool)
    perm = torch.empty(n, dtype=torch.long)
    for i in range(n):
        lo, hi = max(0, i - max_shift), min(n, i + max_shift + 1)
        cand = [j for j in range(lo, hi) if not used[j]]
        d = torch.stack([(a[j] - b[i]).abs().max() for j in cand])
        j = cand[int(torch.argmin(d))] if not (i in cand and d[cand.index(i)] <= d.min()) else i
        used[j] = True
        perm[i] = j
    return perm


def assert_swaps_only_among_ties(perm: torch.Tensor, ref_scores: torch.Tensor, tol: float) -> None:
    """Rows that moved must have reference scores within ``tol`` of the row they took the place of."""
    moved = (perm != torch.arange(len(perm))).nonzero().flatten()
    for i in moved.tolist():
        gap = (ref_scores[i].double() - ref_scores[perm[i]].double()).abs().item()
        assert gap <= tol, f"row {i} swapped with row {int(perm[i])}: reference scores {gap:.3g} apart (> {tol})"
