"""Parity of the denoising-query builder with the official ``prepare_for_dn`` (spec §6).

``dn_case_2.pt``: one official call (2 samples, 3 + 15 boxes incl. awkward ones).
``loss_case_1.pt``: the DN part of an official training forward (40 + 0 boxes); the head draws no
random number before ``prepare_for_dn`` (memory / MLN / dropout-off path), so seeding right before
the builder reproduces it.
"""
from __future__ import annotations

import torch

from tests.conftest import load_fixture
from raydn.config import DenoisingConfig, RayDenoisingConfig
from raydn.models.denoising import box_noise_groups, build_denoising_queries, ray_depth_steps


def _cfg_from_hyper(h) -> DenoisingConfig:
    return DenoisingConfig(
        scalar=h["scalar"], noise_scale=h["noise_scale"], noise_trans=h["noise_trans"],
        split=h["split"],
        ray=RayDenoisingConfig(groups=h["raydn_group"], num_rays=h["raydn_num"],
                               alpha=h["raydn_alpha"], beta=h["raydn_beta"],
                               radius=h["raydn_radius"]))


def _build_case2(d):
    h = d["hyper"]
    torch.manual_seed(d["seed_before_prepare_for_dn"])
    return build_denoising_queries(
        d["gt_bboxes_gravity"], d["gt_labels"], d["reference_points"], d["lidar2img"],
        tuple(d["pad_shape"][:2]), _cfg_from_hyper(h), pc_range=tuple(d["pc_range"].tolist()),
        num_classes=h["num_classes"], num_propagated=h["num_propagated"],
        memory_len=h["memory_len"])


def test_dn_case_2_outputs(official_dir):
    d = load_fixture("dn_case_2.pt")
    out = _build_case2(d)
    m = d["mask_dict"]
    assert out.pad_size == m["pad_size"] == 225
    assert out.reference_points.shape == d["padded_reference_points"].shape
    assert (out.reference_points - d["padded_reference_points"]).abs().max() <= 1e-5
    assert out.attn_mask.shape == (653, 1037)
    assert out.attn_mask.dtype == torch.bool
    assert torch.equal(out.attn_mask, d["attn_mask"])
    assert torch.equal(out.known_labels, m["known_labels"])
    assert (out.known_boxes - m["known_bboxs"]).abs().max() <= 1e-5
    assert torch.equal(out.known_indice, m["known_indice"])
    assert torch.equal(out.map_known_indice, m["map_known_indice"])
    n = m["batch_idx"].numel()
    assert torch.equal(out.known_bid, m["batch_idx"].repeat(15))
    assert out.known_num == [k.numel() for k in m["know_idx"]] == [3, 15]
    assert out.known_bid.shape == out.known_labels.shape == (15 * n,)


def test_dn_case_2_random_draws(official_dir):
    """The three official random calls, in order, reproduce the recorded draws, and our
    building blocks consume them exactly the same way."""
    d = load_fixture("dn_case_2.pt")
    draws = d["random_draws"]
    assert [r["call"] for r in draws] == ["torch.rand_like", "Beta(8,2).sample", "torch.rand"]
    n = sum(b.shape[0] for b in d["gt_bboxes_gravity"])
    # the documented official sequence
    torch.manual_seed(d["seed_before_prepare_for_dn"])
    assert torch.equal(torch.rand_like(torch.zeros(10 * n, 3)), draws[0]["value"])
    assert torch.equal(torch.distributions.Beta(8, 2).sample([5 * n]), draws[1]["value"])
    assert torch.equal(torch.rand(draws[2]["value"].numel()), draws[2]["value"])
    after_official = torch.rand(7)

    # our blocks
    torch.manual_seed(d["seed_before_prepare_for_dn"])
    boxes = torch.cat(d["gt_bboxes_gravity"])
    labels = torch.cat(d["gt_labels"])
    _, _, delta = box_noise_groups(boxes, labels, 10, 1.0, 0.0, 0.75, 10)
    assert torch.equal(delta, draws[0]["value"] * 2 - 1.0)
    steps, positive = ray_depth_steps(n, 5, 8, 2, 3, 0.75)
    raw = ((draws[1]["value"] * 2 - 1.0) * 3).view(5, n)
    raw_min = raw.abs().min(dim=0)
    assert torch.equal(positive, raw_min.indices)
    reset = raw_min.values > 0.75
    assert int(reset.sum()) == draws[2]["value"].numel() == 15
    pos_steps = steps.gather(0, positive[None])[0]
    assert torch.equal(pos_steps[reset], (draws[2]["value"] * 2 - 1) * 0.75)
    assert torch.equal(pos_steps[~reset], raw_min.values[~reset])
    neg = torch.ones_like(steps, dtype=torch.bool).scatter(0, positive[None], False)
    assert torch.equal(steps[neg], raw[neg])
    assert torch.equal(torch.rand(7), after_official)

    # the full builder consumes exactly the same amount of randomness
    _build_case2(d)
    assert torch.equal(torch.rand(7), after_official)


def test_loss_case_1_dn(official_dir):
    d = load_fixture("loss_case_1.pt")
    weights = load_fixture("head_weights.pt")
    frame, out_ref = d["frames"][0], d["outputs"][0]
    torch.manual_seed(out_ref["seed_before_forward"])
    out = build_denoising_queries(frame["gt_bboxes_gravity"], frame["gt_labels"],
                                  weights["reference_points.weight"], frame["lidar2img"],
                                  tuple(d["pad_shape"][:2]), DenoisingConfig())
    m = out_ref["dn_mask_dict"]
    tr = out_ref["transformer"]
    assert out.pad_size == m["pad_size"] == 600
    assert torch.equal(out.attn_mask, tr["attn_mask"])
    assert torch.equal(out.known_labels, m["known_labels"])
    assert (out.known_boxes - m["known_bboxs"]).abs().max() <= 1e-5
    assert torch.equal(out.known_indice, m["known_indice"])
    assert torch.equal(out.map_known_indice, m["map_known_indice"])
    assert torch.equal(out.known_bid, m["batch_idx"].repeat(15))
    assert out.known_num == [40, 0]
    # transformer reference points = [DN slots (600), learnable (300), propagated (128)]
    ref = tr["reference_points"][:, : 600 + 300]
    assert (out.reference_points - ref).abs().max() <= 1e-5
    # sample 1 has no box: its DN slots are all padding at (0, 0, 0)
    assert torch.count_nonzero(out.reference_points[1, :600]) == 0
