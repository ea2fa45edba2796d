"""Batching into :class:`~raydn.core.batch.FrameBatch` and DataLoader builders.

* :func:`collate_frames` (from :mod:`raydn.data.frames`) stacks dataset items
  (:class:`~raydn.data.frames.FrameInputs`) into a ``FrameBatch``.
* :func:`build_train_loader` — :class:`~raydn.data.sampler.StreamingGroupSampler` as batch sampler,
  workers seeded by :class:`WorkerSeeder`.
* :func:`build_eval_loader` — :class:`~raydn.data.sampler.SceneOrderSampler`, batch 1, first frame
  of a rank that starts inside a scene gets ``prev_exists = 0``.

Worker seeding: each worker's dataset copy gets a ``numpy.random.Generator`` seeded with
``(seed, rank, worker_id)`` (augmentation draws), and the global ``numpy`` / ``random`` seeds are set
to the official ``num_workers · rank + worker_id + seed``. With ``num_workers=0`` the main-process
dataset uses ``(seed, rank, 0)``. Given the seed, rank and ``num_workers`` the stream of batches and
augmentations is deterministic.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from raydn.data.frames import FrameInputs, collate_frames
from raydn.data.sampler import SceneOrderSampler, StreamingGroupSampler

__all__ = ["collate_frames", "build_train_loader", "build_eval_loader", "WorkerSeeder",
           "ForcedResetDataset"]


class WorkerSeeder:
    """Picklable ``worker_init_fn``: reseeds the worker's dataset generator from
    ``(seed, rank, worker_id)`` and the global numpy/random seeds (official formula)."""

    def __init__(self, seed: int, rank: int, num_workers: int):
        self.seed, self.rank, self.num_workers = int(seed), int(rank), int(num_workers)

    def __call__(self, worker_id: int) -> None:
        info = torch.utils.data.get_worker_info()
        ds = info.dataset if info is not None else None
        if ds is not None and hasattr(ds, "reseed"):
            ds.reseed(self.seed, self.rank, worker_id)
        s = (self.num_workers * self.rank + worker_id + self.seed) % (2 ** 32)
        np.random.seed(s)
        random.seed(s)


class ForcedResetDataset(Dataset):
    """View of a dataset that sets ``prev_exists = 0`` for the given indices (eval rank starts)."""

    def __init__(self, dataset: Dataset, reset_indices):
        self.dataset = dataset
        self.reset_indices = frozenset(int(i) for i in reset_indices)

    def __len__(self) -> int:
        return len(self.dataset)

    def reseed(self, *args) -> None:
        if hasattr(self.dataset, "reseed"):
            self.dataset.reseed(*args)

    def __getitem__(self, index: int) -> FrameInputs:
        item = self.dataset[index]
        return item.with_reset() if int(index) in self.reset_indices else item


def _loader_kwargs(num_workers: int, pin_memory: bool, persistent_workers: bool,
                   prefetch_factor: int | None, seeder: WorkerSeeder) -> dict:
    # A private generator: creating a loader iterator then draws its base seed from it and leaves
    # the global torch RNG (denoising, dropout, GridMask) untouched - needed for exact resume.
    gen = torch.Generator()
    gen.manual_seed(int(seeder.seed) * 1000003 + int(seeder.rank))
    kw = dict(num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_frames,
              worker_init_fn=seeder, generator=gen)
    if num_workers > 0:
        kw["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    return kw


def build_train_loader(dataset, batch_size: int, *, num_workers: int = 4, seed: int = 0,
                       rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                       persistent_workers: bool = True, prefetch_factor: int | None = None,
                       sampler_state: dict | None = None, start_iteration: int | None = None,
                       keyed: bool = False) -> DataLoader:
    """Infinite streaming training loader yielding ``FrameBatch`` with ``batch_size`` slots.

    The returned loader's ``batch_sampler`` is the :class:`StreamingGroupSampler`; resume with
    ``start_iteration`` (iterations already consumed) or an exact ``sampler_state``."""
    sampler = StreamingGroupSampler(dataset, batch_size, num_replicas=world_size, rank=rank, seed=seed,
                                    keyed=keyed)
    if sampler_state is not None:
        sampler.load_state_dict(sampler_state)
    elif start_iteration:
        sampler.fast_forward(start_iteration)
    dataset.reseed(seed, rank, 0)
    return DataLoader(dataset, batch_sampler=sampler,
                      **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor,
                                       WorkerSeeder(seed, rank, num_workers)))


def build_eval_loader(dataset, *, num_workers: int = 4, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False, persistent_workers: bool = False,
                      prefetch_factor: int | None = None, pad: bool = True) -> DataLoader:
    """Sequential evaluation loader (batch 1, scene order, DDP chunks cut at scene starts).

    ``loader.sampler`` is the :class:`SceneOrderSampler`; use ``loader.sampler.gather`` to merge the
    per-rank results back into dataset order."""
    sampler = SceneOrderSampler(dataset, num_replicas=world_size, rank=rank, pad=pad)
    ds = ForcedResetDataset(dataset, sampler.reset_indices) if sampler.reset_indices else dataset
    return DataLoader(ds, batch_size=1, sampler=sampler, shuffle=False,
                      **_loader_kwargs(num_workers, pin_memory, persistent_workers, prefetch_factor,
                                       WorkerSeeder(0, rank, num_workers)))
