"""Explicit temporal state of the streaming head (the StreamPETR object-query memory).

The model is a pure function ``outputs, state = model(batch, state)``: nothing temporal is kept
in module attributes. The state always has ``memory_len`` (M) rows per batch slot (static shapes
for export); the official code keeps M + K rows after a frame and truncates to M at the next
frame, which is equivalent.

Per row (most recent first):
* ``embedding`` (B, M, C): detached decoder output of a propagated query.
* ``reference_point`` (B, M, 3): its centre in metres in the LiDAR frame of the **current** frame
  after ``pre_update`` / in the **global** frame between frames (as officially).
* ``timestamp`` (B, M, 1) float64: between frames ``-t_insert`` (seconds), after ``pre_update``
  the age ``t_now - t_insert``.
* ``egopose`` (B, M, 4, 4): transform from the LiDAR frame at insertion to the current one
  (global between frames, as officially).
* ``velo`` (B, M, 2): the velocity (m/s) predicted at insertion.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TemporalState:
    embedding: Tensor
    reference_point: Tensor
    timestamp: Tensor
    egopose: Tensor
    velo: Tensor

    @classmethod
    def zeros(cls, batch_size: int, memory_len: int, embed_dims: int,
              device=None, dtype=torch.float32) -> "TemporalState":
        B, M = batch_size, memory_len
        return cls(
            embedding=torch.zeros(B, M, embed_dims, device=device, dtype=dtype),
            reference_point=torch.zeros(B, M, 3, device=device, dtype=dtype),
            timestamp=torch.zeros(B, M, 1, device=device, dtype=torch.float64),
            egopose=torch.zeros(B, M, 4, 4, device=device, dtype=dtype),
            velo=torch.zeros(B, M, 2, device=device, dtype=dtype),
        )

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> "TemporalState":
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def detach(self) -> "TemporalState":
        return TemporalState(**{k: v.detach() for k, v in self.as_dict().items()})

    def to(self, device) -> "TemporalState":
        return TemporalState(**{k: v.to(device) for k, v in self.as_dict().items()})

    def select(self, index) -> "TemporalState":
        idx = torch.as_tensor(index, dtype=torch.long)
        return TemporalState(**{k: v[idx.to(v.device)] for k, v in self.as_dict().items()})
