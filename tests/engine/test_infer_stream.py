"""Streaming inference (`raydn infer`'s engine): query ids, outputs, own cameras, long streams."""
from __future__ import annotations

import gc
import json
import math
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from raydn.data.infos import load_info_file
from raydn.data.own_cameras import (CalibrationError, CameraRigFrames, load_camera_rig,
                                    rig_dict_from_infos, write_rig_file)
from raydn.core.frames import boxes_to_global
from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.engine.tracking import MemoryTracker, TrackFrame
from raydn.engine.stream import TorchBackend, nuscenes_stream, run_stream
from raydn.presets import build_model, get_preset
from _deps import require

AUG = replace(get_preset("tiny_raydn").train.aug, training=False)
THREE = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_BACK"]


def _model(num_cams: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    head = replace(get_preset("tiny_raydn").model.head, num_cams=num_cams)
    return build_model("tiny_raydn", head=head).eval()


@pytest.fixture(scope="module")
def val_records(synth_infos):
    return load_info_file(synth_infos[1]["val"])["infos"]


def _lines(path):
    return [json.loads(s) for s in path.read_text().splitlines()]


def test_boxes_to_global_rotates_and_translates():
    th = 0.7
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.tensor([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]],
                             dtype=torch.float64)
    T[:3, 3] = torch.tensor([1000.0, -2000.0, 3.0], dtype=torch.float64)
    b = torch.tensor([[10.0, 5.0, 1.0, 4.0, 2.0, 1.5, 0.3, 2.0, -1.0]], dtype=torch.float32)
    g = boxes_to_global(b, T)[0]
    c = np.array([10.0, 5.0, 1.0])
    np.testing.assert_allclose(g[:3].numpy(), T[:3, :3].numpy() @ c + T[:3, 3].numpy(), atol=1e-9)
    np.testing.assert_allclose(g[3:6].numpy(), [4.0, 2.0, 1.5], atol=1e-6)
    assert abs(g[6].item() - (0.3 + th)) < 1e-6
    np.testing.assert_allclose(g[7:].numpy(), T[:2, :2].numpy() @ np.array([2.0, -1.0]), atol=1e-6)


def test_query_ids_follow_the_memory_rows():
    """The ids follow the model's own selection (the rows the head writes, checked on the
    velocities it copies into the memory; the query each detection was decoded from, checked on
    the centre it copies); propagated queries keep their row's id; a reset forgets every id."""
    model = _model()
    backend = TorchBackend(model)
    cfg = model.cfg.head
    Q, M, K = cfg.num_query, cfg.memory_len, cfg.topk_proposals
    tracker = MemoryTracker.for_head(cfg)
    captured = {}
    model.pts_bbox_head.register_forward_hook(
        lambda m, a, out: captured.update(box=out[0]["all_bbox_preds"][-1]))
    state = backend.init_state(1)
    seen: set = set()
    persisted = reinserted = 0
    for t in range(7):
        reset = t in (0, 4)
        batch = synthetic_frame_batch(1, AUG.final_dim, frame_index=t, prev_exists=[0.0 if reset else 1.0],
                                      with_targets=False, seed=t)
        before = tracker.memory_ids.copy()
        if reset:
            before[:] = -1
        dets, state, sel = backend.step(batch, state)
        box = captured["box"]
        q, topk = sel.decode_index[0], sel.memory_index[0]
        ids = torch.from_numpy(tracker.step(TrackFrame(reset, float(t), dets[0]["labels"], dets[0]["scores"],
                                                       decode_index=q, memory_index=topk)))
        # the selection is the one the model made: the rows it wrote into its memory ...
        assert torch.equal(box[0, topk, -2:], state.velo[0, :K])
        # ... and the queries its detections were decoded from
        assert torch.equal(box[0, q, :3], dets[0]["boxes"][:, :3])
        before_t = torch.from_numpy(before)
        assert torch.equal(torch.from_numpy(tracker.memory_ids[K:]), before_t[:M - K])
        assert len(q) == len(dets[0]["scores"]) == len(ids) > 0
        prop = q >= Q
        carried = before_t[(q[prop] - Q)]
        got = ids[prop]
        assert torch.equal(got[carried >= 0], carried[carried >= 0])  # propagated: the row's id
        fresh = ids[~prop]
        assert (fresh >= 0).all()
        if reset:
            assert not (set(ids.tolist()) & seen)                          # nothing survives a reset
        per_query = {}
        for qq, ii in zip(q.tolist(), ids.tolist()):                         # one id per query
            assert per_query.setdefault(qq, ii) == ii
        persisted += int((carried >= 0).sum())
        new_rows = torch.from_numpy(tracker.memory_ids[:K])
        src = before_t[(topk - Q).clamp(min=0)]
        again = (topk >= Q) & (src >= 0)
        assert torch.equal(new_rows[again], src[again])                     # re-inserted: keeps its id
        assert (new_rows >= 0).all()
        reinserted += int(again.sum())
        seen |= set(ids.tolist())
    assert persisted > 0 and reinserted > 0  # the stream did carry ids across frames


def test_stream_three_cameras_writes_jsonl_pictures_and_video(val_records, tmp_path):
    """A 3-camera rig and a tiny model built for 3 cameras: one JSON line, one PNG and one video
    frame per frame; global boxes are the vehicle boxes through the file's poses."""
    from raydn.viz.video import count_video_frames
    path = write_rig_file(rig_dict_from_infos(val_records, cameras=THREE), tmp_path / "rig.yaml")
    rig = load_camera_rig(path)
    frames = CameraRigFrames(rig, AUG)
    out, mp4 = tmp_path / "o" / "dets.jsonl", tmp_path / "o" / "video.mp4"
    rep = run_stream(TorchBackend(_model(3)), frames, out=out, render_dir=tmp_path / "png", video=mp4,
                     score_thr=0.0, progress=False)
    assert rep.frames == 6 and rep.video_frames == 6 and rep.ids
    recs = _lines(out)
    assert [r["frame"] for r in recs] == list(range(6))
    assert [r["new_sequence"] for r in recs] == [True] + [False] * 5
    assert [r["timestamp"] for r in recs] == [f.timestamp for f in rig.frames]
    assert count_video_frames(mp4) == 6
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    seen, carried = set(), 0
    for r, f in zip(recs, rig.frames):
        d = r["detections"]
        assert len(d) == 100 and all(x["name"] for x in d)            # max_num, score_thr 0
        box = torch.tensor([x["box"] for x in d], dtype=torch.float64)
        want = boxes_to_global(box, torch.as_tensor(f.vehicle_to_world))
        np.testing.assert_allclose(np.array([x["box_global"] for x in d]), want.numpy(), atol=2e-3)
        ids = [x["id"] for x in d]
        carried += len(set(ids) & seen)
        seen |= set(ids)
    assert carried > 0


def test_own_cameras_match_the_nuscenes_path(val_records, tmp_path):
    """The mini_val scene as a 6-camera calibration file gives the detections of the dataset path."""
    model = _model(6)
    path = write_rig_file(rig_dict_from_infos(val_records), tmp_path / "rig.json")
    a, b = tmp_path / "own.jsonl", tmp_path / "nusc.jsonl"
    run_stream(TorchBackend(model), CameraRigFrames(load_camera_rig(path), AUG), out=a, score_thr=0.0,
               progress=False)
    run_stream(TorchBackend(model), nuscenes_stream(val_records, AUG), out=b, score_thr=0.0, progress=False)
    ra, rb = _lines(a), _lines(b)
    assert len(ra) == len(rb) == 6
    assert ra[0]["detections"] == rb[0]["detections"] or all(
        x["id"] == y["id"] and np.allclose(x["box"], y["box"], atol=2e-4) for x, y in zip(ra[0]["detections"], rb[0]["detections"]))
    for x, y in zip(ra, rb):
        sa = np.array([d["score"] for d in x["detections"]])
        sb = np.array([d["score"] for d in y["detections"]])
        np.testing.assert_allclose(sa, sb, atol=1e-4)
        ga = np.array(sorted(d["box_global"][:3] for d in x["detections"]))
        gb = np.array(sorted(d["box_global"][:3] for d in y["detections"]))
        np.testing.assert_allclose(ga, gb, atol=5e-3)


def test_a_failing_stream_leaves_no_output(val_records, tmp_path):
    rig = rig_dict_from_infos(val_records, cameras=THREE)
    (tmp_path / "cut.jpg").write_bytes(open(rig["frames"][0]["images"]["CAM_BACK"], "rb").read()[:5000])
    rig["frames"][4]["images"]["CAM_BACK"] = "cut.jpg"
    frames = CameraRigFrames(load_camera_rig(write_rig_file(rig, tmp_path / "rig.json")), AUG)
    out, mp4 = tmp_path / "o" / "dets.jsonl", tmp_path / "o" / "v.mp4"
    with pytest.raises(CalibrationError, match=r"frames\[4\].*CAM_BACK"):
        run_stream(TorchBackend(_model(3)), frames, out=out, video=mp4, score_thr=0.0, progress=False)
    assert sorted(os.listdir(tmp_path / "o")) == []                   # no partial file, no temp file


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_long_stream_keeps_memory_flat(val_records, tmp_path):
    """150 frames: no tensor survives a frame (exact count of live tensors) and the resident
    memory does not grow after the warm-up (a retained frame would be ~1 MB each)."""
    path = write_rig_file(rig_dict_from_infos(val_records, num_frames=150), tmp_path / "long.json")
    frames = CameraRigFrames(load_camera_rig(path), AUG)
    probes = {}

    def probe(n, rec):
        if n >= 30 and n % 20 == 0:
            gc.collect()
            with warnings.catch_warnings():  # isinstance on torch's deprecated proxies warns
                warnings.simplefilter("ignore")
                tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
            probes[n] = (_rss_bytes(), tensors)

    rep = run_stream(TorchBackend(_model(6)), frames, out=tmp_path / "d.jsonl", score_thr=0.3,
                     progress=False, on_frame=probe)
    assert rep.frames == 150 and len(probes) == 6
    rss = np.array([v[0] for v in probes.values()]) / 2 ** 20
    tensors = [v[1] for v in probes.values()]
    assert max(tensors) - min(tensors) <= 2, tensors
    assert rss[1:].max() - rss[:2].min() < 24.0, rss                 # MiB, after warm-up


def test_ids_follow_boxes_whatever_order_tied_scores_come_in():
    """Another top-k implementation may order equal scores differently: every detection carries
    the query it was decoded from (the model's own selection), so the ids stay with their boxes."""
    model = _model()
    backend = TorchBackend(model)
    a, b = MemoryTracker.for_head(model.cfg.head), MemoryTracker.for_head(model.cfg.head)
    state = backend.init_state(1)
    for t in range(3):
        batch = synthetic_frame_batch(1, AUG.final_dim, frame_index=t, prev_exists=[float(t > 0)],
                                      with_targets=False, seed=t)
        dets, state, sel = backend.step(batch, state)
        d, q, m = dets[0], sel.decode_index[0], sel.memory_index[0]
        assert torch.equal(d["query"], q)
        ids_a = a.step(TrackFrame(t == 0, float(t), d["labels"], d["scores"], decode_index=q, memory_index=m))
        # the same frame from a backend that ordered detections 3 and 4 the other way round
        i, j = 3, 4
        perm = torch.arange(len(q))
        perm[[i, j]] = perm[[j, i]]
        ids_b = b.step(TrackFrame(t == 0, float(t), d["labels"][perm], d["scores"][perm],
                                  decode_index=q[perm], memory_index=m))
        assert ids_a[i] != ids_a[j] and ids_b[i] == ids_a[j] and ids_b[j] == ids_a[i]
        assert (ids_b == ids_a[perm.numpy()]).all()
        assert (a.memory_ids == b.memory_ids).all()


def test_onnxruntime_backend_gives_the_torch_ids_and_boxes(val_records, tmp_path):
    require("onnxruntime")
    require("onnx")
    deploy = require("raydn.deploy")
    from raydn.cli import main
    from raydn.interop.convert import save_model_file
    from raydn.engine.stream import OnnxBackend
    model = _model(6)
    save_model_file(model.state_dict(), tmp_path / "tiny.pt", "tiny_raydn")
    assert main(["export", "--checkpoint", str(tmp_path / "tiny.pt"), "--out", str(tmp_path / "onnx"),
                 "--no-check"]) == 0
    assert hasattr(deploy, "OnnxDetector")
    frames = CameraRigFrames(load_camera_rig(write_rig_file(rig_dict_from_infos(val_records),
                                                            tmp_path / "rig.json")), AUG)
    a, b = tmp_path / "torch.jsonl", tmp_path / "ort.jsonl"
    run_stream(TorchBackend(model), frames, out=a, score_thr=0.0, progress=False)
    rep = run_stream(OnnxBackend(tmp_path / "onnx"), frames, out=b, score_thr=0.0, progress=False)
    assert rep.ids
    for x, y in zip(_lines(a), _lines(b)):
        bx = {(d["id"], d["label"]): d["box"] for d in x["detections"]}
        by = {(d["id"], d["label"]): d["box"] for d in y["detections"]}
        common = set(bx) & set(by)
        assert len(common) >= 0.95 * len(bx)                          # score-boundary ties may differ
        assert max(np.abs(np.subtract(bx[k], by[k])).max() for k in common) < 1e-3


def test_run_stream_takes_options_or_keywords_not_both():
    """``run_stream``'s outputs are one :class:`StreamOptions` (or its fields as keywords); both at
    once is refused before any work (no frame is read, no file written)."""
    from raydn.engine.stream import StreamOptions
    with pytest.raises(TypeError, match="not both"):
        run_stream(None, [], StreamOptions(score_thr=0.5), out="never.jsonl")
    with pytest.raises(TypeError):
        StreamOptions(no_such_field=1)
