"""The memory update as pure functions (raydn.models.temporal): frames, ages, resets, seeding."""
from __future__ import annotations

import math

import pytest
import torch

from raydn.models.state import TemporalState
from raydn.models.temporal import memory_motion, post_update, pre_update


def _pose(yaw: float, t: tuple[float, float, float]) -> torch.Tensor:
    c, s = math.cos(yaw), math.sin(yaw)
    T = torch.eye(4)
    T[:2, :2] = torch.tensor([[c, -s], [s, c]])
    T[:3, 3] = torch.tensor(t)
    return T


def test_post_then_pre_update_round_trip_and_reset():
    """Queries written at frame 0 come back at frame 1 in frame 1's LiDAR frame, with their age in
    seconds and the frame-0 -> frame-1 egopose; a slot with prev_exists = 0 is zeroed and its first
    P rows seeded with the pseudo points and the identity."""
    g = torch.Generator().manual_seed(0)
    B, M, C, K, Q, P = 2, 6, 4, 3, 5, 2
    ego0 = torch.stack([_pose(0.3, (1000.0, 200.0, 1.0)), _pose(-1.0, (5.0, -3.0, 0.0))])
    ego1 = torch.stack([_pose(0.35, (1002.0, 201.0, 1.0)), _pose(-0.9, (6.0, -3.0, 0.0))])
    t0 = torch.tensor([1.5e9 + 0.25, 7.0], dtype=torch.float64)
    t1 = t0 + torch.tensor([0.5, 0.5], dtype=torch.float64)
    mem0 = pre_update(None, torch.zeros(B), torch.linalg.inv(ego0), t0, memory_len=M, embed_dims=C)
    assert mem0.timestamp.dtype == torch.float64 and float(mem0.embedding.abs().sum()) == 0.0
    cls = torch.randn(B, Q, 3, generator=g)
    box = torch.randn(B, Q, 10, generator=g) * 10
    dec = torch.randn(B, Q, C, generator=g)
    state = post_update(mem0, ego0, t0, cls, box, dec, K)
    assert state.embedding.shape == (B, M, C) and state.timestamp.dtype == torch.float64
    top = cls.sigmoid().amax(-1).topk(K, dim=1).indices
    want = torch.gather(box[..., :3], 1, top[..., None].expand(-1, -1, 3))
    pseudo = torch.randn(P, 3, generator=g)
    mem1 = pre_update(state, torch.tensor([1.0, 0.0]), torch.linalg.inv(ego1), t1, memory_len=M,
                      embed_dims=C, pseudo_reference=pseudo)
    # slot 0 continues: points in frame-1 coordinates = inv(ego1) @ ego0 @ p
    rel = torch.linalg.inv(ego1[0]) @ ego0[0]
    exp = (rel[:3, :3] @ want[0].T).T + rel[:3, 3]
    torch.testing.assert_close(mem1.reference_point[0, :K], exp, atol=2e-3, rtol=0)
    torch.testing.assert_close(mem1.egopose[0, :K], rel.expand(K, 4, 4), atol=1e-4, rtol=0)
    assert torch.equal(mem1.timestamp[0, :K, 0], torch.full((K,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(mem1.embedding[0, :K], torch.gather(dec[0], 0, top[0][:, None].expand(-1, C)))
    # slot 1 resets: zeros except the P seeded rows
    assert float(mem1.embedding[1].abs().sum()) == 0.0 and float(mem1.timestamp[1].abs().sum()) == 0.0
    torch.testing.assert_close(mem1.reference_point[1, :P], pseudo)
    assert float(mem1.reference_point[1, P:].abs().sum()) == 0.0
    assert torch.equal(mem1.egopose[1, :P], torch.eye(4).expand(P, 4, 4))
    # the motion encoding sees the age as a float: 180 = 15 values x 6 frequencies x (sin, cos)
    assert memory_motion(mem1).shape == (B, M, 180)


def test_pre_update_checks_the_state_shape():
    st = TemporalState.zeros(1, 4, 8)
    with pytest.raises(ValueError, match=r"expected \(B=1, M=5"):
        pre_update(st, torch.ones(1), torch.eye(4)[None], torch.zeros(1, dtype=torch.float64),
                   memory_len=5, embed_dims=8)
