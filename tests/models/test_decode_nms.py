"""Class-wise BEV NMS after decoding (``HeadConfig.nms_radius``, not official; the demo presets)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.engine.tracking import MemoryTracker, TrackFrame
from raydn.engine.stream import TorchBackend
from raydn.models.decode import bev_nms_keep, decode
from raydn.presets import build_model, get_preset
from _deps import require


def _greedy(xy: np.ndarray, labels: np.ndarray, radius) -> np.ndarray:
    """The textbook loop: walk the detections in rank order, keep one unless a kept one of its
    class lies closer than the class radius."""
    keep = np.zeros(len(xy), bool)
    for j in range(len(xy)):
        kept = np.nonzero(keep[:j] & (labels[:j] == labels[j]))[0]
        keep[j] = not (np.linalg.norm(xy[kept] - xy[j], axis=1) < radius[labels[j]]).any()
    return keep


def test_hand_built_chain():
    """Ranked A..E; car radius 2 m, truck radius 5 m. B is 1 m from A (dropped); C is a truck
    0.5 m from A (other class: kept); D is 2.5 m from A and 1.5 m from the dropped B (kept: only
    kept detections suppress); E is 1 m from D (dropped)."""
    xy = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0], [2.5, 0.0], [3.5, 0.0]])
    labels = torch.tensor([0, 0, 1, 0, 0])
    radius = [2.0, 5.0] + [1.0] * 8
    keep = bev_nms_keep(xy, labels, radius)
    assert keep.tolist() == [True, False, True, True, False]
    # strict "<": exactly at the radius is kept
    assert bev_nms_keep(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 0]), radius).tolist() == [True, True]


def test_matches_the_greedy_loop_on_random_scenes():
    gen = np.random.default_rng(0)
    radius = [4.0, 6.0, 6.0, 8.0, 8.0, 2.0, 2.0, 2.0, 1.2, 1.0]
    for _ in range(50):
        k = int(gen.integers(0, 120))
        xy = gen.uniform(-15, 15, (k, 2)).astype(np.float32)
        labels = gen.integers(0, 10, k)
        got = bev_nms_keep(torch.from_numpy(xy), torch.from_numpy(labels), radius).numpy()
        np.testing.assert_array_equal(got, _greedy(xy, labels, radius))


def test_degenerate_inputs():
    assert bev_nms_keep(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), [1.0] * 10).shape == (0,)
    assert bev_nms_keep(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), [1.0] * 10).tolist() == [True]
    # identical centres: only the first survives
    same = bev_nms_keep(torch.zeros(4, 9), torch.zeros(4, dtype=torch.long), [1.0] * 10)
    assert same.tolist() == [True, False, False, False]


def _nms_model(radius):
    torch.manual_seed(0)
    head = replace(get_preset("tiny_raydn").model.head, nms_radius=tuple(radius))
    return build_model("tiny_raydn", head=head).eval()


def test_decode_with_nms_is_the_nms_free_decode_filtered():
    radius = [6.0] * 10
    model = _nms_model(radius)
    batch = synthetic_frame_batch(1, (128, 352), with_targets=False)
    with torch.no_grad():
        out, _, _ = model.forward(batch, model.init_state(1))
    free = decode(out, replace(model.cfg.head, nms_radius=None))[0]
    nms = decode(out, model.cfg.head)[0]
    keep = bev_nms_keep(free["boxes"], free["labels"], radius)
    assert 0 < int(keep.sum()) < len(keep)        # random weights: many overlapping boxes
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(nms[k], free[k][keep])
    # no two kept boxes of one class closer than the radius
    d = torch.cdist(nms["boxes"][:, :2], nms["boxes"][:, :2])
    same = nms["labels"][:, None] == nms["labels"][None, :]
    assert not (same & (d < 6.0)).fill_diagonal_(False).any()
    # predict() decodes the same way; nms=False gives the NMS-free rows
    dets, _ = model.predict(batch, model.init_state(1))
    assert torch.equal(dets[0]["scores"], nms["scores"])
    raw, _ = model.predict(batch, model.init_state(1), nms=False)
    assert torch.equal(raw[0]["scores"], free["scores"]) and torch.equal(raw[0]["boxes"], free["boxes"])
    assert model.cfg.head.nms_radius == tuple(radius)            # the model's setting is untouched


def test_query_ids_follow_the_nms_decoder():
    """With the NMS decoder, the model's selection names the query of every detection it kept
    (the centre each detection copies from its query), and every detection gets an id."""
    model = _nms_model([6.0] * 10)
    backend = TorchBackend(model)
    tracker = MemoryTracker.for_head(model.cfg.head)
    captured = {}
    model.pts_bbox_head.register_forward_hook(
        lambda m, a, out: captured.update(box=out[0]["all_bbox_preds"][-1]))
    state = backend.init_state(1)
    for t in range(4):
        batch = synthetic_frame_batch(1, (128, 352), frame_index=t, prev_exists=[float(t > 0)],
                                      with_targets=False, seed=t)
        dets, state, sel = backend.step(batch, state)
        q = sel.decode_index[0]
        assert torch.equal(captured["box"][0, q, :3], dets[0]["boxes"][:, :3])
        ids = tracker.step(TrackFrame(t == 0, float(t), dets[0]["labels"], dets[0]["scores"],
                                      decode_index=q, memory_index=sel.memory_index[0]))
        assert len(ids) == len(dets[0]["scores"]) > 0 and (ids >= 0).all()
    # a tracker built for other head sizes is out of step with the model and says so
    other = MemoryTracker(num_query=4, num_propagated=0, memory_len=8)
    with pytest.raises(ValueError, match="out of step"):
        other.step(TrackFrame(False, 9.0, dets[0]["labels"], dets[0]["scores"],
                              decode_index=q, memory_index=sel.memory_index[0]))


def test_onnx_detections_apply_the_exported_nms():
    deploy = require("raydn.deploy")
    det = deploy.OnnxDetector.__new__(deploy.OnnxDetector)   # only the metadata matters here
    boxes = np.zeros((1, 4, 9), np.float32)
    boxes[0, :, 0] = [0.0, 1.0, 10.0, 0.5]
    outs = {"boxes": boxes, "scores": np.array([[0.9, 0.8, 0.7, 0.6]], np.float32),
            "labels": np.array([[0, 0, 0, 1]]), "keep": np.array([[True, True, True, False]])}
    det.metadata = {"nms_radius": [2.0] * 10}
    d = det.detections(outs)[0]
    assert d["scores"].tolist() == pytest.approx([0.9, 0.7])
    det.metadata = {"nms_radius": None}
    assert len(det.detections(outs)[0]["scores"]) == 3
