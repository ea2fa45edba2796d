"""The StreamPETR object-query memory update as pure functions on :class:`TemporalState` (spec §5.4,
§5.5).

One frame of the head uses the memory in three steps:

1. :func:`pre_update` (official ``pre_update_memory``): the state from the previous frame (global
   frame, ``-t_insert`` timestamps) is moved into the current LiDAR frame, reset for slots whose
   sequence starts (``prev_exists == 0``), and the first P rows of reset slots are seeded with the
   frozen pseudo reference points -> a :class:`Memory` (current LiDAR frame, ages in seconds);
2. :func:`memory_motion` / :func:`current_motion` / :func:`propagate`: the memory part of the
   official ``temporal_alignment`` (motion vectors fed to the head's ego-pose MLNs, and the P
   propagated rows moved from the self-attention keys into the queries);
3. :func:`post_update` (official ``post_update_memory``): the top-K queries of the last decoder layer
   are prepended (detached) and everything is moved back into the global frame -> the next
   :class:`TemporalState` (always M rows: static shapes, see :mod:`raydn.core.state`).

No module parameters here: the functions take tensors and ints, so the head, an export wrapper or a
test can call them directly. Timestamps stay float64 throughout (seconds; absolute nuScenes times
are ~1.5e9 s, far beyond float32's resolution); everything else is in the head's float dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raydn.geometry import fp32_geometry, nerf_positional_encoding
from raydn.core.state import TemporalState

__all__ = ["Memory", "transform_homogeneous", "pre_update", "post_update", "post_update_selected",
           "memory_motion", "current_motion", "propagate"]


def transform_homogeneous(points: Tensor, matrix: Tensor) -> Tensor:
    """points (B, L, 3), matrix (B, 4, 4) -> (B, L, 3) as ``(T @ [p; 1])[:3]`` with full 4x4
    products (the official ``transform_reference_points``; memory points are global
    coordinates ~1e3 m, so the exact operation order keeps float32 parity at the ulp level)."""
    ph = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)
    return (matrix.unsqueeze(1) @ ph.unsqueeze(-1)).squeeze(-1)[..., :3]


@dataclass
class Memory:
    """The memory inside one forward, after :func:`pre_update` (M rows, most recent first)."""
    embedding: Tensor        # (B, M, C)
    reference_point: Tensor  # (B, M, 3) metres, current LiDAR frame
    timestamp: Tensor        # (B, M, 1) float64 age t_now - t_insert (seconds)
    egopose: Tensor          # (B, M, 4, 4) LiDAR frame at insertion -> current LiDAR frame
    velo: Tensor             # (B, M, 2) m/s, predicted at insertion


def pre_update(state: TemporalState | None, prev_exists: Tensor, ego_pose_inv: Tensor,
               timestamp: Tensor, *, memory_len: int, embed_dims: int,
               pseudo_reference: Tensor | None = None, dtype: torch.dtype = torch.float32,
               device=None) -> Memory:
    """Official ``pre_update_memory``.

    Args:
        state: the previous frame's :class:`TemporalState` (global frame), or None: the official
            "memory is None" (fresh zeros, no transform applied).
        prev_exists: (B,) 1 = the slot continues its sequence, 0 = reset its memory.
        ego_pose_inv: (B, 4, 4) global -> current LiDAR frame.
        timestamp: (B,) float64 seconds of the current frame.
        memory_len, embed_dims: M and C.
        pseudo_reference: (P, 3) metres, the frozen pseudo reference points of the first P rows
            of reset slots (already denormalised), or None (P = 0).
        dtype, device: of the float tensors (timestamps are float64).

    Returns: :class:`Memory` in the current LiDAR frame with ages ``t_now - t_insert``.
    Runs in float32 (``dtype``) even under autocast (:func:`raydn.geometry.fp32_geometry`).
    """
    device = prev_exists.device if device is None else device
    with fp32_geometry(device):
        return _pre_update(state, prev_exists, ego_pose_inv, timestamp, memory_len, embed_dims,
                           pseudo_reference, dtype, device)


def _pre_update(state, prev_exists, ego_pose_inv, timestamp, memory_len, embed_dims,
                pseudo_reference, dtype, device) -> Memory:
    B, M, C = prev_exists.shape[0], memory_len, embed_dims
    x = prev_exists.to(device=device, dtype=dtype).reshape(B)
    if state is None:  # official "memory is None": zeros, no transform
        mem = Memory(x.new_zeros(B, M, C), x.new_zeros(B, M, 3),
                     torch.zeros(B, M, 1, dtype=torch.float64, device=device),
                     x.new_zeros(B, M, 4, 4), x.new_zeros(B, M, 2))
    else:
        if state.embedding.shape[:2] != (B, M):
            raise ValueError(f"TemporalState.embedding: expected (B={B}, M={M}, ...), "
                             f"got {tuple(state.embedding.shape)}")
        inv = ego_pose_inv.to(device=device, dtype=dtype)
        t_now = timestamp.to(device=device, dtype=torch.float64).view(B, 1, 1)
        xd = x.to(torch.float64).view(B, 1, 1)
        ts = (state.timestamp.to(torch.float64) + t_now) * xd
        egopose = (inv.unsqueeze(1) @ state.egopose.to(dtype)) * x.view(B, 1, 1, 1)
        ref = transform_homogeneous(state.reference_point.to(dtype), inv) * x.view(B, 1, 1)
        mem = Memory(state.embedding.to(dtype) * x.view(B, 1, 1), ref, ts, egopose,
                     state.velo.to(dtype) * x.view(B, 1, 1))
    if pseudo_reference is not None and pseudo_reference.shape[0] > 0:
        P = int(pseudo_reference.shape[0])
        r = (1 - x).view(B, 1, 1)
        ref = torch.cat([mem.reference_point[:, :P] + r * pseudo_reference.to(dtype),
                         mem.reference_point[:, P:]], 1)
        eye = torch.eye(4, device=device, dtype=dtype)
        ego = torch.cat([mem.egopose[:, :P] + r.unsqueeze(-1) * eye, mem.egopose[:, P:]], 1)
        mem = Memory(mem.embedding, ref, mem.timestamp, ego, mem.velo)
    return mem


def post_update(mem: Memory, ego_pose: Tensor, timestamp: Tensor, cls_last: Tensor,
                bbox_last: Tensor, dec_last: Tensor, topk: int) -> TemporalState:
    """Official ``post_update_memory`` on the non-denoising queries of the last decoder layer.

    Args:
        mem: this frame's :class:`Memory` (from :func:`pre_update`).
        ego_pose: (B, 4, 4) current LiDAR frame -> global.
        timestamp: (B,) float64 seconds of the current frame.
        cls_last: (B, Q+P, classes) logits; bbox_last: (B, Q+P, 10) (centre in metres, current
            LiDAR frame, velocity last); dec_last: (B, Q+P, C) decoder output.
        topk: K, the number of queries written into the memory.

    Returns: the next :class:`TemporalState` (global frame, ``-t_insert``; M rows, the K new ones
    first; all detached; float32 / float64 timestamps even under autocast).
    """
    return post_update_selected(mem, ego_pose, timestamp, cls_last, bbox_last, dec_last, topk)[0]


def post_update_selected(mem: Memory, ego_pose: Tensor, timestamp: Tensor, cls_last: Tensor,
                         bbox_last: Tensor, dec_last: Tensor, topk: int) -> tuple[TemporalState, Tensor]:
    """:func:`post_update` that also returns the selection it made: ``(state, index)``, index
    (B, K) int64 = the queries (rows of ``cls_last``) written into the first K memory rows, in
    row order (the query ids follow it: :mod:`raydn.engine.tracking`)."""
    with fp32_geometry(bbox_last.device):
        return _post_update(mem, ego_pose, timestamp, _atleast_fp32(cls_last.detach()),
                            _atleast_fp32(bbox_last.detach()), _atleast_fp32(dec_last.detach()), topk)


def _atleast_fp32(t: Tensor) -> Tensor:
    """fp16 / bf16 (autocast outputs) -> float32; float32 / float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _post_update(mem: Memory, ego_pose, timestamp, cls_last, bbox_last, dec_last, topk
                 ) -> tuple[TemporalState, Tensor]:
    B, M = cls_last.shape[0], mem.embedding.shape[1]
    K = topk
    score = cls_last.detach().sigmoid().amax(dim=-1)                          # (B, Q+P)
    idx = torch.topk(score, K, dim=1).indices                                  # (B, K)
    rec_ref = torch.gather(bbox_last[..., :3].detach(), 1, idx[..., None].expand(-1, -1, 3))
    rec_velo = torch.gather(bbox_last[..., -2:].detach(), 1, idx[..., None].expand(-1, -1, 2))
    rec_emb = torch.gather(dec_last.detach(), 1, idx[..., None].expand(-1, -1, dec_last.shape[-1]))
    eye = torch.eye(4, device=bbox_last.device, dtype=bbox_last.dtype).expand(B, K, 4, 4)
    ego = ego_pose.to(device=bbox_last.device, dtype=bbox_last.dtype)
    t_now = timestamp.to(device=bbox_last.device, dtype=torch.float64).view(B, 1, 1)
    ref = torch.cat([rec_ref, mem.reference_point.detach()], 1)[:, :M]
    return TemporalState(
        embedding=torch.cat([rec_emb, mem.embedding.detach()], 1)[:, :M],
        reference_point=transform_homogeneous(ref, ego),
        timestamp=torch.cat([torch.zeros(B, K, 1, dtype=torch.float64, device=ref.device),
                             mem.timestamp], 1)[:, :M] - t_now,
        egopose=ego.unsqueeze(1) @ torch.cat([eye, mem.egopose.detach()], 1)[:, :M],
        velo=torch.cat([rec_velo, mem.velo.detach()], 1)[:, :M],
    ), idx


def memory_motion(mem: Memory) -> Tensor:
    """NeRF-encoded motion of every memory row, (B, M, 180): ``[velo (2), age (1, seconds, cast
    to the float dtype), egopose[:3, :] (12)]`` (official ``temporal_alignment``)."""
    m = torch.cat([mem.velo, mem.timestamp.to(mem.velo.dtype), mem.egopose[..., :3, :].flatten(-2)],
                  dim=-1)
    return nerf_positional_encoding(m)


def current_motion(ref: Tensor) -> Tensor:
    """NeRF-encoded motion of the current queries (zero velocity and age, identity pose),
    ref (B, Q, 3) -> (B, Q, 180)."""
    eye = torch.eye(4, device=ref.device, dtype=ref.dtype)[:3].flatten()
    m = torch.cat([ref.new_zeros(3), eye]).expand(*ref.shape[:2], 15)
    return nerf_positional_encoding(m)


def propagate(tgt: Tensor, query_pos: Tensor, ref: Tensor, temp_memory: Tensor, temp_pos: Tensor,
              temp_ref: Tensor, num_propagated: int):
    """Move the first P memory rows from the self-attention keys into the queries.

    tgt/query_pos (B, Q, C), ref (B, Q, 3) normalised; temp_memory/temp_pos (B, M, C), temp_ref
    (B, M, 3) normalised -> tgt/query_pos/ref with Q + P rows, temp_memory/temp_pos with M - P."""
    P = num_propagated
    if P <= 0:
        return tgt, query_pos, ref, temp_memory, temp_pos
    return (torch.cat([tgt, temp_memory[:, :P]], dim=1),
            torch.cat([query_pos, temp_pos[:, :P]], dim=1),
            torch.cat([ref, temp_ref[:, :P]], dim=1),
            temp_memory[:, P:], temp_pos[:, P:])
