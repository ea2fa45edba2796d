"""Group-DETR training groups (``HeadConfig.query_groups``, not official): the official rows are
unchanged by the extra groups, every group is supervised, inference ignores them."""
from __future__ import annotations

from dataclasses import replace

import torch

from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.models.head import group_attention_mask
from raydn.presets import build_model, get_preset

TINY_HW = (128, 352)


def _model(groups: int):
    p = get_preset("tiny_raydn")
    head = replace(p.model.head, query_groups=groups, dropout=0.0)
    torch.manual_seed(0)
    return build_model(p, head=head)


def test_group_mask_blocks_across_groups():
    base = torch.zeros(5, 5 + 3, dtype=torch.bool)
    base[0, 1] = True                                   # an official block is kept
    m = group_attention_mask(base, num_main=5, num_query=2, groups=3, num_memory=3, device="cpu")
    assert m.shape == (9, 12)
    assert m[0, 1] and not m[0, 2] and not m[0, 9]      # official rows: base mask, memory visible
    assert m[:5, 5:9].all()                             # official rows never see the extra groups
    assert not m[5:7, 5:7].any() and m[5:7, 7:9].all()  # group 1 sees itself, not group 2
    assert m[5:, :5].all() and not m[5:, 9:].any()      # groups: no official rows, all memory
    assert not m.all(-1).any()


def test_official_rows_unchanged_and_groups_supervised():
    one, three = _model(1).train(), _model(3).train()
    missing, unexpected = three.load_state_dict(one.state_dict(), strict=False)
    assert missing == ["pts_bbox_head.group_reference_points.weight"] and not unexpected
    batch = synthetic_frame_batch(2, TINY_HW, num_boxes=[4, 2], seed=3)
    outs = []
    for m in (one, three):
        torch.manual_seed(7)                            # same denoising draws
        out, _, _ = m(batch, None)
        outs.append(out)
    a, b = outs
    assert b["all_cls_scores"].shape == a["all_cls_scores"].shape
    torch.testing.assert_close(b["all_cls_scores"], a["all_cls_scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["all_bbox_preds"], a["all_bbox_preds"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["dn_cls_scores"], a["dn_cls_scores"], rtol=1e-4, atol=1e-4)
    L, B, Qp, C = a["all_cls_scores"].shape
    Q = three.cfg.head.num_query
    assert b["group_cls_scores"].shape == (L, B, 2, Q, C)
    assert b["group_bbox_preds"].shape == (L, B, 2, Q, 10)
    assert "group_cls_scores" not in a
    # losses: the group terms exist, are finite and reach the group reference points' features
    torch.manual_seed(7)
    losses, _ = three.forward_train(batch, None)
    assert {"group_loss_cls", "group_loss_bbox"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["group_loss_cls"] + losses["group_loss_bbox"]).backward()
    g = three.pts_bbox_head.group_reference_points.weight.grad
    assert g is not None and g.abs().sum() > 0
    g0 = three.pts_bbox_head.reference_points.weight.grad   # the official queries: not from these terms
    assert g0 is None or not g0.any()


def test_inference_ignores_groups():
    m = _model(3).eval()
    batch = synthetic_frame_batch(1, TINY_HW, with_targets=False)
    out, _, _ = m(batch, None)
    assert "group_cls_scores" not in out
    assert out["all_cls_scores"].shape[2] == m.cfg.head.num_query + m.cfg.head.num_propagated
