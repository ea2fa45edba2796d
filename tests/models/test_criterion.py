"""Criterion, matcher and functional losses on tiny hand-computable inputs."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from raydn.config import DenoisingConfig, HeadConfig
from raydn.geometry import normalize_bbox
from raydn.models.criterion import (
    RayDNCriterion,
    dn_cls_avg_factor,
    reduce_mean_count,
)
from raydn.models.denoising import DenoisingQueries
from raydn.models.losses import (
    focal_match_cost,
    one_hot_without_background,
    reduce_by_avg_factor,
    sigmoid_focal_loss,
    weighted_l1_loss,
)
from raydn.models.matcher import HungarianMatcher3D, pad_targets

LN2 = math.log(2.0)
CW = torch.tensor([2.0, 2.0, 1, 1, 1, 1, 1, 1, 1, 1])


def _box(x, y, z, l=4.0, w=2.0, h=1.5, yaw=0.3, vx=1.0, vy=-0.5):
    return torch.tensor([x, y, z, l, w, h, yaw, vx, vy], dtype=torch.float32)


# ----------------------------------------------------------------------------- functional
def test_focal_loss_golden_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), math.log(3.0)]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    # x = 0: p = 0.5. pos: 0.25 * 0.5^2 * ln2 ; neg: 0.75 * 0.5^2 * ln2
    # x = ln3: p = 0.75. pos: 0.25 * 0.25^2 * -ln(0.75) ; neg: 0.75 * 0.75^2 * -ln(0.25)
    expected = torch.tensor([
        [0.0625 * LN2, 0.1875 * LN2],
        [0.015625 * -math.log(0.75), 0.421875 * -math.log(0.25)],
    ])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_one_hot_background_is_zero_row():
    oh = one_hot_without_background(torch.tensor([0, 2, 3]), 3)
    assert torch.equal(oh, torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 0]]))


def test_weighted_l1_and_reduction_golden():
    pred = torch.tensor([[1.0, -1.0, 0.5, 0, 0, 0, 0, 0, 2.0, 0]])
    target = torch.zeros(1, 10)
    per_elem = weighted_l1_loss(pred, target, CW)
    # 2*1 + 2*1 + 1*0.5 + 1*2 = 6.5
    assert float(per_elem.sum()) == pytest.approx(6.5)
    assert float(reduce_by_avg_factor(per_elem, 2.0)) == pytest.approx(3.25, rel=1e-6)


def test_dn_normaliser_golden():
    # 600 * 3.14159 / 6 * 0.75^3 (official literal pi); small counts clamp to 1
    assert dn_cls_avg_factor(600, 0.75) == pytest.approx(100 * 3.14159 * 0.421875, rel=1e-12)
    assert dn_cls_avg_factor(600, 0.75) != pytest.approx(100 * math.pi * 0.421875, rel=1e-7)
    assert dn_cls_avg_factor(4, 0.75) == 1
    assert dn_cls_avg_factor(0, 0.75) == 1


def test_focal_match_cost_golden():
    logits = torch.tensor([[0.0, math.log(3.0)]])          # (N=1, C=2)
    cost = focal_match_cost(logits, torch.tensor([1, 0]))  # (1, G=2)
    c1 = 0.25 * 0.0625 * -math.log(0.75) - 0.75 * 0.5625 * -math.log(0.25)  # class 1, p=.75
    c0 = 0.25 * 0.25 * LN2 - 0.75 * 0.25 * LN2                             # class 0, p=.5
    torch.testing.assert_close(cost, torch.tensor([[c1, c0]]), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- matcher
def test_matcher_cost_formula_and_velocity_ignored():
    torch.manual_seed(0)
    m = HungarianMatcher3D()
    logits, preds = torch.randn(4, 10), torch.randn(4, 10)
    gt = torch.stack([_box(1, 2, 0.5), _box(-3, 4, -1, yaw=-2.0)])
    labels = torch.tensor([3, 7])
    cost = m.cost_matrix(logits, preds, gt, labels)
    enc = normalize_bbox(gt)
    q, j = 2, 1
    ref = 2.0 * focal_match_cost(logits[q:q + 1], labels[j:j + 1])[0, 0] \
        + 0.25 * ((preds[q, :8] - enc[j, :8]) * CW[:8]).abs().sum()
    assert float(cost[q, j]) == pytest.approx(float(ref), rel=1e-5)
    preds2 = preds.clone()
    preds2[:, 8:] += 100.0
    torch.testing.assert_close(m.cost_matrix(logits, preds2, gt, labels), cost)
    mv = HungarianMatcher3D(match_with_velo=True)
    assert not torch.allclose(mv.cost_matrix(logits, preds2, gt, labels), cost)


def test_matcher_optimal_vs_brute_force_batched():
    torch.manual_seed(1)
    L, B, N, C = 2, 3, 5, 4
    logits, preds = torch.randn(L, B, N, C), torch.randn(L, B, N, 10)
    num = [3, 0, 2]
    gts = [torch.stack([_box(*torch.randn(3).tolist()) for _ in range(n)]) if n else
           torch.zeros(0, 9) for n in num]
    labs = [torch.randint(0, C, (n,)) for n in num]
    boxes, labels, num_gts = pad_targets(gts, labs)
    m = HungarianMatcher3D()
    assigned = m(logits, preds, boxes, labels, num_gts)
    assert assigned.shape == (L, B, N) and assigned.dtype == torch.long
    for l in range(L):
        for b in range(B):
            a = assigned[l, b]
            if num[b] == 0:
                assert (a == 0).all()
                continue
            cost = m.cost_matrix(logits[l, b], preds[l, b], gts[b], labs[b])
            # every GT matched exactly once
            assert sorted(a[a > 0].tolist()) == list(range(1, num[b] + 1))
            got = sum(float(cost[q, a[q] - 1]) for q in range(N) if a[q] > 0)
            best = min(sum(float(cost[q, j]) for j, q in enumerate(perm))
                       for perm in itertools.permutations(range(N), num[b]))
            assert got == pytest.approx(best, rel=1e-6, abs=1e-6)


def test_matcher_nan_prediction_not_preferred():
    m = HungarianMatcher3D()
    gt = _box(0, 0, 0)[None]
    preds = normalize_bbox(gt).repeat(2, 1)
    preds[0] = float("nan")                       # cost -> 100 after nan_to_num
    preds[1, :2] += 5.0                           # finite but worse than a perfect box
    logits = torch.zeros(2, 10)
    a = m(logits[None, None], preds[None, None], gt[None], torch.tensor([[0]]), torch.tensor([1]))
    assert a[0, 0].tolist() == [0, 1]


# ----------------------------------------------------------------------------- criterion
def _tiny_cfg(**dn):
    return HeadConfig(num_classes=2, denoising=DenoisingConfig(**dn))


def test_criterion_golden_matching_and_dn():
    gt = _box(1.0, 2.0, 0.0, yaw=0.0, vx=0.0, vy=0.0)
    enc = normalize_bbox(gt)
    # layer 0 (the only layer), B=2: sample 0 has the GT, sample 1 none; N = 2 queries
    preds = torch.zeros(1, 2, 2, 10)
    preds[0, 0, 0] = enc + 10.0                    # far
    preds[0, 0, 1] = enc
    preds[0, 0, 1, 0] += 0.5                       # x off by 0.5 -> L1 = 2 * 0.5 = 1.0
    preds[0, 0, 1, 8] += 0.2                       # vx off by 0.2 (in the loss, not the cost)
    logits = torch.zeros(1, 2, 2, 2)
    dn = DenoisingQueries(
        reference_points=torch.zeros(2, 2, 3), attn_mask=torch.zeros(1, 1, dtype=torch.bool),
        pad_size=2, known_labels=torch.tensor([0, 2]), known_boxes=gt.repeat(2, 1),
        known_bid=torch.tensor([0, 0]), map_known_indice=torch.tensor([0, 1]),
        known_indice=torch.tensor([0, 0]), known_num=[1, 0])
    dn_preds = torch.zeros(1, 2, 2, 10)
    dn_preds[0, 0, 0] = enc
    dn_preds[0, 0, 1] = enc
    dn_preds[0, 0, 1, 2] += 1.0                    # negative regressed to the GT: L1 = 1.0
    dn_preds[0, 1] = 1e6                           # sample 1 slots are not DN entries: ignored
    outputs = {"all_cls_scores": logits, "all_bbox_preds": preds, "dn": dn,
               "dn_cls_scores": torch.zeros(1, 2, 2, 2), "dn_bbox_preds": dn_preds}
    losses, assigned = RayDNCriterion(_tiny_cfg())(outputs, [gt[None], torch.zeros(0, 9)],
                                                   [torch.tensor([0]), torch.zeros(0, dtype=torch.long)],
                                                   return_assignments=True)
    assert list(losses) == ["loss_cls", "loss_bbox", "dn_loss_cls", "dn_loss_bbox"]
    assert assigned.tolist() == [[[0, 1], [0, 0]]]
    # 8 logits of 0: one positive (0.0625 ln2), seven negatives (0.1875 ln2); / 1 pos; x 2.0
    assert float(losses["loss_cls"]) == pytest.approx(2.0 * (0.0625 + 7 * 0.1875) * LN2, rel=1e-5)
    # (2 * 0.5 + 1 * 0.2) / 1 x 0.25
    assert float(losses["loss_bbox"]) == pytest.approx(0.25 * 1.2, rel=1e-5)
    # DN: entry 0 positive class 0, entry 1 background; normaliser max(2 * 0.2209, 1) = 1
    assert float(losses["dn_loss_cls"]) == pytest.approx(2.0 * (0.0625 + 3 * 0.1875) * LN2, rel=1e-5)
    # both entries regressed to the GT: (0 + 1.0) / max(2, 1) x 0.25
    assert float(losses["dn_loss_bbox"]) == pytest.approx(0.25 * 1.0 / 2, rel=1e-5)


def test_zero_gt_sample_contributes_background_only():
    torch.manual_seed(2)
    L, N, C = 3, 6, 10
    logits, preds = torch.randn(L, 2, N, C), torch.randn(L, 2, N, 10)
    gts = [torch.stack([_box(1, 1, 0), _box(-5, 3, 1)]), torch.zeros(0, 9)]
    labs = [torch.tensor([4, 8]), torch.zeros(0, dtype=torch.long)]
    crit = RayDNCriterion(HeadConfig(denoising=DenoisingConfig(enabled=False)))
    both, assigned = crit({"all_cls_scores": logits, "all_bbox_preds": preds, "dn": None},
                          gts, labs, return_assignments=True)
    alone = crit({"all_cls_scores": logits[:, :1], "all_bbox_preds": preds[:, :1], "dn": None},
                 gts[:1], labs[:1])
    assert len(both) == 2 * L and not any("dn_" in k for k in both)
    assert (assigned[:, 1] == 0).all()
    for l, key in enumerate(["d0.loss_cls", "d1.loss_cls", "loss_cls"]):
        bg = sigmoid_focal_loss(logits[l, 1], torch.zeros(N, C)).sum() / 2 * 2.0
        assert float(both[key]) == pytest.approx(float(alone[key] + bg), rel=1e-5)
    for key in ("d0.loss_bbox", "d1.loss_bbox", "loss_bbox"):
        assert float(both[key]) == pytest.approx(float(alone[key]), rel=1e-6)


def test_batch_without_gt_dn_keys_are_detached_copies():
    torch.manual_seed(3)
    L = 6
    logits = torch.randn(L, 2, 8, 10, requires_grad=True)
    preds = torch.randn(L, 2, 8, 10, requires_grad=True)
    empty = [torch.zeros(0, 9), torch.zeros(0, 9)]
    nolab = [torch.zeros(0, dtype=torch.long)] * 2
    losses = RayDNCriterion(HeadConfig())(
        {"all_cls_scores": logits, "all_bbox_preds": preds, "dn": None,
         "dn_cls_scores": None, "dn_bbox_preds": None}, empty, nolab)
    assert len(losses) == 4 * L
    for name in ("loss_cls", "loss_bbox"):
        for prefix in [""] + [f"d{l}." for l in range(L - 1)]:
            src, copy = losses[prefix + name], losses[prefix + "dn_" + name]
            assert not copy.requires_grad
            assert float(copy) == float(src.detach())
    assert losses["loss_cls"].requires_grad and float(losses["loss_cls"].detach()) > 0
    assert float(losses["loss_bbox"].detach()) == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gradients_finite_with_degenerate_inputs():
    torch.manual_seed(4)
    L, B, N, C = 2, 2, 7, 10
    logits = (torch.randn(L, B, N, C) * 5)
    logits[0, 0, 0] = 80.0                         # saturated sigmoid
    logits[1, 1, 1] = -80.0
    logits.requires_grad_(True)
    preds = torch.randn(L, B, N, 10, requires_grad=True)
    gts = [torch.stack([_box(1, 1, 0), _box(2, 2, 0, l=0.0)]),   # zero-size GT: target -inf
           torch.stack([_box(-1, 0, 0)])]
    labs = [torch.tensor([0, 1]), torch.tensor([9])]
    # DN: 3 groups of the 3 boxes, S = 2, D = 6
    n, groups = 3, 3
    bid0 = torch.tensor([0, 0, 1])
    local = torch.tensor([0, 1, 0])
    dn = DenoisingQueries(
        reference_points=torch.zeros(B, 6, 3), attn_mask=torch.zeros(1, 1, dtype=torch.bool),
        pad_size=6,
        known_labels=torch.tensor([0, 10, 9, 10, 1, 10, 0, 1, 10]),
        known_boxes=torch.cat(gts).repeat(groups, 1),
        known_bid=bid0.repeat(groups),
        map_known_indice=torch.cat([local + 2 * g for g in range(groups)]),
        known_indice=torch.arange(n).repeat(groups), known_num=[2, 1])
    dn_logits = torch.randn(L, B, 6, C, requires_grad=True)
    dn_preds = torch.randn(L, B, 6, 10, requires_grad=True)
    losses = RayDNCriterion(HeadConfig())(
        {"all_cls_scores": logits, "all_bbox_preds": preds, "dn": dn,
         "dn_cls_scores": dn_logits, "dn_bbox_preds": dn_preds}, gts, labs)
    assert len(losses) == 4 * L
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for t in (logits, preds, dn_logits, dn_preds):
        assert torch.isfinite(t.grad).all()
    # padding slot (row 1, slot 1 of every group) gets no gradient
    assert (dn_preds.grad[:, 1, 1::2] == 0).all() and (dn_logits.grad[:, 1, 1::2] == 0).all()
    # zero-size GT regression target is dropped: its DN rows give no box gradient
    assert (dn_preds.grad[:, 0, 1::2] == 0).all()


def test_criterion_has_no_state_dict_entries():
    assert len(RayDNCriterion(HeadConfig()).state_dict()) == 0


def test_reduce_mean_count_local_and_distributed(tmp_path):
    assert reduce_mean_count(0, "cpu") == 1.0
    assert reduce_mean_count(7, "cpu") == 7.0
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert reduce_mean_count(5, "cpu") == 5.0
    finally:
        dist.destroy_process_group()


def test_rows_with_non_finite_targets_are_dropped():
    # A GT of zero length encodes to log(0) = -inf: officially its rows leave the L1 sums
    # (the normaliser still counts them).
    bad = _box(1.0, 2.0, 0.0, l=0.0)
    good = _box(-3.0, 1.0, 0.0)
    preds = torch.zeros(1, 1, 1, 10)
    losses = RayDNCriterion(_tiny_cfg(enabled=False))(
        {"all_cls_scores": torch.zeros(1, 1, 1, 2), "all_bbox_preds": preds, "dn": None},
        [bad[None]], [torch.tensor([1])])
    assert float(losses["loss_bbox"].detach()) == 0.0
    assert float(losses["loss_cls"]) == pytest.approx(2.0 * (0.1875 + 0.0625) * LN2, rel=1e-5)

    dn = DenoisingQueries(
        reference_points=torch.zeros(1, 2, 3), attn_mask=torch.zeros(1, 1, dtype=torch.bool),
        pad_size=2, known_labels=torch.tensor([0, 1]), known_boxes=torch.stack([good, bad]),
        known_bid=torch.tensor([0, 0]), map_known_indice=torch.tensor([0, 1]),
        known_indice=torch.tensor([0, 1]), known_num=[2])
    dn_preds = normalize_bbox(torch.stack([good, good]))[None, None].clone()
    dn_preds[0, 0, 0, 0] += 1.0                    # good row: L1 = 2 * 1.0
    losses = RayDNCriterion(_tiny_cfg())(
        {"all_cls_scores": torch.zeros(1, 1, 2, 2), "all_bbox_preds": torch.zeros(1, 1, 2, 10),
         "dn": dn, "dn_cls_scores": torch.zeros(1, 1, 2, 2), "dn_bbox_preds": dn_preds},
        [torch.stack([good, bad])], [torch.tensor([0, 1])])
    assert float(losses["dn_loss_bbox"]) == pytest.approx(0.25 * 2.0 / 2, rel=1e-5)


def test_dn_entries_gathered_from_their_batch_row():
    gt = _box(0.0, 0.0, 0.0)
    dn = DenoisingQueries(
        reference_points=torch.zeros(2, 3, 3), attn_mask=torch.zeros(1, 1, dtype=torch.bool),
        pad_size=3, known_labels=torch.tensor([1]), known_boxes=gt[None],
        known_bid=torch.tensor([1]), map_known_indice=torch.tensor([2]),
        known_indice=torch.tensor([0]), known_num=[0, 1])
    dn_cls = torch.full((1, 2, 3, 2), 5.0)
    dn_cls[0, 1, 2] = 0.0                          # the only DN entry: row 1, slot 2
    dn_reg = torch.full((1, 2, 3, 10), 7.0)
    dn_reg[0, 1, 2] = normalize_bbox(gt)
    dn_reg[0, 1, 2, 3] += 0.5
    losses = RayDNCriterion(_tiny_cfg())(
        {"all_cls_scores": torch.zeros(1, 2, 2, 2), "all_bbox_preds": torch.zeros(1, 2, 2, 10),
         "dn": dn, "dn_cls_scores": dn_cls, "dn_bbox_preds": dn_reg},
        [torch.zeros(0, 9), gt[None]], [torch.zeros(0, dtype=torch.long), torch.tensor([1])])
    assert float(losses["dn_loss_cls"]) == pytest.approx(2.0 * (0.0625 + 0.1875) * LN2, rel=1e-5)
    assert float(losses["dn_loss_bbox"]) == pytest.approx(0.25 * 0.5, rel=1e-5)
