"""Detector-level integration: presets, official key layout, state-dict round trip, training and
streaming inference on the tiny preset, empty-box batches, LiDAR-frame outputs."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import raydn
from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.geometry import rigid_inverse
from raydn.interop.convert import (
    convert_official_state_dict, read_key_list, to_official_state_dict,
)
from raydn.presets import build_model, get_preset, list_presets

TINY_HW = (128, 352)
SMALL_HW = (64, 176)
_CONSTANTS = ("pc_range", "code_weights", "match_costs")  # frozen official "parameters"


# ------------------------------------------------------------------------------------ helpers
def _meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_model(name)


def _shared_pairs(path) -> set[tuple[str, str]]:
    pairs = set()
    for line in path.read_text().splitlines():
        if "\t==\t" in line and not line.startswith("#"):
            a, _, b = line.split("\t")
            pairs.add((a, b))
    return pairs


def _aliases(model: nn.Module) -> set[tuple[str, str]]:
    """(key, first key) pairs of state-dict entries that are the same tensor object."""
    first: dict[int, str] = {}
    pairs = set()
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) in first:
            pairs.add((name, first[id(t)]))
        else:
            first[id(t)] = name
    return pairs


def _perturb_(model: nn.Module, seed: int) -> None:
    """Move every weight and BN statistic away from its initial value (so that a dropped or
    zero-initialised tensor cannot hide), keeping the official constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(_CONSTANTS):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.mul_(0.5 + torch.rand(b.shape, generator=g))


def _stream(model, frames, B=2, hw=TINY_HW, prev=None, pose_tf=None):
    """Run ``predict`` (and the raw head outputs) over ``frames`` synthetic frames from an empty
    memory. ``prev``: prev_exists per frame; ``pose_tf``: (4, 4) global re-expression G applied
    as ``ego_pose' = G @ ego_pose``. Returns a list of (detections, head outputs) per frame."""
    state = model.init_state(B)
    out = []
    for f in range(frames):
        batch = synthetic_frame_batch(B, hw, frame_index=f, with_targets=False,
                                      prev_exists=None if prev is None else prev[f])
        if pose_tf is not None:
            pose = pose_tf.double() @ batch.ego_pose.double()
            batch.ego_pose, batch.ego_pose_inv = pose.float(), rigid_inverse(pose).float()
        with torch.no_grad():
            raw, _, _ = model(batch, state)
        dets, state = model.predict(batch, state)
        out.append((dets, raw))
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny_raydn")
    _perturb_(model, 1)
    return model


# ------------------------------------------------------------------------------------ presets
def test_every_preset_builds_with_one_call():
    assert set(list_presets()) == {"r50_raydn", "r50_repdetr3d", "eva02l_raydn",
                                   "eva02l_repdetr3d", "tiny_raydn", "tiny_repdetr3d", "demo_raydn",
                                   "demo_repdetr3d"}
    counts = {}
    for name in list_presets():
        model = build_model(name) if name.startswith("tiny") else _meta_model(name)
        assert model.preset == name
        ray = get_preset(name).model.head.denoising.ray.enabled
        assert ray == name.endswith("_raydn")
        counts[name] = sum(p.numel() for p in model.parameters())
        parts = {n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()}
        counts[name + ".parts"] = parts
    # ResNet-50 without its fc layer: 25,557,032 - 2,049,000 parameters
    assert counts["r50_raydn.parts"]["img_backbone"] == 23_508_032
    assert 40e6 < counts["r50_raydn"] < 46e6, counts["r50_raydn"]                 # 43.3 M
    assert 320e6 < counts["eva02l_raydn"] < 345e6, counts["eva02l_raydn"]         # 331.9 M
    assert 6.5e6 < counts["r50_raydn.parts"]["pts_bbox_head"] < 7.5e6             # 7.04 M
    assert counts["tiny_raydn"] < 3e6
    assert counts["r50_raydn"] == counts["r50_repdetr3d"]  # ray DN adds no parameter
    assert counts["eva02l_raydn"] == counts["eva02l_repdetr3d"]
    assert raydn.build_model("tiny_repdetr3d").preset == "tiny_repdetr3d"


def test_r50_state_dict_equals_official_key_list(official_dir):
    official = read_key_list(official_dir / "state_dict_keys.txt")
    model = _meta_model("r50_raydn")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(official) == 743
    assert set(ours) == set(official), (sorted(set(official) - set(ours))[:10],
                                        sorted(set(ours) - set(official))[:10])
    bad = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert not bad, bad
    # the tied classification / regression branches alias like the official ones
    assert _aliases(model) == _shared_pairs(official_dir / "state_dict_shared.txt")


def test_eva02l_state_dict_equals_official_key_list(official_dir):
    model = _meta_model("eva02l_raydn")
    official = read_key_list(official_dir / "eva02L_state_dict_keys.txt")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(official) == 956
    assert set(ours) == set(official), (sorted(set(official) - set(ours))[:10],
                                        sorted(set(ours) - set(official))[:10])
    bad = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert not bad, bad
    assert _aliases(model) == _shared_pairs(official_dir / "eva02L_state_dict_shared.txt")


# ------------------------------------------------------------------------------ round trip
@pytest.fixture(scope="module")
def r50_pair():
    """A perturbed random R50 detector and its state dict -> official names -> back."""
    torch.manual_seed(0)
    src = build_model("r50_raydn").eval()
    _perturb_(src, 2)
    sd = src.state_dict()
    official = to_official_state_dict(sd)
    back, report = convert_official_state_dict(official, expected=src)
    return src, sd, official, back, report


def test_r50_round_trip_through_official_names(r50_pair):
    src, sd, official, back, report = r50_pair
    assert len(official) == 743
    assert report.ok, report.summary()
    assert list(back) == list(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.slow
def test_r50_official_named_weights_give_identical_outputs(r50_pair):
    """~2 s on a quiet machine (the R50 head at 428 queries dominates), more under load."""
    src, sd, _, back, _ = r50_pair
    torch.manual_seed(1)  # a fresh model with other weights
    dst = build_model("r50_raydn").eval()
    probe = "pts_bbox_head.reference_points.weight"
    assert not torch.equal(dst.state_dict()[probe], sd[probe])
    dst.load_state_dict(back, strict=True)
    batch = synthetic_frame_batch(1, SMALL_HW, with_targets=False)
    with torch.no_grad():
        a, sa, _ = src(batch, None)
        b, sb, _ = dst(batch, None)
    assert torch.equal(a["all_cls_scores"], b["all_cls_scores"])
    assert torch.equal(a["all_bbox_preds"], b["all_bbox_preds"])
    assert torch.equal(sa.embedding, sb.embedding)


# ------------------------------------------------------------------------------ tiny: train
def _head_loss_names(L: int) -> list[str]:
    names = []
    for p in ("", "dn_"):
        names += [f"{p}loss_cls", f"{p}loss_bbox"]
        for l in range(L - 1):
            names += [f"d{l}.{p}loss_cls", f"d{l}.{p}loss_bbox"]
    return names


AUX = ["enc_loss_cls", "enc_loss_iou", "enc_loss_obj", "enc_loss_bbox", "enc_loss_centers2d"]


def test_tiny_forward_train_backward(tiny):
    """Second frame of a sequence (memory from frame 0): losses, graph, gradients."""
    model = tiny.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.no_grad():
        _, state = model.forward_train(synthetic_frame_batch(2, TINY_HW, num_boxes=[4, 2], seed=3),
                                       model.init_state(2))
    batch = synthetic_frame_batch(2, TINY_HW, frame_index=1, num_boxes=[6, 3], seed=3)
    assert batch.prev_exists.tolist() == [1.0, 1.0]
    assert sum(len(b) for cams in batch.gt_boxes_2d for b in cams) > 0  # 2D labels exist
    losses, state = model.forward_train(batch, state)
    L = model.cfg.head.num_layers
    assert list(losses) == _head_loss_names(L) + AUX
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert not state.embedding.requires_grad  # memory leaves the graph
    sum(losses.values()).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, no_grad
    non_finite = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not non_finite, non_finite
    # with perturbed weights and a non-empty memory every trainable tensor gets a non-zero
    # gradient, except the 2D centre/box regression convs of a pyramid level on which SimOTA
    # assigned no positive (they only learn from positives, as officially)
    zero = [n for n, p in trainable.items() if p.grad.abs().sum() == 0]
    assert all(n.startswith(("img_roi_head.multi_level_conv_centers2d.",
                             "img_roi_head.multi_level_conv_reg.")) for n in zero), zero
    assert len(zero) <= 4, zero
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pts_bbox_head.pseudo_reference_points.weight", "pts_bbox_head.pc_range",
                      "pts_bbox_head.code_weights", "pts_bbox_head.match_costs"}
    model.zero_grad(set_to_none=True)


def test_six_layer_tiny_gives_the_24_official_head_terms():
    head = get_preset("tiny_raydn").model.head
    torch.manual_seed(0)
    model = build_model("tiny_raydn", head=replace(head, num_layers=6)).train()
    losses, _ = model.forward_train(synthetic_frame_batch(1, TINY_HW, num_boxes=4, seed=4))
    assert list(losses) == _head_loss_names(6) + AUX
    assert len(losses) == 24 + 5 and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("num_boxes", [[5, 0], [0, 0]], ids=["one-empty-sample", "empty-batch"])
def test_no_nan_with_zero_boxes(tiny, num_boxes):
    """A training frame with no box in one sample / in the whole batch: finite losses and gradients,
    DN terms detached where there is no DN query, and no DN query built (the head's outputs)."""
    model = tiny.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    batch = synthetic_frame_batch(2, TINY_HW, num_boxes=num_boxes, seed=5)
    losses, _ = model.forward_train(batch, model.init_state(2))
    L = model.cfg.head.num_layers
    assert list(losses) == _head_loss_names(L) + AUX
    bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
    assert not bad, bad
    dn_keys = [k for k in losses if "dn_loss" in k]
    if sum(num_boxes) == 0:
        # no DN query at all: the DN terms are log-only detached copies of the matching terms
        for k in dn_keys:
            assert not losses[k].requires_grad, k
            assert torch.equal(losses[k], losses[k.replace("dn_", "")].detach()), k
    else:
        assert all(losses[k].requires_grad for k in dn_keys)
    total = sum(v for v in losses.values() if v.requires_grad)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    # the head's outputs (was test_head.py's zero-box test): DN queries only where a box exists
    with torch.no_grad():
        out, _, _ = model(batch, model.init_state(2))
    if sum(num_boxes) == 0:
        assert out["dn"] is None and out["dn_cls_scores"] is None and out["dn_bbox_preds"] is None
    else:
        assert out["dn"] is not None and out["dn_cls_scores"].shape[2] == out["dn"].pad_size
    assert torch.isfinite(out["all_cls_scores"]).all() and torch.isfinite(out["all_bbox_preds"]).all()


# ------------------------------------------------------------------------------ tiny: predict
@pytest.fixture(scope="module")
def carried(tiny):
    return _stream(tiny.eval(), 3)


@pytest.fixture(scope="module")
def fresh(tiny):
    """Every frame seen as a sequence start (prev_exists = 0): no memory used."""
    return _stream(tiny.eval(), 3, prev=[[0, 0]] * 3)


def test_predict_streaming_sorted_lidar_boxes(tiny, carried, fresh):
    model = tiny.eval()
    max_num = model.cfg.head.max_num
    r = torch.tensor(model.cfg.head.post_center_range)
    for dets, raw in carried:
        assert len(dets) == 2
        for b, d in enumerate(dets):
            k = d["scores"].shape[0]
            assert 0 < k <= max_num
            assert d["boxes"].shape == (k, 9) and d["labels"].shape == (k,)
            assert torch.isfinite(d["boxes"]).all()
            assert (d["scores"][:-1] >= d["scores"][1:]).all()  # sorted, descending
            top = raw["all_cls_scores"][-1, b].sigmoid().max()
            assert d["scores"][0] == top  # the best query comes first
            assert ((d["labels"] >= 0) & (d["labels"] < 10)).all()
            assert (d["boxes"][:, 3:6] > 0).all()  # decoded sizes (exp of log sizes)
            assert ((d["boxes"][:, :3] >= r[:3]) & (d["boxes"][:, :3] <= r[3:])).all()
    # the memory is used: frame 2 differs from the same frame seen as a sequence start
    assert not torch.allclose(carried[2][1]["all_cls_scores"], fresh[2][1]["all_cls_scores"])


def test_predict_boxes_are_in_the_lidar_frame(tiny, carried):
    """Re-expressing the global frame (ego_pose' = G ego_pose for every frame) changes nothing:
    outputs are in the current LiDAR frame and the memory goes through the global frame
    consistently. Tolerance: memory points are float32 global coordinates (~1e3 m here), whose
    rounding (ulp 1.2e-4 m) the propagated queries inherit."""
    yaw = torch.tensor(0.7, dtype=torch.float64)
    G = torch.eye(4, dtype=torch.float64)
    G[:2, :2] = torch.stack([torch.stack([yaw.cos(), -yaw.sin()]), torch.stack([yaw.sin(), yaw.cos()])])
    G[:3, 3] = torch.tensor([-350.0, 220.0, 3.0], dtype=torch.float64)
    moved = _stream(tiny.eval(), 3, pose_tf=G)
    for f, ((_, ra), (_, rb)) in enumerate(zip(carried, moved)):
        dc = (ra["all_cls_scores"] - rb["all_cls_scores"]).abs().max().item()
        db = (ra["all_bbox_preds"] - rb["all_bbox_preds"]).abs().max().item()
        assert dc <= 1e-4 and db <= 5e-3, (f, dc, db)
        if f == 0:  # no memory yet: bit-identical
            assert dc == 0 and db == 0


def test_reset_slot_equals_fresh_sequence(tiny, fresh):
    """Slot 1 starts a new sequence at frame 2 (prev_exists = 0): its output equals that frame
    run from an empty memory, while slot 0 keeps using its memory."""
    carried = _stream(tiny.eval(), 3, prev=[[0, 0], [1, 1], [1, 0]])
    c, f = carried[2][1], fresh[2][1]
    for key in ("all_cls_scores", "all_bbox_preds"):
        assert torch.allclose(c[key][:, 1], f[key][:, 1], atol=1e-5), key
        assert not torch.allclose(c[key][:, 0], f[key][:, 0], atol=1e-3), key
