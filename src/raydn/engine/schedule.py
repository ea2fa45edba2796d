"""The training schedule, stated for a total batch size.

The official configs hard-code ``num_gpus`` / ``batch_size`` / ``num_iters_per_epoch`` and the lr
("bs 8: 2e-4, bs 16: 4e-4"); changing the number of GPUs silently changes the schedule
(StreamPETR #82, RayDN #19). Here the recipe says *what* to train (epochs over the data at a
reference total batch and lr) and :func:`derive_schedule` turns it into iterations for the actual
``world_size x batch_per_gpu``, scaling the lr linearly with the total batch and keeping the number
of warm-up *samples* fixed. The run prints what it derived.

LR curve (mmcv ``CosineAnnealingLrUpdaterHook`` by iteration with linear warm-up, spec §10)::

    lr(i) = base * (min_ratio + (1 - min_ratio) * (1 + cos(pi * i / I)) / 2)
    lr(i) *= 1 - (1 - i / W) * (1 - warmup_ratio)     for i < W
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Schedule:
    world_size: int
    batch_per_gpu: int
    total_batch_size: int
    iters_per_epoch: int
    max_iters: int
    warmup_iters: int
    lr: float
    reference_total_batch: int
    reference_lr: float

    def describe(self) -> str:
        return (f"schedule: {self.world_size} process(es) x {self.batch_per_gpu} = total batch "
                f"{self.total_batch_size} (recipe: {self.reference_total_batch} @ lr "
                f"{self.reference_lr:g}) -> lr {self.lr:g}, {self.iters_per_epoch} it/epoch, "
                f"{self.max_iters} iterations, warm-up {self.warmup_iters}")

    def as_dict(self) -> dict:
        return asdict(self)


def derive_schedule(*, num_train_frames: int, world_size: int, batch_per_gpu: int,
                    reference_total_batch: int, reference_lr: float, epochs: float,
                    reference_warmup_iters: int, max_iters: int | None = None) -> Schedule:
    """Iterations and lr for the actual total batch (see module docstring).

    ``iters_per_epoch = num_train_frames // total`` as the official configs
    (28130 // 16 = 1758); ``max_iters`` overrides ``epochs`` when given."""
    if world_size < 1 or batch_per_gpu < 1:
        raise ValueError(f"world_size and batch_per_gpu must be >= 1, got {world_size}, {batch_per_gpu}")
    total = world_size * batch_per_gpu
    iters_per_epoch = max(1, num_train_frames // total)
    iters = int(max_iters) if max_iters is not None else max(1, int(round(epochs * iters_per_epoch)))
    lr = reference_lr * total / reference_total_batch
    warmup = int(round(reference_warmup_iters * reference_total_batch / total))
    warmup = min(warmup, max(0, iters - 1))
    return Schedule(world_size=world_size, batch_per_gpu=batch_per_gpu, total_batch_size=total,
                    iters_per_epoch=iters_per_epoch, max_iters=iters, warmup_iters=warmup, lr=lr,
                    reference_total_batch=reference_total_batch, reference_lr=reference_lr)


def lr_factor(iteration: int, max_iters: int, warmup_iters: int, warmup_ratio: float,
              min_lr_ratio: float) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based), as the official mmcv hooks."""
    progress = min(iteration, max_iters) / max(1, max_iters)
    factor = min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
    if iteration < warmup_iters:
        factor *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return factor
