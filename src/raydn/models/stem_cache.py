"""Cache of the frozen backbone stem's outputs for training with deterministic inputs.

With a frozen stem (``frozen_stages`` blocks: no gradient, BN statistics fixed) and a training
transform that draws nothing (fixed resize, no crop jitter, no flip, no GridMask -- the demo
preset), the stem's output for a given frame never changes. Recomputing it every step costs
~20 % of a demo training step on CPU, and decoding the JPEGs for it more. :class:`StemCache`
computes it once per training frame (keyed by sample token) and the trainer then feeds the
detector from the cache; the dataset stops decoding images. Results equal the uncached path to
float rounding (the same operations on the same inputs; only the batching differs).

Use: ``raydn train --stem-cache auto|on|off`` (:class:`~raydn.engine.train.TrainOptions`);
``auto`` turns it on exactly when :func:`stem_cache_blocker` finds nothing against it.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from raydn.data.frames import collate_frames


def stem_cache_blocker(model, aug) -> str | None:
    """Why the stem of ``model`` cannot be cached under the training transform ``aug``, or None."""
    bb = model.img_backbone
    if not getattr(bb, "supports_stem_cache", False):
        return f"backbone {model.cfg.backbone.name!r} has no frozen, separable stem"
    if model.grid_mask is not None:
        return "GridMask changes the images every step"
    if aug.training:
        if aug.resize_lim[0] != aug.resize_lim[1]:
            return f"random resize {aug.resize_lim}"
        new_w = int(aug.src_size[1] * aug.resize_lim[0])
        if new_w > aug.final_dim[1]:
            return f"random horizontal crop ({new_w} px resized width > {aug.final_dim[1]} px input)"
        if aug.bot_pct_lim[0] != aug.bot_pct_lim[1]:
            return f"random bottom crop {aug.bot_pct_lim}"
        if aug.rand_flip:
            return "random flip"
    return None


class StemCache:
    """Sample token -> the stem's maps of that frame: a tuple of (N, C_i, h_i, w_i) float32 (the
    FPN taps inside the stem, then its last map; the encoder's memory layout)."""

    def __init__(self):
        self._store: dict[str, tuple[Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, token: str) -> bool:
        return token in self._store

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for maps in self._store.values() for t in maps)

    @torch.no_grad()
    def fill(self, model, dataset, *, frames_per_batch: int = 2, progress: bool = False) -> "StemCache":
        """Compute the stem of every frame of ``dataset`` (its ``load_images`` must be on)."""
        idx = [i for i in range(len(dataset)) if dataset.infos[i]["token"] not in self._store]
        bar = None
        if progress:
            bar = tqdm(total=len(idx), desc="stem cache", dynamic_ncols=True)
        device = next(model.parameters()).device
        for s in range(0, len(idx), frames_per_batch):
            items = [dataset[i] for i in idx[s:s + frames_per_batch]]
            batch = collate_frames(items)
            x = model.prepare_images(batch.images.to(device))
            maps = model.img_backbone.forward_stem(x)  # a tuple of maps
            n = batch.images.shape[1]
            for k, meta in enumerate(batch.meta):
                self._store[meta["sample_token"]] = tuple(m[k * n:(k + 1) * n].clone() for m in maps)
            if bar is not None:
                bar.update(len(items))
        if bar is not None:
            bar.close()
        return self

    def lookup(self, tokens, device=None) -> tuple[Tensor, ...]:
        """Stem maps of the frames ``tokens`` -> a tuple of (B*N, C_i, h_i, w_i), batch order."""
        missing = [t for t in tokens if t not in self._store]
        if missing:
            raise KeyError(f"StemCache: no stem features for sample {missing[0]!r} "
                           f"({len(missing)} of {len(tokens)} missing); fill the cache first")
        entries = [self._store[t] for t in tokens]
        out = tuple(torch.cat(maps, 0) for maps in zip(*entries))  # the detector sets the memory layout
        return tuple(o.to(device) for o in out) if device is not None else out
