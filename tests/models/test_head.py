"""RayDN head on a tiny configuration: shapes, memory semantics, gradients, samplers, tied
branches, denoising path."""
from __future__ import annotations

import dataclasses

import torch

from raydn.config import DenoisingConfig, HeadConfig
from raydn.data.batch import FrameBatch
from raydn.models.decode import decode, decode_bottom
from raydn.models.deformable import deformable_sample, deformable_sample_gather
from raydn.models.head import RayDNHead
from raydn.models.state import TemporalState

PAD = (32, 64)
LEVELS = [(8, 16), (4, 8), (2, 4), (1, 2)]


def tiny_cfg(**kw) -> HeadConfig:
    base = dict(embed_dims=32, num_query=20, num_propagated=8, memory_len=16, topk_proposals=8,
                num_layers=2, num_heads=4, num_groups=4, ffn_dims=64, dropout=0.0)
    base.update(kw)
    return HeadConfig(**base)


def make_head(seed=0, sampler="gather", **kw) -> RayDNHead:
    torch.manual_seed(seed)
    head = RayDNHead(tiny_cfg(**kw), sampler=sampler)
    # perturb the zero-initialised parts so no path hides behind an identity/zero init
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.requires_grad and ("gamma" in name or "beta" in name or "weights_fc" in name):
                p.add_(0.05 * torch.randn_like(p))
    return head


def _lidar2img(B):
    """6 cameras around the ego car looking outwards; pinhole f=32 px, centre (32, 16)."""
    mats = []
    for k in range(6):
        yaw = torch.tensor(k * torch.pi / 3)
        c, s = torch.cos(yaw), torch.sin(yaw)
        # camera axes: x right, y down, z forward (forward = (c, s, 0) in LiDAR)
        R = torch.tensor([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]])
        E = torch.eye(4)
        E[:3, :3] = R
        K = torch.tensor([[32.0, 0, 32, 0], [0, 32.0, 16, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        mats.append((K @ E, K, E))
    l2i = torch.stack([m[0] for m in mats]).expand(B, -1, -1, -1).clone()
    intr = torch.stack([m[1] for m in mats]).expand(B, -1, -1, -1).clone()
    extr = torch.stack([m[2] for m in mats]).expand(B, -1, -1, -1).clone()
    return l2i, intr, extr


def make_batch(B=2, t=0.0, prev_exists=None, shift=0.0, boxes=None) -> FrameBatch:
    l2i, intr, extr = _lidar2img(B)
    ego = torch.eye(4).expand(B, 4, 4).clone()
    ego[:, 0, 3] = 1000.0 + shift          # global coordinates far from the origin
    ego[:, 1, 3] = -500.0
    pe = torch.ones(B) if prev_exists is None else torch.as_tensor(prev_exists, dtype=torch.float32)
    batch = FrameBatch(images=None, intrinsics=intr, extrinsics=extr, lidar2img=l2i, ego_pose=ego,
                       ego_pose_inv=torch.linalg.inv(ego),
                       timestamp=torch.full((B,), 1.5e9 + t, dtype=torch.float64),
                       prev_exists=pe, pad_shape=PAD)
    if boxes is not None:
        batch = dataclasses.replace(batch, gt_boxes=boxes[0], gt_labels=boxes[1])
    return batch


def make_feats(B=2, C=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 6, C, h, w, generator=g) for h, w in LEVELS]


def test_output_shapes_and_state():
    head = make_head().eval()
    cfg = head.cfg
    feats, batch = make_feats(), make_batch(prev_exists=[0, 0])
    with torch.no_grad():
        out, state = head(feats, batch, None, return_intermediates=True)
    L, QP = cfg.num_layers, cfg.num_query + cfg.num_propagated
    assert out["all_cls_scores"].shape == (L, 2, QP, cfg.num_classes)
    assert out["all_bbox_preds"].shape == (L, 2, QP, 10)
    assert out["dn"] is None and out["dn_cls_scores"] is None and out["dn_bbox_preds"] is None
    assert out["tgt"].shape == out["query_pos"].shape == (2, QP, 32)
    assert out["temp_memory"].shape == out["temp_pos"].shape == (2, cfg.memory_len - cfg.num_propagated, 32)
    assert out["reference_points"].shape == (2, QP, 3)
    assert out["outs_dec"].shape == (L, 2, QP, 32)
    assert isinstance(state, TemporalState)
    assert state.embedding.shape == (2, cfg.memory_len, 32)
    assert state.reference_point.shape == (2, cfg.memory_len, 3)
    assert state.timestamp.shape == (2, cfg.memory_len, 1) and state.timestamp.dtype == torch.float64
    assert state.egopose.shape == (2, cfg.memory_len, 4, 4)
    # newest K rows: -t_now exactly (float64), older rows (fresh memory): -t_now as well
    assert torch.equal(state.timestamp[:, :, 0], -batch.timestamp[:, None].expand(2, cfg.memory_len))
    # top-K rows carry the decoder output of the best queries, in global frame
    best = out["all_cls_scores"][-1].sigmoid().amax(-1).topk(cfg.topk_proposals, dim=1).indices
    exp_emb = torch.gather(out["outs_dec"][-1], 1, best[..., None].expand(-1, -1, 32))
    assert torch.equal(state.embedding[:, :cfg.topk_proposals], exp_emb)
    exp_ref = torch.gather(out["all_bbox_preds"][-1, ..., :3], 1, best[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(state.reference_point[:, :cfg.topk_proposals],
                               exp_ref + batch.ego_pose[:, None, :3, 3])
    assert torch.isfinite(out["all_cls_scores"]).all() and torch.isfinite(out["all_bbox_preds"]).all()
    dets = decode(out)
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 9
    assert len(dets[0]["scores"]) == min(300, QP * cfg.num_classes) or len(dets[0]["scores"]) < 300
    bot = decode_bottom(out)[0]
    torch.testing.assert_close(bot["boxes"][:, 2], dets[0]["boxes"][:, 2] - dets[0]["boxes"][:, 5] / 2)


def test_state_none_equals_fresh_state_on_sequence_start():
    head = make_head().eval()
    feats, batch = make_feats(), make_batch(prev_exists=[0, 0])
    with torch.no_grad():
        a, sa = head(feats, batch, None)
        b, sb = head(feats, batch, head.init_state(2))
    assert torch.equal(a["all_cls_scores"], b["all_cls_scores"])
    assert torch.equal(a["all_bbox_preds"], b["all_bbox_preds"])
    for k, v in sa.as_dict().items():
        assert torch.equal(v, getattr(sb, k)), k


def test_memory_reset_is_per_slot_and_state_not_mutated():
    """Slot 0 starts a new sequence (prev_exists=0) -> exactly like a fresh state for it; slot 1
    keeps its memory -> exactly like running it alone with its own memory."""
    head = make_head().eval()
    with torch.no_grad():
        _, s1 = head(make_feats(seed=1), make_batch(t=0.0, prev_exists=[0, 0]), None)
        s1_copy = {k: v.clone() for k, v in s1.as_dict().items()}
        feats2 = make_feats(seed=2)
        batch2 = make_batch(t=0.5, prev_exists=[0, 1], shift=2.0)
        out, s2 = head(feats2, batch2, s1)
        # the input state is not modified in place
        for k, v in s1.as_dict().items():
            assert torch.equal(v, s1_copy[k]), k
        # slot 0 == fresh memory
        f0 = [f[:1] for f in feats2]
        o0, st0 = head(f0, batch2.select([0]), None)
        # slot 1 == alone with its own memory
        f1 = [f[1:] for f in feats2]
        o1, st1 = head(f1, batch2.select([1]), s1.select([1]))
    torch.testing.assert_close(out["all_cls_scores"][:, :1], o0["all_cls_scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["all_bbox_preds"][:, :1], o0["all_bbox_preds"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["all_cls_scores"][:, 1:], o1["all_cls_scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["all_bbox_preds"][:, 1:], o1["all_bbox_preds"], rtol=0, atol=1e-4)
    torch.testing.assert_close(s2.embedding[1:], st1.embedding, rtol=0, atol=1e-5)
    assert torch.equal(s2.timestamp[:1], st0.timestamp)
    # the carried memory matters: slot 1 with memory differs from slot 1 without
    with torch.no_grad():
        o1_fresh, _ = head(f1, dataclasses.replace(batch2.select([1]), prev_exists=torch.zeros(1)), None)
    assert (o1_fresh["all_cls_scores"] - o1["all_cls_scores"]).abs().max() > 1e-4
    # ages (float64, exact): slot 1's rows inserted at t=0 are 0.5 s old at t=0.5; slot 0 was
    # reset, so its older rows are fresh zeros stored as -t_now
    K = head.cfg.topk_proposals
    assert torch.equal(s2.timestamp[1, K:2 * K, 0] + batch2.timestamp[1],
                       torch.full((K,), 0.5, dtype=torch.float64))
    assert torch.equal(s2.timestamp[0, K:, 0], -batch2.timestamp[0].expand(head.cfg.memory_len - K))


def test_sequence_start_uses_pseudo_reference_points():
    head = make_head().eval()
    P = head.cfg.num_propagated
    with torch.no_grad():
        out, _ = head(make_feats(), make_batch(prev_exists=[0, 0]), None, return_intermediates=True)
    pseudo = head.pseudo_reference_points.weight
    torch.testing.assert_close(out["reference_points"][:, -P:], pseudo.expand(2, -1, -1), rtol=0, atol=1e-6)
    assert not head.pseudo_reference_points.weight.requires_grad


def test_samplers_agree_on_the_head():
    torch.manual_seed(0)
    a, b = make_head(sampler="gather").eval(), make_head(sampler="grid_sample").eval()
    b.load_state_dict(a.state_dict())
    feats, batch = make_feats(), make_batch(prev_exists=[0, 0])
    with torch.no_grad():
        oa, _ = a(feats, batch, None)
        ob, _ = b(feats, batch, None)
    torch.testing.assert_close(oa["all_cls_scores"], ob["all_cls_scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(oa["all_bbox_preds"], ob["all_bbox_preds"], rtol=0, atol=1e-4)


def test_deformable_samplers_values_and_gradients():
    torch.manual_seed(0)
    shapes, starts = [(5, 7), (3, 4)], [0, 35]
    v = torch.randn(2, 47, 8, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(2, 3, 4, 2, dtype=torch.float64) * 1.6 - 0.3).requires_grad_()
    w = torch.rand(2, 3, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    a = deformable_sample(v, shapes, starts, loc, w)
    b = deformable_sample_gather(v, shapes, starts, loc, w)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (v, loc, w), g), torch.autograd.grad(b, (v, loc, w), g)):
        torch.testing.assert_close(x, y)
    # explicit bilinear value at one interior point, level 0, group 0, single point weight
    loc2 = torch.full((1, 1, 1, 2), 0.0, dtype=torch.float64)
    loc2[..., 0], loc2[..., 1] = 3.25 / 7, 2.5 / 5           # pixel (x=2.75, y=2.0)
    val = torch.arange(47 * 2, dtype=torch.float64).view(1, 47, 2)
    w2 = torch.zeros(1, 1, 2, 2, 1, dtype=torch.float64)
    w2[0, 0, :, 0, 0] = 1.0
    out = deformable_sample_gather(val, shapes, starts, loc2, w2)
    exp = 0.25 * val[0, 2 * 7 + 2] + 0.75 * val[0, 2 * 7 + 3]
    torch.testing.assert_close(out[0, 0], exp)
    # far outside -> exactly zero
    out = deformable_sample_gather(val, shapes, starts, loc2 + 5.0, w2)
    assert torch.equal(out, torch.zeros_like(out))


def test_forward_backward_finite_and_checkpoint_equivalent():
    cfg_dn_off = dict(denoising=DenoisingConfig(enabled=False))
    a = make_head(**cfg_dn_off).train()
    b = make_head(checkpoint_layers=True, **cfg_dn_off).train()
    b.load_state_dict(a.state_dict())
    feats = make_feats()
    batch = make_batch(prev_exists=[0, 1])
    state = a.init_state(2)
    grads = []
    for head in (a, b):
        fs = [f.clone().requires_grad_() for f in feats]
        out, new_state = head(fs, batch, state)
        loss = out["all_cls_scores"].sigmoid().sum() + out["all_bbox_preds"].square().mean()
        loss.backward()
        assert not new_state.embedding.requires_grad
        gp = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in gp.values())
        assert fs[0].grad is not None and torch.isfinite(fs[0].grad).all()
        grads.append(gp)
    assert set(grads[0]) == set(grads[1])
    # gradients reach the learnable reference points and the DFA offsets/weights
    assert grads[0]["reference_points.weight"].abs().sum() > 0
    assert grads[0]["transformer.decoder.layers.0.attentions.1.learnable_fc.weight"].abs().sum() > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_tied_branches_state_dict_and_loading():
    head = make_head()
    sd = head.state_dict()
    L = head.cfg.num_layers
    for i in range(L):
        assert f"cls_branches.{i}.6.bias" in sd and f"reg_branches.{i}.4.weight" in sd
        assert sd[f"cls_branches.{i}.0.weight"].data_ptr() == sd["cls_branches.0.0.weight"].data_ptr()
    # init: classification prior bias -4.595, reference points in [0, 1]
    torch.testing.assert_close(head.cls_branches[0][-1].bias, torch.full((10,), -4.59511985))
    assert 0 <= head.reference_points.weight.min() and head.reference_points.weight.max() <= 1
    # loading a dict with identical copies sets the one shared module
    sd2 = {k: v.clone() for k, v in sd.items()}
    new = torch.randn_like(sd["cls_branches.0.6.weight"])
    for i in range(L):
        sd2[f"cls_branches.{i}.6.weight"] = new
    head.load_state_dict(sd2)
    for i in range(L):
        assert torch.equal(head.cls_branches[i][6].weight, new)
    assert head.cls_branches[0] is head.cls_branches[L - 1]
    # shared module is counted once among parameters
    n_unique = sum(p.numel() for p in head.parameters())
    n_listed = sum(v.numel() for k, v in sd.items())
    assert n_listed > n_unique


def test_no_module_attribute_changes_in_forward():
    head = make_head().eval()
    before = set(vars(head))
    with torch.no_grad():
        head(make_feats(), make_batch(prev_exists=[0, 0]), None)
    assert set(vars(head)) == before


def _gt(nboxes):
    g = torch.Generator().manual_seed(3)
    boxes, labels = [], []
    for n in nboxes:
        xy = torch.rand(n, 2, generator=g) * 30 - 15
        b = torch.cat([xy, torch.rand(n, 1, generator=g) - 1, torch.rand(n, 3, generator=g) * 2 + 1,
                       torch.rand(n, 1, generator=g) * 3, torch.zeros(n, 2)], dim=1)
        boxes.append(b)
        labels.append(torch.randint(0, 10, (n,), generator=g))
    return boxes, labels


def test_training_with_denoising():
    head = make_head().train()
    batch = make_batch(prev_exists=[0, 0], boxes=_gt([3, 1]))
    torch.manual_seed(5)
    out, state = head(make_feats(), batch, None, return_intermediates=True)
    dn = out["dn"]
    assert dn is not None
    D = dn.pad_size
    assert D == 3 * 15
    L, QP = head.cfg.num_layers, head.cfg.num_query + head.cfg.num_propagated
    assert out["all_cls_scores"].shape == (L, 2, QP, 10)
    assert out["dn_cls_scores"].shape == (L, 2, D, 10) and out["dn_bbox_preds"].shape == (L, 2, D, 10)
    assert out["attn_mask"].shape == (D + QP, D + head.cfg.num_query + head.cfg.memory_len)
    assert out["reference_points"].shape == (2, D + QP, 3)
    loss = out["all_cls_scores"].sum() + out["dn_bbox_preds"].abs().mean()
    loss.backward()
    assert torch.isfinite(head.reference_points.weight.grad).all()
    # non-DN queries never see DN queries: DN slots' content does not leak into them
    assert state.embedding.shape[1] == head.cfg.memory_len
