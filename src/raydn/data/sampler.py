"""Streaming samplers (spec §2.5, §2.6).

:class:`StreamingGroupSampler` — training, re-implementation of the official
``InfiniteGroupEachSampleInBatchSampler``. An infinite stream of permutations of all group
(sub-sequence) ids is drawn with ``torch.randperm`` from one ``torch.Generator`` seeded with ``seed``
(shared by all ranks: the same seed gives the same stream as the official sampler). There are
``S = world_size · B`` global slots; slot ``k = rank · B + i`` takes stream elements ``k, k + S,
k + 2S, ...``. Each slot walks its current group's frames in time order, one per iteration, then
takes its next group. Every iteration yields the ``B`` dataset indices of this rank's slots (use it as
a DataLoader ``batch_sampler``). No two slots ever hold the same stream element, so with
``#groups >= S`` two slots never walk the same group at the same time within one permutation pass.

:class:`SceneOrderSampler` — evaluation: every frame once, in time order, batch 1. For DDP each rank
gets a **contiguous** run of frames as officially (§2.6), but the cut points are moved to the nearest
scene starts (deviation: the official sampler cuts at ``r · ceil(n / world)``, so a scene split across
two ranks loses its history on the second rank). Ranks are padded to equal length by repeating their
last frame; :meth:`SceneOrderSampler.gather` drops the padding and restores dataset order.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from raydn.errors import DataError

__all__ = ["StreamingGroupSampler", "SceneOrderSampler"]


def _groups_of(source) -> list[list[int]]:
    if hasattr(source, "group_indices"):
        return [list(g) for g in source.group_indices()]
    return [list(map(int, g)) for g in source]


class StreamingGroupSampler(Sampler):
    """Infinite batch sampler: ``B`` indices per iteration, each slot walking its own sub-sequence.

    Args:
        groups: a dataset with ``group_indices()`` or a list of groups (lists of dataset indices in
            time order).
        batch_size: samples per rank ``B``.
        num_replicas, rank: DDP world size and this rank (``0 <= rank < num_replicas``).
        seed: seed of the shared group-permutation stream (must be equal on every rank).

    ``state_dict()`` / ``load_state_dict()`` capture the exact position (iterations yielded, groups
    taken and frames left per slot). A DataLoader pre-fetches batches, so the sampler runs ahead of
    training; for an exact resume store the number of *consumed* iterations and call
    :meth:`fast_forward` (or ``load_state_dict(state_dict_at(k))``) on a fresh sampler.
    """

    def __init__(self, groups, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 keyed: bool = False):
        self.groups = _groups_of(groups)
        #: yield ``(index, (global_slot, iteration))`` pairs so the dataset derives the augmentation
        #: randomness from the stream position (not from worker state): exact resume with workers.
        self.keyed = bool(keyed)
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        if any(len(g) == 0 for g in self.groups):
            raise DataError("StreamingGroupSampler: empty sequence group")
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.num_slots = self.batch_size * self.num_replicas
        if len(self.groups) < self.num_slots:
            raise DataError(
                f"StreamingGroupSampler: {len(self.groups)} sequence groups (scenes x seq_split_num) "
                f"are fewer than the {self.num_slots} streaming slots (batch_size {self.batch_size} x "
                f"world size {self.num_replicas}); use more scenes, a larger seq_split_num or fewer slots")
        self.num_frames = sum(len(g) for g in self.groups)
        self._perms: list[list[int]] = []
        self._gen = torch.Generator()
        self._gen.manual_seed(self.seed)
        self._reset_position()

    # ------------------------------------------------------------------ stream
    def _reset_position(self) -> None:
        self.iteration = 0
        self._taken = [0] * self.batch_size
        self._buffers: list[deque] = [deque() for _ in range(self.batch_size)]

    def _stream(self, m: int) -> int:
        """Element ``m`` of the infinite group-id stream (permutations generated lazily, cached)."""
        n = len(self.groups)
        while len(self._perms) <= m // n:
            self._perms.append(torch.randperm(n, generator=self._gen).tolist())
        return self._perms[m // n][m % n]

    def slot_group(self, local_slot: int, j: int) -> int:
        """The ``j``-th group id taken by this rank's ``local_slot``."""
        return self._stream(self.rank * self.batch_size + local_slot + j * self.num_slots)

    def _next_batch(self) -> list[int]:
        batch = []
        for i in range(self.batch_size):
            if not self._buffers[i]:
                g = self.slot_group(i, self._taken[i])
                self._taken[i] += 1
                self._buffers[i] = deque(self.groups[g])
            index = self._buffers[i].popleft()
            batch.append((index, (self.rank * self.batch_size + i, self.iteration)) if self.keyed else index)
        self.iteration += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self._next_batch()

    def __len__(self) -> int:
        """Iterations of one "epoch" ≈ one pass over all frames (official num_iters_per_epoch)."""
        return max(1, self.num_frames // self.num_slots)

    # ------------------------------------------------------------------ resume
    def fast_forward(self, iterations: int) -> None:
        """Reset to the start and advance ``iterations`` batches without yielding them."""
        self._reset_position()
        for _ in range(int(iterations)):
            self._next_batch()

    def state_dict(self) -> dict:
        return {
            "version": 1, "seed": self.seed, "batch_size": self.batch_size,
            "num_replicas": self.num_replicas, "rank": self.rank, "num_groups": len(self.groups),
            "iteration": self.iteration, "taken": list(self._taken),
            "buffers": [list(b) for b in self._buffers],
        }

    def state_dict_at(self, iteration: int) -> dict:
        """State after exactly ``iteration`` batches (e.g. the number consumed by training)."""
        probe = StreamingGroupSampler(self.groups, self.batch_size, self.num_replicas, self.rank, self.seed,
                                      keyed=self.keyed)
        probe.fast_forward(iteration)
        return probe.state_dict()

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "num_replicas", "rank", "num_groups"):
            mine = self.seed if key == "seed" else (len(self.groups) if key == "num_groups" else getattr(self, key))
            if state.get(key) != mine:
                raise DataError(f"StreamingGroupSampler state: '{key}' is {state.get(key)!r} in the "
                                f"checkpoint but {mine!r} here; cannot resume the same stream")
        self.iteration = int(state["iteration"])
        self._taken = [int(t) for t in state["taken"]]
        self._buffers = [deque(int(x) for x in b) for b in state["buffers"]]


class SceneOrderSampler(Sampler):
    """Evaluation order: contiguous, time-ordered frames per rank, cut at scene starts.

    Args:
        scene_starts: a dataset with ``scene_starts()`` and ``__len__`` or a sorted sequence of
            scene-start indices (then ``num_frames`` is required).
        num_replicas, rank: DDP world size and rank.
        pad: pad every rank to the same length (by repeating its last frame) so ranks run in
            lockstep; :meth:`gather` removes the padding.

    Attributes: ``bounds`` (world + 1 cut points), ``indices`` (this rank's list, padded),
    ``num_real`` (its un-padded length), ``starts_mid_scene`` (True where the fallback had to cut
    inside a scene: the rank's first frame must then reset the memory, see ``reset_indices``).
    """

    def __init__(self, scene_starts, num_replicas: int = 1, rank: int = 0, pad: bool = True,
                 num_frames: int | None = None):
        if hasattr(scene_starts, "scene_starts"):
            num_frames = len(scene_starts)
            starts = np.asarray(scene_starts.scene_starts(), dtype=np.int64)
        else:
            if num_frames is None:
                raise ValueError("num_frames is required with an explicit scene_starts list")
            starts = np.asarray(scene_starts, dtype=np.int64)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"invalid num_replicas={num_replicas}, rank={rank}")
        self.num_frames = int(num_frames)
        self.num_replicas, self.rank, self.pad = int(num_replicas), int(rank), bool(pad)
        self.bounds = self.split_points(starts, self.num_frames, self.num_replicas)
        starts_set = set(starts.tolist()) | {0}
        self.rank_starts_mid_scene = [b not in starts_set and b < self.num_frames
                                      for b in self.bounds[:-1]]
        lens = [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        self.max_len = max(lens) if lens else 0
        self.num_real_per_rank = lens
        self.indices = self.rank_indices(self.rank)
        self.num_real = lens[self.rank]
        self.starts_mid_scene = self.rank_starts_mid_scene[self.rank]

    @staticmethod
    def split_points(starts: np.ndarray, n: int, world: int) -> list[int]:
        """Cut points ``0 = b_0 <= ... <= b_world = n``. Each interior cut is the scene start nearest
        to the official cut ``r · ceil(n / world)`` while keeping every rank non-empty; if there are
        fewer scenes than ranks, the official (scene-agnostic) cuts are used."""
        per = math.ceil(n / world) if n else 0
        official = [min(r * per, n) for r in range(world)] + [n]
        cands = np.unique(np.asarray(starts, dtype=np.int64))
        cands = cands[(cands > 0) & (cands < n)]
        if len(cands) < world - 1:
            return official
        bounds = [0]
        for r in range(1, world):
            lo = bounds[-1]
            # leave at least (world - r - 1) later candidates for the remaining cuts
            ok = cands[cands > lo]
            ok = ok[: len(ok) - (world - r - 1)] if world - r - 1 > 0 else ok
            target = r * per
            bounds.append(int(ok[np.argmin(np.abs(ok - target))]))
        return bounds + [n]

    def rank_indices(self, rank: int) -> list[int]:
        a, b = self.bounds[rank], self.bounds[rank + 1]
        idx = list(range(a, b))
        if self.pad and idx and len(idx) < self.max_len:
            idx += [idx[-1]] * (self.max_len - len(idx))
        elif self.pad and not idx and self.max_len:
            idx = [0] * self.max_len  # only possible with n < world; all padding
        return idx

    @property
    def reset_indices(self) -> frozenset:
        """Indices whose ``prev_exists`` must be forced to 0 on this rank (the rank's first frame
        when it starts inside a scene)."""
        return frozenset([self.indices[0]]) if self.starts_mid_scene and self.num_real else frozenset()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def gather(self, per_rank_results: Sequence[Sequence]) -> list:
        """Merge results gathered from all ranks (rank order, each in this sampler's iteration
        order, padding included or not) into one list in dataset order of length ``num_frames``."""
        if len(per_rank_results) != self.num_replicas:
            raise ValueError(f"expected results of {self.num_replicas} ranks, got {len(per_rank_results)}")
        out = []
        for r, res in enumerate(per_rank_results):
            n = self.num_real_per_rank[r]
            if len(res) < n:
                raise ValueError(f"rank {r} returned {len(res)} results, expected at least {n}")
            out.extend(list(res)[:n])
        return out
