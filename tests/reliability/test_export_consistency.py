"""An exported graph set is one export or it does not load (issue 17): ``raydn.deploy.OnnxDetector``
verifies the fingerprint written by ``raydn export`` (export id + metadata copy in each graph's
``metadata_props``, each graph's sha256 in ``raydn_onnx.json``) and the metadata against the graphs'
real input shapes. A graph of another export (an encoder from one, a head from another: it runs,
with garbage boxes), a modified graph, an edited metadata field (camera count, image size, preset,
class names, ...) are refused with one line naming the file and the field; ``raydn infer`` refuses
``--checkpoint`` with ``--backend onnxruntime`` (it would be ignored) and a ``--preset`` other than
the export's. Two tiny exports without parity check (module fixture, ~15 s each)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from _deps import require

require("onnxruntime")
require("onnxscript")

from raydn.cli import main  # noqa: E402
from raydn.interop.export import (  # noqa: E402
    ENCODER_FILE, HEAD_FILE, META_FILE, PROP_EXPORT_ID, ExportError, export_onnx, file_sha256,
)
from raydn.models.options import RuntimeOptions  # noqa: E402
from raydn.presets import build_model  # noqa: E402

PRESET = "tiny_raydn"


def _export(root, seed):
    torch.manual_seed(seed)
    model = build_model(PRESET, options=RuntimeOptions.for_export())
    out = root / f"export_{seed}"
    export_onnx(model, out, preset=PRESET)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two exports of the same preset (same shapes) with different weights."""
    root = tmp_path_factory.mktemp("exports")
    return _export(root, 1), _export(root, 2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_meta(d, edit):
    meta = json.loads((d / META_FILE).read_text())
    edit(meta)
    (d / META_FILE).write_text(json.dumps(meta, indent=1))


def _detector(d):
    from raydn.deploy import OnnxDetector
    return OnnxDetector(d, threads=1)


def test_an_intact_export_loads_and_carries_its_fingerprint(exports):
    import onnxruntime as ort
    a, b = exports
    meta_a, meta_b = (json.loads((d / META_FILE).read_text()) for d in (a, b))
    assert meta_a["export_id"] != meta_b["export_id"]
    for role, name in (("encoder", ENCODER_FILE), ("head_step", HEAD_FILE)):
        assert meta_a["sha256"][role] == file_sha256(a / name) != meta_b["sha256"][role]
        sess = ort.InferenceSession(str(a / name), providers=["CPUExecutionProvider"])
        assert sess.get_modelmeta().custom_metadata_map[PROP_EXPORT_ID] == meta_a["export_id"]
    det = _detector(a)
    assert det.num_cams == 6 and det.image_size == (128, 352) and det.preset == PRESET


@pytest.mark.parametrize("foreign", [ENCODER_FILE, HEAD_FILE, META_FILE])
def test_files_of_two_exports_are_refused_naming_the_file(exports, tmp_path, foreign):
    a, b = exports
    mixed = _copy(a, tmp_path / "mixed")
    shutil.copy(b / foreign, mixed / foreign)
    # a foreign metadata file: the first graph checked (the encoder) is the one that disagrees
    named = ENCODER_FILE if foreign == META_FILE else foreign
    with pytest.raises(ExportError, match=rf"{named}: comes from another export .* use the graphs and "
                                          rf"{META_FILE} of one `raydn export` output together"):
        _detector(mixed)


def test_raydn_infer_refuses_a_mixed_export_in_one_line(exports, tmp_path, capsys):
    a, b = exports
    mixed = _copy(a, tmp_path / "mixed")
    shutil.copy(b / ENCODER_FILE, mixed / ENCODER_FILE)
    out = tmp_path / "dets.jsonl"
    rc = main(["infer", "--backend", "onnxruntime", "--onnx", str(mixed), "--dataroot",
               str(tmp_path / "no_data"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("raydn infer: error: ") and len(err.strip().splitlines()) == 1
    assert ENCODER_FILE in err and "another export" in err
    assert not out.exists()


def test_a_graph_modified_after_export_is_refused(exports, tmp_path):
    import onnx
    from onnx import numpy_helper
    a, _ = exports
    d = _copy(a, tmp_path / "modified")
    model = onnx.load(str(d / HEAD_FILE))                 # keeps metadata_props (the export id)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(d / HEAD_FILE))
    with pytest.raises(ExportError, match=rf"{HEAD_FILE}: modified after export \(sha256 "):
        _detector(d)


def _set(path, value):
    def edit(meta):
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    # headline fields: checked against the onnxruntime sessions' real input shapes
    (_set(["num_cams"], 5), r"num_cams is 5 but encoder\.onnx has 6 \(input images \[1, 6, 3, 128, 352\]\)"),
    (_set(["image_size"], [256, 704]), r"image_size is \[256, 704\] but encoder\.onnx has \[128, 352\]"),
    (_set(["batch_size"], 2), r"batch_size is 2 but encoder\.onnx has 1"),
    (_set(["memory_len"], 128), r"memory_len is 128 but head_step\.onnx has 64"),
    (_set(["class_names"], ["car"] * 9), r"class_names lists .* but head_step\.onnx scores 10 classes"),
    (_set(["head_step", "inputs", 4, "shape"], [1, 5, 4, 4]),
     r"head_step\.inputs\[4\] is .*\[1, 5, 4, 4\].* but head_step\.onnx has .*\[1, 6, 4, 4\]"),
    # any other field: against the copy each graph carries
    (_set(["preset"], "r50_raydn"), r"preset is 'r50_raydn' but encoder\.onnx was exported with 'tiny_raydn'"),
    (_set(["class_names", 0], "truck"), r"class_names\[0\] is 'truck' but encoder\.onnx was exported with 'car'"),
    (_set(["img_mean", 0], 0.0), r"img_mean\[0\] is 0\.0 but encoder\.onnx was exported with 123\.675"),
    (_set(["post_center_range", 0], -10.0), r"post_center_range\[0\] is -10\.0 but encoder\.onnx"),
    (_set(["options", "sampler"], "fused"), r"options\.sampler is 'fused' but encoder\.onnx was exported "
                                            r"with 'grid_sample'"),
], ids=["num_cams", "image_size", "batch_size", "memory_len", "class_count", "input_shape", "preset",
        "class_name", "img_mean", "post_center_range", "options"])
def test_an_edited_metadata_field_is_named_with_both_values(exports, tmp_path, edit, message):
    a, _ = exports
    d = _copy(a, tmp_path / "edited")
    _edit_meta(d, edit)
    with pytest.raises(ExportError, match=rf"raydn_onnx\.json: {message}"):
        _detector(d)


@pytest.mark.parametrize("edit, message", [
    (_set(["format"], "raydn-onnx/1"), r"format 'raydn-onnx/1', expected 'raydn-onnx/2' \(an older raydn's export"),
    (lambda m: m.pop("sha256"), r"no graph fingerprint"),
    (_set(["export_id"], None), r"no graph fingerprint"),
], ids=["old_format", "no_sha256", "no_export_id"])
def test_metadata_without_a_fingerprint_is_refused(exports, tmp_path, edit, message):
    a, _ = exports
    d = _copy(a, tmp_path / "old")
    _edit_meta(d, edit)
    with pytest.raises(ExportError, match=message):
        _detector(d)


def test_infer_refuses_a_checkpoint_with_the_onnxruntime_backend(tmp_path, capsys):
    """--checkpoint would be silently ignored (the graphs carry their own weights)."""
    base = ["--dataroot", str(tmp_path / "no_data"), "--out", str(tmp_path / "d.jsonl")]
    rc = main(["infer", "--backend", "onnxruntime", "--onnx", str(tmp_path), "--checkpoint",
               str(tmp_path / "model.pt"), *base])
    assert rc == 2 and "--checkpoint goes with --backend torch" in capsys.readouterr().err
    rc = main(["infer", "--checkpoint", str(tmp_path / "model.pt"), "--onnx", str(tmp_path), *base])
    assert rc == 2 and "--onnx DIR goes with --backend onnxruntime" in capsys.readouterr().err


def test_infer_refuses_a_preset_other_than_the_exports(exports, tmp_path, capsys):
    a, _ = exports
    rc = main(["infer", "--backend", "onnxruntime", "--onnx", str(a), "--preset", "r50_raydn",
               "--dataroot", str(tmp_path / "no_data"), "--out", str(tmp_path / "d.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "is preset 'tiny_raydn' but preset 'r50_raydn' was requested" in err
