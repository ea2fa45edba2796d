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


def test_memory_and_projection_geometry_stay_float32_under_bf16_autocast():
    """Global coordinates (~1.6e3 m) in a bf16 product round to ~8 m: the memory update and the
    camera projection run in float32 even inside a bf16 autocast region (same values as fp32)."""
    from raydn.models.transformer import DeformableFeatureAggregation
    g = torch.Generator().manual_seed(1)
    B, M, C, K, Q = 1, 6, 4, 3, 5
    ego = _pose(0.4, (600.0, 1600.0, 0.0))[None]
    t = torch.tensor([1.5e9], dtype=torch.float64)
    mem = pre_update(None, torch.zeros(B), torch.linalg.inv(ego), t, memory_len=M, embed_dims=C)
    cls, box, dec = (torch.randn(B, Q, n, generator=g).bfloat16() for n in (3, 10, C))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st = post_update(mem, ego, t, cls, box, dec, K)
        mem2 = pre_update(st, torch.ones(B), torch.linalg.inv(ego), t + 0.5, memory_len=M, embed_dims=C)
    ref = post_update(mem, ego, t, cls.float(), box.float(), dec.float(), K)
    assert st.reference_point.dtype == st.egopose.dtype == st.embedding.dtype == torch.float32
    assert torch.equal(st.reference_point, ref.reference_point) and torch.equal(st.egopose, ref.egopose)
    assert mem2.reference_point.dtype == torch.float32
    torch.testing.assert_close(mem2.reference_point[:, :K], box[..., :3].float().gather(
        1, cls.float().sigmoid().amax(-1).topk(K, dim=1).indices[..., None].expand(-1, -1, 3)),
        atol=1e-3, rtol=0)
    kp = torch.randn(B, 7, 4, 3, generator=g) * 20
    l2i = torch.randn(B, 6, 4, 4, generator=g) * 500
    with torch.autocast("cpu", dtype=torch.bfloat16):
        uv = DeformableFeatureAggregation.project(kp, l2i, (256, 704))
    assert uv.dtype == torch.float32
    assert torch.equal(uv, DeformableFeatureAggregation.project(kp, l2i, (256, 704)))
