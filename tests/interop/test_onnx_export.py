"""`raydn export` + raydn.deploy.OnnxDetector: onnxruntime parity with PyTorch over a stream with a
memory reset, the graph I/O contract (float64 timestamps), metadata, clean errors. Tiny preset;
one export per test session (module fixture)."""
from __future__ import annotations

import json

import pytest
import torch
from _deps import require

require("onnxruntime")
require("onnxscript")

from raydn.cli import main  # noqa: E402
from raydn.data.synthetic_batch import synthetic_frame_batch  # noqa: E402
from raydn.interop.convert import save_model_file  # noqa: E402
from raydn.interop.export import ExportError, META_FILE, export_onnx, read_metadata  # noqa: E402
from raydn.presets import build_model  # noqa: E402

PRESET = "tiny_raydn"
SIZE = (128, 352)


def _non_trivial_model(seed: int = 3):
    """Tiny detector whose every float weight is perturbed (the random init has zero attention
    logits and constant class biases: too easy a parity case)."""
    torch.manual_seed(seed)
    model = build_model(PRESET).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    model = _non_trivial_model()
    ckpt = d / "model.pt"
    save_model_file(model.state_dict(), ckpt, PRESET, source="test")
    out = d / "export"
    rc = main(["export", "--checkpoint", str(ckpt), "--out", str(out)])
    assert rc == 0
    return model, out


def _frames(prev):
    return [synthetic_frame_batch(1, SIZE, frame_index=i, prev_exists=[p], num_boxes=0,
                                  with_targets=False, seed=11) for i, p in enumerate(prev)]


def test_export_writes_graphs_and_metadata_and_passes_its_parity_check(exported):
    _, out = exported
    meta = read_metadata(out)
    assert meta["preset"] == PRESET and meta["image_size"] == list(SIZE) and meta["batch_size"] == 1
    assert meta["img_mean"] == [123.675, 116.28, 103.53] and len(meta["class_names"]) == 10
    assert meta["class_names"][0] == "car" and meta["options"]["sampler"] == "grid_sample"
    par = meta["parity"]
    assert par["ok"] and not par["failed"] and 0.0 in par["prev_exists"][1:] and par["frames"] >= 3
    err = par["per_output"]
    # well-conditioned outputs: strictly within 1e-4; decisions identical; float64 time exact
    for name in ("feat_0", "feat_3", "cls_logits", "scores", "new_mem_egopose", "new_mem_velo"):
        assert err[name] <= 1e-4, (name, err[name])
    assert err["labels"] == err["keep"] == err["new_mem_timestamp"] == 0.0
    # metric outputs: within 1e-4 or within 2x PyTorch float32's own error against float64
    for name in ("boxes", "bbox_preds", "new_mem_reference_point", "new_mem_embedding"):
        assert err[name] <= max(1e-4, 2 * par["float32_floor"][name]), (name, err[name])
    names = [i["name"] for i in meta["head_step"]["inputs"]]
    assert names[:4] == ["feat_0", "feat_1", "feat_2", "feat_3"] and names[-1] == "mem_velo"
    assert not list(out.glob(".raydn-export-*"))                     # no temporary left behind


def test_timestamps_cross_the_boundary_as_float64(exported):
    """Absolute timestamps ~1.5e9 s: the graph takes and returns float64; the K new memory rows
    get exactly -t (float32 would be off by up to 64 s)."""
    import onnxruntime as ort
    _, out = exported
    sess = ort.InferenceSession(str(out / "head_step.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    assert types["timestamp"] == types["mem_timestamp"] == "tensor(double)"
    assert {o.name: o.type for o in sess.get_outputs()}["new_mem_timestamp"] == "tensor(double)"
    from raydn.deploy import OnnxDetector
    det = OnnxDetector(out)
    b = _frames([0.0])[0]
    b.timestamp = torch.tensor([1.5e9 + 0.123456], dtype=torch.float64)
    _, st = det.step(b, det.init_state(1))
    K = det.metadata["topk_proposals"]
    assert st.timestamp.dtype == torch.float64
    assert torch.equal(st.timestamp[0, :K, 0], torch.full((K,), -(1.5e9 + 0.123456), dtype=torch.float64))


def test_onnx_detector_matches_pytorch_predict_over_a_stream_with_a_reset(exported):
    from raydn.deploy import OnnxDetector
    model, out = exported
    det = OnnxDetector(out)
    s_pt, s_ox = model.init_state(1), det.init_state(1)
    for b in _frames([0.0, 1.0, 1.0, 0.0, 1.0]):
        d_pt, s_pt = model.predict(b, s_pt)
        d_ox, s_ox = det.predict(b, s_ox)
        assert len(d_pt) == len(d_ox) == 1
        a, r = d_ox[0], d_pt[0]
        assert a["boxes"].shape == r["boxes"].shape and a["boxes"].shape[1] == 9
        # onnxruntime and torch round differently: boxes with near-tied scores may come in either order
        # (tests/parity/tie_align.py); pair them first, then compare row by row
        from tests.parity.tie_align import align_rows, assert_swaps_only_among_ties
        perm = align_rows(torch.cat([a["boxes"], a["scores"][:, None]], 1),
                          torch.cat([r["boxes"], r["scores"][:, None]], 1))
        assert_swaps_only_among_ties(perm, r["scores"], 1e-5)
        a = {k: v[perm] for k, v in a.items()}
        assert a["labels"].dtype == torch.int64 and torch.equal(a["labels"], r["labels"])
        torch.testing.assert_close(a["scores"], r["scores"], rtol=0, atol=1e-5)
        # metres: float32-rounding level (see check_parity), i.e. well below a millimetre
        torch.testing.assert_close(a["boxes"], r["boxes"], rtol=1e-5, atol=1e-3)
        for f in ("embedding", "reference_point", "egopose", "velo"):
            torch.testing.assert_close(getattr(s_ox, f), getattr(s_pt, f), rtol=1e-5, atol=1e-3)
        assert torch.equal(s_ox.timestamp, s_pt.timestamp)


def test_reset_frame_ignores_the_incoming_memory(exported):
    """prev_exists = 0 resets inside the graph: a warm memory and a fresh one give the same frame."""
    from raydn.deploy import OnnxDetector
    _, out = exported
    det = OnnxDetector(out)
    frames = _frames([0.0, 1.0, 1.0, 0.0])
    st = det.init_state(1)
    for b in frames[:3]:
        _, st = det.step(b, st)
    warm, _ = det.step(frames[3], st)
    fresh, _ = det.step(frames[3], det.init_state(1))
    cont = frames[3]
    cont.prev_exists = torch.ones(1)
    kept, _ = det.step(cont, st)                     # same frame continuing: the memory matters
    assert (warm["cls_logits"] == fresh["cls_logits"]).all()
    assert not (kept["cls_logits"] == fresh["cls_logits"]).all()


def test_deploy_errors_name_the_problem(exported, tmp_path):
    from raydn.deploy import OnnxDetector
    _, out = exported
    det = OnnxDetector(out)
    with pytest.raises(ExportError, match="batch size 1, got 2"):
        det.init_state(2)
    b = synthetic_frame_batch(1, (64, 176), num_boxes=0, with_targets=False)
    with pytest.raises(ExportError, match=r"images: expected shape \(1, 6, 3, 128, 352\)"):
        det.predict(b, det.init_state(1))
    with pytest.raises(ExportError, match="no raydn_onnx.json"):
        OnnxDetector(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / META_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ExportError, match="format 'other'"):
        OnnxDetector(bad)


def test_export_refuses_the_fused_sampler_and_bad_cli_input(tmp_path, capsys):
    with pytest.raises(ExportError, match="RuntimeOptions.for_export"):
        export_onnx(build_model(PRESET), tmp_path / "x")              # default: fused sampler
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["export", "--preset", "tiny_nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'tiny_nope'" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_raydn_infer_with_the_onnxruntime_backend_matches_torch(exported, synth_world, tmp_path, capsys):
    """`raydn infer --backend onnxruntime --onnx DIR` on a synthetic nuScenes scene gives the
    torch backend's detections (same checkpoint) frame by frame."""
    require("nuscenes")
    _, out = exported
    ckpt = out.parent / "model.pt"
    scene = [s["name"] for s in json.loads((synth_world / "v1.0-mini" / "scene.json").read_text())][0]
    common = ["--dataroot", str(synth_world), "--scene", scene, "--score-thr", "0", "--workers", "0",
              "--no-progress"]
    j_pt, j_ox = tmp_path / "pt.jsonl", tmp_path / "ox.jsonl"
    assert main(["infer", "--checkpoint", str(ckpt), "--out", str(j_pt), "--device", "cpu", *common]) == 0
    assert main(["infer", "--backend", "onnxruntime", "--onnx", str(out), "--out", str(j_ox), *common]) == 0, \
        capsys.readouterr().err
    assert "backend onnxruntime" in capsys.readouterr().out
    rec_pt = [json.loads(s) for s in j_pt.read_text().splitlines()]
    rec_ox = [json.loads(s) for s in j_ox.read_text().splitlines()]
    assert len(rec_pt) == len(rec_ox) >= 3 and rec_ox[0]["new_sequence"] and not rec_ox[1]["new_sequence"]
    for a, b in zip(rec_ox, rec_pt):
        assert a["sample_token"] == b["sample_token"] and len(a["detections"]) == len(b["detections"]) > 0
        da, db = a["detections"], b["detections"]
        assert [d["label"] for d in da] == [d["label"] for d in db]
        assert [d["id"] for d in da] == [d["id"] for d in db]
        torch.testing.assert_close(torch.tensor([d["score"] for d in da]),
                                   torch.tensor([d["score"] for d in db]), rtol=0, atol=2e-6)
        torch.testing.assert_close(torch.tensor([d["box"] for d in da]),
                                   torch.tensor([d["box"] for d in db]), rtol=0, atol=2e-3)
