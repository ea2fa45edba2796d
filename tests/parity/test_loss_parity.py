"""Parity of the criterion (matching + DN losses, Hungarian assignments) with the official
``RayDNHead.loss`` on ``loss_case_1.pt`` (batch of 2: 40 boxes and 0 boxes, DN active)."""
from __future__ import annotations

import pytest
import torch

from raydn.config import HeadConfig
from raydn.models.criterion import RayDNCriterion
from raydn.models.denoising import DenoisingQueries
from tests.conftest import load_fixture


@pytest.fixture(scope="module")
def case(official_dir):
    data = load_fixture("loss_case_1.pt")
    out, frame = data["outputs"][0], data["frames"][0]
    md = out["dn_mask_dict"]
    # official prepare_for_loss: bid = batch_idx[known_indice]
    known_bid = md["batch_idx"][md["known_indice"]]
    dn = DenoisingQueries(
        reference_points=torch.zeros(2, md["pad_size"] + 300, 3),   # unused by the loss
        attn_mask=torch.zeros(1, 1, dtype=torch.bool),               # unused by the loss
        pad_size=int(md["pad_size"]),
        known_labels=md["known_labels"],
        known_boxes=md["known_bboxs"],
        known_bid=known_bid,
        map_known_indice=md["map_known_indice"],
        known_indice=md["known_indice"],
        known_num=[int(k.numel()) for k in md["know_idx"]],
    )
    outputs = {
        "all_cls_scores": out["all_cls_scores"],
        "all_bbox_preds": out["all_bbox_preds"],
        "dn": dn,
        "dn_cls_scores": md["output_known_class"],
        "dn_bbox_preds": md["output_known_coord"],
    }
    return outputs, frame, out


def test_loss_terms_match_official(case):
    outputs, frame, out = case
    crit = RayDNCriterion(HeadConfig())
    losses, _ = crit(outputs, frame["gt_bboxes_gravity"], frame["gt_labels"],
                     return_assignments=True)
    ref = out["losses"]
    assert len(ref) == 24
    assert list(losses) == list(ref)  # same names, same order
    for key, value in ref.items():
        got = float(losses[key])
        assert got == pytest.approx(float(value), rel=1e-4, abs=0), key


def test_hungarian_assignments_match_official(case):
    outputs, frame, out = case
    crit = RayDNCriterion(HeadConfig())
    _, assigned = crit(outputs, frame["gt_bboxes_gravity"], frame["gt_labels"],
                       return_assignments=True)
    L, B, N = assigned.shape
    ref = out["hungarian_gt_inds"]
    assert (L, B) == (6, 2) and len(ref) == L * B
    flat = assigned.flatten(0, 1)
    for i, r in enumerate(ref):
        assert torch.equal(flat[i], r), f"layer {i // B} sample {i % B}"
    # sample 0 has 40 boxes, all matched once; sample 1 has none
    assert int((flat[0] > 0).sum()) == 40 and int((flat[1] > 0).sum()) == 0


def test_parity_gradients_finite(case):
    outputs, frame, _ = case
    outputs = dict(outputs)
    for k in ("all_cls_scores", "all_bbox_preds", "dn_cls_scores", "dn_bbox_preds"):
        outputs[k] = outputs[k].clone().requires_grad_(True)
    losses = RayDNCriterion(HeadConfig())(outputs, frame["gt_bboxes_gravity"], frame["gt_labels"])
    sum(losses.values()).backward()
    for k in ("all_cls_scores", "all_bbox_preds", "dn_cls_scores", "dn_bbox_preds"):
        g = outputs[k].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, k
