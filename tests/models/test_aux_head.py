"""YOLOX auxiliary 2D head: names/shapes, SimOTA assignment, targets and losses (spec §4, §11.3)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raydn.config import AuxHeadConfig
from raydn.errors import DataError
from raydn.models.aux_head import (OUT_CLS, OUT_CTR, OUT_OBJ, OUT_REG, YOLOXAuxHead,
                                   build_aux_head, decode_boxes, grid_priors)
from raydn.models.simota import pairwise_iou, simota_assign


# ---------------------------------------------------------------------------- helpers
def _reference_simota(scores, priors, boxes, gt_boxes, gt_labels, radius=2.5, topk=10):
    """Literal per-image transliteration of mmdet 2.x SimOTAAssigner._assign (loops, repeats,
    F.binary_cross_entropy) used as an independent oracle. Returns (P,) gt index or -1, (P,) IoU."""
    num_gt, num_p = gt_boxes.shape[0], boxes.shape[0]
    gt_inds = torch.full((num_p,), -1, dtype=torch.long)
    ious_out = torch.zeros(num_p)
    if num_gt == 0:
        return gt_inds, ious_out
    x = priors[:, 0:1].repeat(1, num_gt)
    y = priors[:, 1:2].repeat(1, num_gt)
    sx = priors[:, 2:3].repeat(1, num_gt)
    sy = priors[:, 3:4].repeat(1, num_gt)
    in_gts = torch.stack([x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x,
                          gt_boxes[:, 3] - y], 1).min(1).values > 0
    cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2
    cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    in_cts = torch.stack([x - (cx - radius * sx), y - (cy - radius * sy), (cx + radius * sx) - x,
                          (cy + radius * sy) - y], 1).min(1).values > 0
    valid = in_gts.any(1) | in_cts.any(1)
    both = in_gts[valid] & in_cts[valid]
    vb, vs = boxes[valid], scores[valid]
    nv = vb.shape[0]
    if nv == 0:
        return gt_inds, ious_out
    ious = pairwise_iou(vb, gt_boxes)
    onehot = F.one_hot(gt_labels, scores.shape[-1]).float()[None].repeat(nv, 1, 1)
    cls_cost = F.binary_cross_entropy(vs[:, None].repeat(1, num_gt, 1).sqrt(), onehot,
                                      reduction="none").sum(-1)
    cost = cls_cost + 3.0 * -torch.log(ious + 1e-7) + (~both) * 100000.0
    match = torch.zeros_like(cost)
    ks = torch.clamp(torch.topk(ious, min(topk, nv), 0).values.sum(0).int(), min=1)
    for g in range(num_gt):
        _, idx = torch.topk(cost[:, g], k=int(ks[g]), largest=False)
        match[idx, g] = 1
    multi = match.sum(1) > 1
    if multi.any():
        match[multi] = 0
        match[multi, cost[multi].argmin(1)] = 1
    fg = match.sum(1) > 0
    vidx = valid.nonzero()[:, 0]
    gt_inds[vidx[fg]] = match[fg].argmax(1)
    ious_out[vidx[fg]] = (match * ious).sum(1)[fg]
    return gt_inds, ious_out


def _tiny_head(num_classes=3, channels=8, strides=(8, 16)):
    torch.manual_seed(0)
    return YOLOXAuxHead(num_classes=num_classes, in_channels=channels, feat_channels=channels,
                        strides=strides)


def _tiny_gt():
    """B=1, N=2 cameras of 64 x 64: camera 0 has two objects, camera 1 none."""
    boxes = [[torch.tensor([[8.0, 10.0, 40.0, 34.0], [30.0, 20.0, 60.0, 60.0]]), torch.zeros(0, 4)]]
    labels = [[torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]]
    centers = [[torch.tensor([[22.0, 20.0], [47.0, 41.0]]), torch.zeros(0, 2)]]
    depths = [[torch.tensor([10.0, 20.0]), torch.zeros(0)]]
    return boxes, labels, centers, depths


def _tiny_feats(channels=8, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 2, channels, 8, 8, generator=g).requires_grad_(requires_grad),
            torch.randn(1, 2, channels, 4, 4, generator=g).requires_grad_(requires_grad)]


# ---------------------------------------------------------------------------- names / init
def test_state_dict_matches_official_keys(official_dir):
    expected = {}
    for line in (official_dir / "state_dict_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith("img_roi_head."):
            expected[key[len("img_roi_head."):]] = tuple(int(v) for v in shape.strip("[]").split(",") if v.strip())
    head = build_aux_head(AuxHeadConfig())
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert len(expected) == 4 * 2 * 2 * 6 + 4 * 4 * 2
    assert got == expected


def test_init_and_norm_settings():
    head = build_aux_head(AuxHeadConfig())
    bias = -math.log(99.0)
    for lvl in range(4):
        assert torch.allclose(head.multi_level_conv_cls[lvl].bias, torch.full((10,), bias))
        assert torch.allclose(head.multi_level_conv_obj[lvl].bias, torch.full((1,), bias))
        assert torch.all(head.multi_level_conv_reg[lvl].bias == 0)
        assert torch.all(head.multi_level_conv_centers2d[lvl].bias == 0)
        bn = head.multi_level_cls_convs[lvl][0].bn
        assert bn.momentum == pytest.approx(0.03) and bn.eps == pytest.approx(1e-3)
        assert head.multi_level_reg_convs[lvl][1].conv.bias is None
    # Kaiming-uniform a=sqrt(5), fan_in: bound = 1/sqrt(fan_in)
    w = head.multi_level_cls_convs[0][0].conv.weight
    bound = 1 / math.sqrt(256 * 9)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    # separate weights per level
    assert not torch.equal(head.multi_level_cls_convs[0][0].conv.weight,
                           head.multi_level_cls_convs[1][0].conv.weight)


def test_forward_shapes_and_priors():
    head = _tiny_head()
    out = head(_tiny_feats())
    assert [tuple(t.shape) for t in out[OUT_CLS]] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    assert [tuple(t.shape) for t in out[OUT_REG]] == [(2, 4, 8, 8), (2, 4, 4, 4)]
    assert [tuple(t.shape) for t in out[OUT_OBJ]] == [(2, 1, 8, 8), (2, 1, 4, 4)]
    assert [tuple(t.shape) for t in out[OUT_CTR]] == [(2, 2, 8, 8), (2, 2, 4, 4)]
    pri = grid_priors([(2, 3), (1, 2)], (8, 16))
    assert pri.tolist() == [[0, 0, 8, 8], [8, 0, 8, 8], [16, 0, 8, 8], [0, 8, 8, 8], [8, 8, 8, 8],
                            [16, 8, 8, 8], [0, 0, 16, 16], [16, 0, 16, 16]]
    dec = decode_boxes(torch.tensor([[16.0, 8.0, 8.0, 8.0]]), torch.tensor([[0.5, -0.25, math.log(2), 0.0]]))
    assert torch.allclose(dec, torch.tensor([[12.0, 2.0, 28.0, 10.0]]))   # centre (20, 6), wh (16, 8)


# ---------------------------------------------------------------------------- SimOTA
def test_simota_hand_case_dynamic_k():
    """Two GTs; uniform scores so the IoU decides. GT A's candidate IoUs sum to 2.36 -> k = 2
    (p0, p6 cheapest); GT B's sum to 1.75 -> k = 1 (p2). p4, p5 are outside every box/centre."""
    A, B = [0.0, 0.0, 40.0, 40.0], [60.0, 0.0, 100.0, 40.0]
    priors = torch.tensor([[20.0, 20.0], [10.0, 10.0], [80.0, 20.0], [70.0, 20.0], [200.0, 200.0],
                           [50.0, 20.0], [30.0, 30.0]])
    priors = torch.cat([priors, torch.full((7, 2), 8.0)], 1)
    boxes = torch.tensor([A, [5.0, 5.0, 35.0, 35.0], B, [60.0, 0.0, 90.0, 40.0], [190.0, 190.0, 210.0, 210.0],
                          [40.0, 0.0, 60.0, 40.0], [0.0, 0.0, 40.0, 32.0]])
    scores = torch.full((7, 2), 0.25)
    res = simota_assign(scores[None], priors, boxes[None], torch.tensor([[A, B]]), torch.tensor([[0, 1]]))
    assert res.gt_inds[0].tolist() == [0, -1, 1, -1, -1, -1, 0]
    assert torch.allclose(res.pos_ious[0], torch.tensor([1.0, 0, 1.0, 0, 0, 0, 0.8]))


def test_simota_conflict_goes_to_min_cost():
    """q0 lies in both GTs and is the only choice of both (k = 1 each); it keeps GT B, whose cost
    is lower (IoU 0.667 vs 0.538); GT A ends up without a positive."""
    A, B = [0.0, 0.0, 40.0, 40.0], [20.0, 0.0, 60.0, 40.0]
    priors = torch.tensor([[30.0, 20.0, 8.0, 8.0], [10.0, 20.0, 8.0, 8.0], [50.0, 20.0, 8.0, 8.0]])
    boxes = torch.tensor([[12.0, 0.0, 52.0, 40.0], [0.0, 0.0, 10.0, 10.0], [50.0, 30.0, 60.0, 40.0]])
    res = simota_assign(torch.full((1, 3, 2), 0.25), priors, boxes[None], torch.tensor([[A, B]]),
                        torch.tensor([[0, 1]]))
    assert res.gt_inds[0].tolist() == [1, -1, -1]
    assert res.pos_ious[0, 0].item() == pytest.approx(1280 / 1920, rel=1e-5)


def test_simota_centre_region_penalty():
    """A wide GT: r0 is inside the box but outside the 2.5-stride centre square (cost +1e5) and
    loses to r1 (inside both) although r0 predicts the box exactly."""
    gt = [0.0, 0.0, 200.0, 40.0]
    priors = torch.tensor([[20.0, 20.0, 8.0, 8.0], [100.0, 20.0, 8.0, 8.0]])
    boxes = torch.tensor([gt, [0.0, 0.0, 100.0, 40.0]])
    res = simota_assign(torch.full((1, 2, 1), 0.5), priors, boxes[None], torch.tensor([[gt]]),
                        torch.tensor([[0]]))
    assert res.gt_inds[0].tolist() == [-1, 0]


def test_simota_batched_matches_reference_per_image():
    g = torch.Generator().manual_seed(3)
    priors = torch.cat([grid_priors([(8, 12)], (8,)), grid_priors([(4, 6)], (16,))])
    priors = torch.cat([priors[:, :2] + priors[:, 2:] / 2, priors[:, 2:]], 1)
    n_p, n_cls = priors.shape[0], 4
    counts = [3, 0, 1, 6, 2]
    gts, labels = [], []
    for k in counts:
        xy = torch.rand(k, 2, generator=g) * torch.tensor([80.0, 50.0])
        wh = 4 + torch.rand(k, 2, generator=g) * 40
        gts.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, n_cls, (k,), generator=g))
    centre = priors[None, :, :2] + torch.randn(len(counts), n_p, 2, generator=g) * 6
    wh = priors[None, :, 2:] * torch.exp(torch.randn(len(counts), n_p, 2, generator=g) * 0.7 + 0.5)
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], -1)
    scores = torch.rand(len(counts), n_p, n_cls, generator=g) * torch.rand(len(counts), n_p, 1, generator=g)
    G = max(counts)
    gt_pad = torch.zeros(len(counts), G, 4)
    lab_pad = torch.zeros(len(counts), G, dtype=torch.long)
    valid = torch.zeros(len(counts), G, dtype=torch.bool)
    for i, k in enumerate(counts):
        gt_pad[i, :k], lab_pad[i, :k], valid[i, :k] = gts[i], labels[i], True
    res = simota_assign(scores, priors, boxes, gt_pad, lab_pad, valid)
    n_pos = 0
    for i in range(len(counts)):
        ref_inds, ref_ious = _reference_simota(scores[i], priors, boxes[i], gts[i], labels[i])
        assert torch.equal(res.gt_inds[i], ref_inds), f"image {i}"
        assert torch.allclose(res.pos_ious[i], ref_ious, atol=1e-6)
        n_pos += int((ref_inds >= 0).sum())
    assert n_pos > 10 and bool((res.gt_inds[1] == -1).all())


# ---------------------------------------------------------------------------- targets and losses
def test_targets_l1_iou_and_centres():
    head = _tiny_head()
    boxes, labels, centers, _ = _tiny_gt()
    flat = {k: v.detach() for k, v in head.flatten_outputs(head(_tiny_feats())).items()}
    t = head.get_targets(flat, boxes, labels, centers)
    assert t.img_idx.numel() >= 2 and bool((t.img_idx == 0).all())      # camera 1 has no GT
    assert t.obj[1].sum() == 0 and t.obj[0].sum() == t.img_idx.numel()
    assert set(t.gt_idx.tolist()) == {0, 1}
    # assignment = mmdet SimOTA on sqrt-able scores sigmoid(cls)*sigmoid(obj), priors + s/2
    pr = flat["priors"]
    shifted = torch.cat([pr[:, :2] + pr[:, 2:] / 2, pr[:, 2:]], 1)
    scores = flat["cls"][0].sigmoid() * flat["obj"][0].sigmoid()[:, None]
    ref_inds, _ = _reference_simota(scores, shifted, flat["boxes"][0], boxes[0][0], labels[0][0])
    assert torch.equal(ref_inds[t.prior_idx], t.gt_idx) and int((ref_inds >= 0).sum()) == t.img_idx.numel()
    gtb, gtc = boxes[0][0][t.gt_idx], centers[0][0][t.gt_idx]
    pri = flat["priors"][t.prior_idx]
    assert torch.equal(t.box, gtb)
    cx, cy = (gtb[:, 0] + gtb[:, 2]) / 2, (gtb[:, 1] + gtb[:, 3]) / 2
    w, h = gtb[:, 2] - gtb[:, 0], gtb[:, 3] - gtb[:, 1]
    s = pri[:, 2]
    exp_l1 = torch.stack([(cx - pri[:, 0]) / s, (cy - pri[:, 1]) / s, torch.log(w / s + 1e-8),
                          torch.log(h / s + 1e-8)], 1)
    assert torch.allclose(t.l1, exp_l1, atol=1e-6)
    assert torch.allclose(t.centers, (gtc - pri[:, :2]) / pri[:, 2:3], atol=1e-6)
    # IoU-aware cls target: one-hot of the 2D label times IoU(pred box, GT)
    pred = flat["boxes"][t.img_idx, t.prior_idx]
    ious = torch.stack([pairwise_iou(pred[j:j + 1], gtb[j:j + 1])[0, 0] for j in range(len(pred))])
    exp_cls = F.one_hot(labels[0][0][t.gt_idx], 3).float() * ious[:, None]
    assert torch.allclose(t.cls, exp_cls, atol=1e-6) and bool((t.cls.sum(1) > 0).all())


def test_losses_match_manual_formulas():
    head = _tiny_head()
    boxes, labels, centers, depths = _tiny_gt()
    out = head(_tiny_feats())
    losses = head.loss(out, boxes, labels, centers, depths)
    assert set(losses) == {"enc_loss_cls", "enc_loss_iou", "enc_loss_obj", "enc_loss_bbox",
                           "enc_loss_centers2d"}
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0, k
    flat = head.flatten_outputs(out)
    t = head.get_targets({k: v.detach() for k, v in flat.items()}, boxes, labels, centers)
    i, p = t.img_idx, t.prior_idx
    n = float(i.numel())
    pred = flat["boxes"][i, p]
    iou = torch.stack([pairwise_iou(pred[j:j + 1], t.box[j:j + 1])[0, 0] for j in range(len(pred))])
    exp = {
        "enc_loss_cls": F.binary_cross_entropy_with_logits(flat["cls"][i, p], t.cls, reduction="sum") / n,
        "enc_loss_iou": 5 * (1 - iou ** 2).sum() / n,
        "enc_loss_obj": F.binary_cross_entropy_with_logits(flat["obj"], t.obj, reduction="sum") / n,
        "enc_loss_bbox": (flat["reg"][i, p] - t.l1).abs().sum() / n,
        "enc_loss_centers2d": (flat["ctr"][i, p] - t.centers).abs().sum() / n,
    }
    for k in exp:
        assert losses[k].item() == pytest.approx(exp[k].item(), rel=1e-5), k
    # depths are ignored
    again = head.loss(out, boxes, labels, centers, None)
    assert all(torch.equal(again[k], losses[k]) for k in losses)


def test_zero_gt_images():
    head = _tiny_head()
    out = head(_tiny_feats())
    empty = [[torch.zeros(0, 4), torch.zeros(0, 4)]]
    losses = head.loss(out, empty, [[torch.zeros(0, dtype=torch.long)] * 2], [[torch.zeros(0, 2)] * 2])
    obj = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1) for o in out[OUT_OBJ]], 1)
    # normaliser clamps to 1; every objectness target is 0; no cls/box/centre terms
    assert losses["enc_loss_obj"].item() == pytest.approx(
        F.binary_cross_entropy_with_logits(obj, torch.zeros_like(obj), reduction="sum").item(), rel=1e-5)
    for k in ("enc_loss_cls", "enc_loss_iou", "enc_loss_bbox", "enc_loss_centers2d"):
        assert losses[k].item() == 0.0
    sum(losses.values()).backward()                                        # graph stays connected
    assert head.multi_level_conv_obj[0].bias.grad is not None


def test_bad_targets_raise():
    head = _tiny_head()
    out = head(_tiny_feats())
    boxes, labels, centers, _ = _tiny_gt()
    with pytest.raises(DataError, match="gt_labels_2d"):
        head.loss(out, boxes, [[torch.tensor([0, 7]), labels[0][1]]], centers)
    with pytest.raises(DataError, match="gt_boxes_2d"):
        head.loss(out, [boxes[0][:1]], labels, centers)


def test_gradients_reach_features_and_loss_decreases():
    head = _tiny_head()
    boxes, labels, centers, _ = _tiny_gt()
    feats = _tiny_feats(requires_grad=True)
    total = sum(head.loss(head(feats), boxes, labels, centers).values())
    total.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)

    head = _tiny_head()
    feats = [f.detach() for f in _tiny_feats()]
    opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(20):
        losses = head.loss(head(feats), boxes, labels, centers)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.7 * history[0], history
