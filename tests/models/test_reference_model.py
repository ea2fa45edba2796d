"""The shipped reference model (``raydn.weights``, issue 20): loadable by name, its file checked
against its sha256, and its metric on a small fixed synthetic set equal to the one recorded when it
was shipped -- so a change that breaks decoding, the memory, the transforms or the evaluation fails
here (torchvision tests its published weights the same way)."""
import json
import shutil

import pytest
import torch

from raydn import weights
from raydn.errors import CheckpointError
from raydn.weights import get_reference_model, list_reference_models, resolve_checkpoint

NAME = "demo_raydn-reference"

#: |metric - recorded|: an intermediate checkpoint scored this set identically to 1e-8 with AVX-512
#: kernels and with all libraries forced to AVX2; a decode bug moves them by far more (a flipped yaw
#: sign: NDS +0.03; see the README, "Reference model")
TOL = {"mAP": 0.01, "NDS": 0.01, "trans_err": 0.03}


def test_reference_model_is_shipped_with_its_metadata():
    assert NAME in list_reference_models()
    ref = get_reference_model(NAME)
    meta = ref.meta
    for key in ("preset", "command", "iterations", "seed", "mini_val", "regression_set", "sha256", "size_bytes"):
        assert key in meta, key
    assert meta["preset"] == "demo_raydn" and meta["iterations"] >= 10 * 1263   # >= 10x the demo's budget
    assert ref.verify().stat().st_size == meta["size_bytes"] < 8e6              # a few MB (fp16)
    sd = torch.load(ref.path, map_location="cpu", weights_only=True)["model"]
    floats = [v for v in sd.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)


def test_load_model_by_name_gives_an_fp32_model():
    from raydn.interop.convert import load_model
    model = load_model(NAME)
    assert model.preset == "demo_raydn"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resolve_checkpoint_paths_names_and_altered_files(tmp_path, monkeypatch):
    f = tmp_path / NAME          # an existing file of that name wins over the packaged model
    f.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint(NAME) == NAME
    assert resolve_checkpoint("no/such/file.pt") == "no/such/file.pt"   # the loader names it
    monkeypatch.chdir("/")
    assert resolve_checkpoint(NAME) == str(get_reference_model(NAME).path)
    # an altered copy of the weights: refused, naming both digests
    fake = tmp_path / "pkg"
    fake.mkdir()
    src = get_reference_model(NAME)
    shutil.copy(src.path.with_suffix(".json"), fake / src.path.with_suffix(".json").name)
    data = bytearray(src.path.read_bytes())
    data[len(data) // 2] ^= 0xFF                 # one byte flipped in the middle of the weights
    (fake / src.path.name).write_bytes(bytes(data))
    monkeypatch.setattr(weights, "WEIGHTS_DIR", fake)
    with pytest.raises(CheckpointError, match="sha256 .* its metadata records"):
        resolve_checkpoint(NAME)
    with pytest.raises(CheckpointError, match="unknown reference model 'nope'"):
        get_reference_model("nope")


@pytest.mark.slow
def test_reference_model_reproduces_its_recorded_metric_on_the_regression_set(tmp_path):
    from raydn.data.prepare import prepare_infos
    from raydn.data.synth import generate_world
    from raydn.engine.evaluate import EvalOptions, evaluate_checkpoint
    ref = get_reference_model(NAME)
    spec = ref.meta["regression_set"]
    root = generate_world(tmp_path / "world", workers=1, progress=False, **spec["world"])
    infos = prepare_infos(root, "v1.0-mini", tmp_path / "infos", progress=False)
    ev = evaluate_checkpoint(NAME, infos["val"], tmp_path / "eval", EvalOptions(
        dataroot=root, version="v1.0-mini", eval_set="mini_val", evaluator="fast", plots=False,
        score_without_nms=True, num_workers=0, progress=False))
    got, raw = ev.report.fast_metrics or ev.report.metrics, ev.raw_metrics
    want = spec["metrics"]
    report = json.dumps({"got": {"mAP": got["mean_ap"], "NDS": got["nd_score"],
                                 "trans_err": got["tp_errors"]["trans_err"]},
                         "want": {k: want[k] for k in ("mAP", "NDS")}})
    assert got["mean_ap"] > 0.2, report           # a model that works, not a recorded failure
    assert abs(got["mean_ap"] - want["mAP"]) <= TOL["mAP"], report
    assert abs(got["nd_score"] - want["NDS"]) <= TOL["NDS"], report
    assert abs(got["tp_errors"]["trans_err"] - want["tp_errors"]["trans_err"]) <= TOL["trans_err"], report
    assert abs(raw["mean_ap"] - want["without_nms"]["mAP"]) <= TOL["mAP"], report
    assert abs(raw["nd_score"] - want["without_nms"]["NDS"]) <= TOL["NDS"], report
