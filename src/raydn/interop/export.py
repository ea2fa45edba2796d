"""ONNX export of a detector as two graphs: the image encoder and one streaming step of the head.

``export_onnx(model, out_dir)`` writes into ``out_dir``:

* ``encoder.onnx``: backbone + neck, ``images`` (B, N, 3, H, W) float32 normalised RGB ->
  ``feat_0`` .. ``feat_{L-1}`` (B, N, C, H_l, W_l) float32 (the levels the head reads);
* ``head_step.onnx``: one frame of the head with the temporal memory as explicit inputs and
  outputs (:data:`HEAD_INPUTS` -> :data:`HEAD_OUTPUTS`): features + calibration + pose +
  timestamp + ``prev_exists`` + the five :class:`~raydn.core.state.TemporalState` tensors in ->
  decoded detections (fixed top-``max_num`` with a ``keep`` mask), the raw last-layer logits and
  boxes, and the next state out;
* ``raydn_onnx.json``: the model-file metadata (:data:`EXPORT_FORMAT`): preset, input size, mean /
  std, class names, batch size, memory sizes, decode settings, and every graph input / output
  with its shape, dtype and meaning. Written last: a directory with this file is complete.

**Fingerprint** (one export's three files belong together): every export gets a random
``export_id``; each graph carries it and a copy of the metadata in its ONNX ``metadata_props``
(:data:`PROP_EXPORT_ID`, :data:`PROP_METADATA`), and the metadata records each graph's sha256
(``sha256``: role -> hex digest). ``raydn.deploy.OnnxDetector`` verifies all three at load
(:mod:`raydn.deploy.verify`): a graph from another export, a modified graph or an edited metadata
field (camera count, image size, ...) is refused with a message naming the file and field.

Contract decisions (documented in the README, "Export and deployment"):

* **Timestamps stay float64 across the boundary** (``timestamp`` (B,) and ``mem_timestamp``
  (B, M, 1) are ``tensor(double)``): absolute nuScenes timestamps are ~1.5e9 s, where float32's
  resolution is 128 s; the model does all its time arithmetic in float64 (age = t_now - t_insert)
  and casts only the small ages to float32, and the exported graph does exactly the same, so no
  precision is lost and the state stays interchangeable with the PyTorch model's.
* Shapes are static: batch size (``--batch-size``, default 1), cameras N = ``head.num_cams``,
  image size = the preset's ``image_size`` (the head's ``pad_shape``) are fixed at export.
* The step graph decodes with :func:`raydn.models.decode.decode_dense` (fixed ``max_num`` rows +
  ``keep``); ``raydn.deploy.OnnxDetector`` applies the mask to give exactly
  ``RayDNDetector.predict``'s per-sample dicts.
* The model is exported with :meth:`RuntimeOptions.for_export` paths (the plain ``grid_sample``
  deformable sampler, unfolded BN, contiguous layout): the library's fused sampling op is a custom
  autograd function no exporter traces. Same maths up to float rounding (parity is tested against
  the default fast-path model).
* Exporter: ``torch.onnx.export(dynamo=True)`` (onnxscript), opset 18, weights inside each .onnx.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from raydn.core.batch import FrameBatch
from raydn.core.graph_contract import (
    ENCODER_FILE, EXPORT_FORMAT, HEAD_FILE, HEAD_INPUTS, HEAD_OUTPUTS, META_FILE, PROP_EXPORT_ID,
    PROP_METADATA, STATE_FIELDS, UNSIGNED_FIELDS, ExportError, file_sha256, head_step_inputs,
    read_metadata,
)
from raydn.core.state import TemporalState
from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.deploy import OnnxDetector
from raydn.errors import CheckpointError
from raydn.geometry import CLASS_NAMES
from raydn.interop.convert import load_model
from raydn.io import atomic_write_json
from raydn.models.decode import decode_dense
from raydn.models.deformable import deformable_sample_gather
from raydn.models.deformable_fast import deformable_sample_fused
from raydn.models.options import RuntimeOptions
from raydn.models.transformer import DeformableFeatureAggregation
from raydn.presets import build_model, get_preset

__all__ = ["EXPORT_FORMAT", "ENCODER_FILE", "HEAD_FILE", "META_FILE", "HEAD_INPUTS", "HEAD_OUTPUTS",
           "STATE_FIELDS", "PROP_EXPORT_ID", "PROP_METADATA", "UNSIGNED_FIELDS", "ExportError",
           "EncoderGraph", "HeadStepGraph", "export_onnx", "read_metadata", "file_sha256",
           "head_step_inputs", "ExportReport", "check_parity", "export_model"]
# The graph contract (names above, from raydn.core.graph_contract) is re-exported: the writer's API.

#: ONNX opset of the exported graphs.
OPSET = 18


# ---------------------------------------------------------------------------------- graph modules
class EncoderGraph(nn.Module):
    """images (B, N, 3, H, W) normalised -> tuple of L levels (B, N, C, H_l, W_l) (eval mode)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.extract_feats(images))


class HeadStepGraph(nn.Module):
    """One streaming frame of ``model.pts_bbox_head`` as a function of plain tensors.

    ``forward(feat_0, .., feat_{L-1}, *HEAD_INPUTS)`` -> the :data:`HEAD_OUTPUTS` tuple. The
    frame's ``pad_shape`` is the model's ``image_size`` (fixed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.pts_bbox_head
        self.cfg = model.cfg
        self.num_levels = model.cfg.head.num_levels

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        L = self.num_levels
        feats = list(args[:L])
        (intrinsics, extrinsics, lidar2img, ego_pose, ego_pose_inv, timestamp, prev_exists,
         *mem) = args[L:]
        batch = FrameBatch(images=None, intrinsics=intrinsics, extrinsics=extrinsics,
                           lidar2img=lidar2img, ego_pose=ego_pose, ego_pose_inv=ego_pose_inv,
                           timestamp=timestamp, prev_exists=prev_exists,
                           pad_shape=tuple(self.cfg.image_size))
        state = TemporalState(*mem)
        out, new = self.head(feats, batch, state)
        cls, box = out["all_cls_scores"][-1], out["all_bbox_preds"][-1]
        hc = self.cfg.head
        boxes, scores, labels, keep, query = decode_dense(cls, box, hc.max_num, hc.post_center_range,
                                                          with_query=True)
        return (boxes, scores, labels, keep, cls, box, query, out["memory_index"],
                *(getattr(new, f) for f in STATE_FIELDS))


# ---------------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote."""
    out_dir: str
    files: dict = field(default_factory=dict)        # role -> path
    metadata: dict = field(default_factory=dict)
    parity: dict | None = None                        # filled by check_parity when run

    def summary(self) -> str:
        lines = [f"exported {self.metadata.get('preset')} to {self.out_dir}"]
        for role, p in self.files.items():
            lines.append(f"  {role:<9s} {p} ({os.path.getsize(p) / 2 ** 20:.1f} MiB)")
        if self.parity is not None:
            p = self.parity
            lines.append(f"  parity vs PyTorch over {p['frames']} frames (prev_exists "
                         f"{p['prev_exists']}): {'OK' if p['ok'] else 'FAILED'}, max error "
                         f"{p['max_err']:.2e} (absolute, relative above magnitude 1; tolerance "
                         f"{p['tolerance']:.0e} or 2x PyTorch float32's own error vs float64)")
            for name, e in sorted(p["per_output"].items(), key=lambda kv: -kv[1])[:4]:
                fl = p["float32_floor"].get(name)
                lines.append(f"    {name:<24s} {e:.2e}" + (f"   float32 floor {fl:.2e}" if fl is not None else ""))
        return "\n".join(lines)


def _require_exporter() -> None:
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ExportError(f"ONNX export needs the packages {', '.join(missing)}: "
                          f"pip install -c constraints.txt -e '.[deploy]'")


def _spec(name: str, t: Tensor) -> dict:
    return {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def _example_frame(model: nn.Module, batch_size: int, frame_index: int = 1):
    return synthetic_frame_batch(batch_size, tuple(model.cfg.image_size), frame_index=frame_index,
                                 prev_exists=[1.0] * batch_size, num_boxes=0, with_targets=False,
                                 seed=0)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs one warning per missing torchvision op and per skipped constant fold:
    noise for this model (it uses neither). Real failures still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names, output_names,
                 props: dict[str, str]) -> None:
    """Export ``module`` to ``path`` with ``props`` added to the model's ``metadata_props``."""
    with _quiet_exporter():
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                 input_names=list(input_names), output_names=list(output_names),
                                 external_data=False, optimize=True, verbose=False)
        prog.model.metadata_props.update(props)
        prog.save(str(path))


def _check_traceable(model: nn.Module) -> None:
    """Raise ExportError when ``model`` uses a deformable sampler that ONNX exporters cannot trace."""
    for m in model.modules():
        if isinstance(m, DeformableFeatureAggregation) and m.sampler in (
                deformable_sample_fused, deformable_sample_gather):
            raise ExportError("the model uses the fused/gather deformable sampler, which ONNX "
                              "exporters cannot trace: build it with "
                              "options=RuntimeOptions.for_export() (the grid_sample sampler)")


def _export_metadata(model: nn.Module, batch_size: int, *, preset: str | None, source: str | None,
                     encoder_io: tuple, head_io: tuple) -> dict:
    """The ``metadata.json`` of an export (before the graphs' sha256 are added): the model's sizes,
    normalisation, options and the spec of every graph input/output. ``encoder_io`` = (images,
    feature names, features); ``head_io`` = (input names, inputs, output names, outputs)."""
    cfg = model.cfg
    L = cfg.head.num_levels
    images, feat_names, feats = encoder_io
    head_in_names, head_args, head_out_names, head_out = head_io
    meaning_in = dict(HEAD_INPUTS)
    meaning_out = dict(HEAD_OUTPUTS)
    meta = {
        "format": EXPORT_FORMAT,
        "export_id": uuid.uuid4().hex,
        "preset": preset or getattr(model, "preset", None),
        "source": None if source is None else str(source),
        "raydn_version": __import__("raydn").__version__,
        "torch_version": torch.__version__,
        "opset": OPSET,
        "batch_size": batch_size,
        "num_cams": cfg.head.num_cams,
        "image_size": list(cfg.image_size),
        "img_mean": list(cfg.img_mean), "img_std": list(cfg.img_std),
        "image_normalisation": "RGB, (pixel - img_mean) / img_std, pixels in 0..255",
        "class_names": list(CLASS_NAMES[:cfg.head.num_classes]),
        "num_levels": L, "memory_len": cfg.head.memory_len, "embed_dims": cfg.head.embed_dims,
        "num_query": cfg.head.num_query, "num_propagated": cfg.head.num_propagated,
        "topk_proposals": cfg.head.topk_proposals,
        "max_num": cfg.head.max_num, "post_center_range": list(cfg.head.post_center_range),
        "nms_radius": None if cfg.head.nms_radius is None else list(cfg.head.nms_radius),
        "pc_range": list(cfg.head.pc_range),
        "timestamps": "float64 seconds in and out (timestamp, mem_timestamp); never float32",
        "options": {k: (str(v) if isinstance(v, torch.dtype) else v)
                    for k, v in asdict(model.options).items()},
        "files": {"encoder": ENCODER_FILE, "head_step": HEAD_FILE},
        "encoder": {"inputs": [dict(_spec("images", images),
                                    meaning="(B, N, 3, H, W) float32 normalised RGB")],
                    "outputs": [dict(_spec(n, f), meaning="(B, N, C, H_l, W_l) float32")
                                for n, f in zip(feat_names, feats)]},
        "head_step": {
            "inputs": [dict(_spec(n, t), meaning=meaning_in.get(n, "(B, N, C, H_l, W_l) float32, "
                                                                  "the encoder's output"))
                       for n, t in zip(head_in_names, head_args)],
            "outputs": [dict(_spec(n, t), meaning=meaning_out[n])
                        for n, t in zip(head_out_names, head_out)]},
    }
    return meta


def export_onnx(model: nn.Module, out_dir: str | os.PathLike, *, batch_size: int = 1,
                preset: str | None = None, source: str | None = None) -> ExportReport:
    """Export ``model`` (a :class:`~raydn.models.detector.RayDNDetector`, any options: it is
    exported as built, so build it with ``RuntimeOptions.for_export()``; the fused sampler is
    rejected) as :data:`ENCODER_FILE` + :data:`HEAD_FILE` + :data:`META_FILE` in ``out_dir``.

    Every file is written to a temporary directory beside ``out_dir`` first and renamed into place
    (metadata last). ``source`` (checkpoint path) is recorded in the metadata."""
    _require_exporter()
    if batch_size < 1:
        raise ExportError(f"batch_size must be >= 1, got {batch_size}")
    _check_traceable(model)
    model = model.eval()
    cfg = model.cfg
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = _example_frame(model, batch_size)
    state = model.init_state(batch_size, device=torch.device("cpu"))
    L = cfg.head.num_levels
    with torch.no_grad():
        feats = model.extract_feats(batch.images)
        head_args = head_step_inputs(feats, batch, state)
        head_out = HeadStepGraph(model)(*head_args)
    feat_names = [f"feat_{i}" for i in range(L)]
    head_in_names = feat_names + [n for n, _ in HEAD_INPUTS]
    head_out_names = [n for n, _ in HEAD_OUTPUTS]
    tmp = Path(tempfile.mkdtemp(prefix=".raydn-export-", dir=out_dir))
    try:
        meta = _export_metadata(model, batch_size, preset=preset, source=source,
                                encoder_io=(batch.images, feat_names, feats),
                                head_io=(head_in_names, head_args, head_out_names, head_out))
        # the fingerprint: each graph carries the export id and the metadata it belongs to; the
        # metadata records each graph's sha256 (checked by raydn.deploy.verify at load)
        props = {PROP_EXPORT_ID: meta["export_id"], PROP_METADATA: json.dumps(meta, sort_keys=True)}
        _onnx_export(EncoderGraph(model), (batch.images,), tmp / ENCODER_FILE, ["images"], feat_names,
                     props)
        _onnx_export(HeadStepGraph(model), head_args, tmp / HEAD_FILE, head_in_names, head_out_names,
                     props)
        meta["sha256"] = {role: file_sha256(tmp / name) for role, name in meta["files"].items()}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        files = {}
        (out_dir / META_FILE).unlink(missing_ok=True)   # no stale metadata over new graphs
        for role, name in (("encoder", ENCODER_FILE), ("head_step", HEAD_FILE), ("metadata", META_FILE)):
            os.replace(tmp / name, out_dir / name)
            files[role] = str(out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(out_dir=str(out_dir), files=files, metadata=meta)


# ---------------------------------------------------------------------------------- parity
#: Default sequence of the parity check: a start, two continued frames, a reset, a continued frame.
PARITY_PREV_EXISTS = (0.0, 1.0, 1.0, 0.0, 1.0)


def _err(a, b) -> float:
    """max |a - b| / max(1, |b|): absolute below magnitude 1, relative above (global-frame memory
    points are ~1e3 m, timestamps ~1.5e9 s, where float32 / float64 ulps exceed 1e-4 absolute)."""
    a = torch.as_tensor(a).double()
    b = torch.as_tensor(b).double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


def _double_batch(batch: FrameBatch) -> FrameBatch:
    return replace(batch, **{k: getattr(batch, k).double() for k in
                              ("intrinsics", "extrinsics", "lidar2img", "ego_pose", "ego_pose_inv")})


def _untied(scores: Tensor, gap: float = 1e-5) -> Tensor:
    """(B, k) descending scores -> bool mask of rows not within ``gap`` of a neighbour (tied rows
    may legitimately come out in another order)."""
    one = torch.ones_like(scores[:, :1])
    d = scores[:, :-1] - scores[:, 1:]
    return torch.minimum(torch.cat([one, d], 1), torch.cat([d, one], 1)) > gap


def _state_rows(cls: Tensor, K: int, M: int, gap: float = 1e-5) -> Tensor:
    """(B, M) bool: the next state's rows that are unambiguous: the K rows written this frame are
    the top-K queries by max sigmoid score, so a row whose score ties (to ``gap``) with its
    neighbour (or with the first query left out) may come out in another order; the other
    M - K rows are the incoming memory shifted, always compared."""
    s = cls.sigmoid().amax(-1).sort(dim=1, descending=True).values[:, :K + 1]
    new = _untied(s, gap)[:, :K]
    return torch.cat([new, torch.ones(cls.shape[0], M - K, dtype=torch.bool)], 1)


def _compare_decoded(worst: dict, prefix: str, outs: dict, dense) -> None:
    untied = _untied(dense[1])
    _upd(worst, prefix + "scores", _err(outs["scores"], dense[1]))
    _upd(worst, prefix + "boxes", _err(torch.as_tensor(outs["boxes"])[untied], dense[0][untied]))
    for name, ref in (("labels", dense[2]), ("keep", dense[3])):
        diff = torch.as_tensor(outs[name])[untied] != ref[untied]
        _upd(worst, prefix + name, float(diff.float().mean()) if diff.numel() else 0.0)


def _upd(d: dict, name: str, v: float) -> None:
    d[name] = max(d.get(name, 0.0), v)


def _reference_step(reference: nn.Module, head64: nn.Module, batch: FrameBatch, state: TemporalState,
                    floor: dict[str, float]) -> tuple[list[Tensor], Tensor, Tensor, TemporalState]:
    """One frame through the PyTorch ``reference`` (float32) and its float64 head copy ``head64``
    (same features and state in); raises ``floor[name]`` to float32's distance to the float64
    result. Returns ``(feats, cls_logits, bbox_preds, next state)`` of the float32 model (last
    decoder layer)."""
    with torch.no_grad():
        feats = reference.extract_feats(batch.images)
        out64, st64 = head64([f.double() for f in feats], _double_batch(batch),
                             TemporalState(**{k: v.double() for k, v in state.as_dict().items()}))
        out, st_next = reference.pts_bbox_head(feats, batch, state)
    cls, box = out["all_cls_scores"][-1], out["all_bbox_preds"][-1]
    _upd(floor, "cls_logits", _err(cls, out64["all_cls_scores"][-1]))
    _upd(floor, "bbox_preds", _err(box, out64["all_bbox_preds"][-1]))
    for f in STATE_FIELDS:
        _upd(floor, f"new_mem_{f}", _err(getattr(st_next, f), getattr(st64, f)))
    floor["boxes"] = floor["stream_boxes"] = max(floor.get("boxes", 0.0), floor["bbox_preds"])
    return feats, cls, box, st_next


def _failed_outputs(worst: dict[str, float], floor: dict[str, float], tolerance: float) -> dict:
    """``{name: error}`` of the outputs over their limit: 0 for ``labels`` / ``keep`` (exact), else
    ``max(tolerance, 2 * float32 floor)``."""
    failed = {}
    for name, e in worst.items():
        exact = name.endswith("labels") or name.endswith("keep")
        limit = 0.0 if exact else max(tolerance, 2.0 * floor.get(name, 0.0))
        if e > limit:
            failed[name] = e
    return failed


def check_parity(reference: nn.Module, onnx_dir: str | os.PathLike, *,
                 prev_exists=PARITY_PREV_EXISTS, tolerance: float = 1e-4, seed: int = 0,
                 threads: int | None = None) -> dict:
    """Run synthetic frames (6 cameras, a moving ego ~1.6 km from the global origin, absolute
    timestamps ~1.5e9 s; ``prev_exists`` per frame, 0 = memory reset) through the PyTorch
    ``reference`` model and the exported graphs and compare, per frame:

    * the encoder: ``feat_*`` (same images in);
    * one head step with the SAME inputs (PyTorch's features and incoming state): every output,
      row by row: ``cls_logits``, ``bbox_preds``, ``scores``, ``boxes``, ``labels``, ``keep``,
      ``new_mem_*`` — the graph contract (state rows written from queries whose scores tie within
      1e-5 are left out: top-K may order exact-rounding ties either way, see :func:`_state_rows`);
    * the stream: the graphs carry their OWN state from frame to frame (what deployment does):
      the decoded detections ``stream_scores`` / ``stream_boxes`` / ``stream_labels`` /
      ``stream_keep``. (The state itself is not compared row by row here: memory rows whose scores
      tie within rounding may be written in another order, which permutes the next frame's
      propagated queries without changing its detections.)

    Error measure :func:`_err` (absolute below magnitude 1, relative above); ``labels`` /
    ``keep``: the fraction of differing entries among rows not tied in score to 1e-5. Some outputs
    are ill-conditioned in float32 whatever the runtime: memory points are global coordinates
    (~1.6e3 m, float32 ulp 1.2e-4 m) re-projected every frame, and key points near a camera's
    image plane amplify rounding through the perspective division. So each step also runs a
    float64 copy of the head (same inputs): ``float32_floor[name]`` is PyTorch float32's own
    distance to that exact result. An output passes when its error is ``<= tolerance`` or
    ``<= 2 * floor``; labels and keep must match exactly.

    Returns ``{"frames", "prev_exists", "tolerance", "max_err", "per_output", "float32_floor",
    "failed", "ok"}``."""
    det = OnnxDetector(onnx_dir, threads=threads)
    reference = reference.eval()
    head64 = copy.deepcopy(reference.pts_bbox_head).double()
    B = det.batch_size
    cfg = reference.cfg
    st_pt = reference.init_state(B, device=torch.device("cpu"))
    st_ox = det.init_state(B)
    worst: dict[str, float] = {}
    floor: dict[str, float] = {}
    for i, pe in enumerate(prev_exists):
        batch = synthetic_frame_batch(B, tuple(cfg.image_size), frame_index=i,
                                      prev_exists=[float(pe)] * B, num_boxes=0,
                                      with_targets=False, seed=seed)
        st_in = st_pt
        feats, cls, box, st_pt = _reference_step(reference, head64, batch, st_in, floor)
        dense = decode_dense(cls, box, cfg.head.max_num, cfg.head.post_center_range)
        # encoder
        ox_feats = det.extract_feats(batch.images)
        for j, (a, b) in enumerate(zip(ox_feats, feats)):
            _upd(worst, f"feat_{j}", _err(a, b))
        # one step, same inputs
        outs, st1 = det.step(batch, st_in, feats=[f.numpy() for f in feats])
        _upd(worst, "cls_logits", _err(outs["cls_logits"], cls))
        _upd(worst, "bbox_preds", _err(outs["bbox_preds"], box))
        _compare_decoded(worst, "", outs, dense)
        rows = _state_rows(cls, cfg.head.topk_proposals, cfg.head.memory_len)
        for f in STATE_FIELDS:
            _upd(worst, f"new_mem_{f}", _err(getattr(st1, f)[rows], getattr(st_pt, f)[rows]))
        # the stream: own features, own state
        outs_s, st_ox = det.step(batch, st_ox, feats=ox_feats)
        _compare_decoded(worst, "stream_", outs_s, dense)
    failed = _failed_outputs(worst, floor, tolerance)
    return {"frames": len(prev_exists), "prev_exists": [float(p) for p in prev_exists],
            "tolerance": tolerance, "max_err": max(worst.values()), "per_output": worst,
            "float32_floor": floor, "failed": failed, "ok": not failed}


def export_model(out_dir: str | os.PathLike, *, checkpoint: str | None = None,
                 preset: str | None = None, batch_size: int = 1, check: bool = True,
                 seed: int = 0, trust: bool = False, tolerance: float = 1e-4) -> ExportReport:
    """Build (from ``checkpoint``, or ``preset`` with seeded random weights), export and, when
    ``check``, verify against the default PyTorch model (fast paths, same weights); the parity
    figures are added to the metadata (rewritten atomically). Raises :class:`CheckpointError` /
    :class:`ExportError` with a clear message; a failed parity check raises :class:`ExportError`
    after the files are written (they stay for inspection)."""
    if checkpoint is None and preset is None:
        raise ExportError("give a checkpoint (--checkpoint) or a preset (--preset) to export")
    if preset is not None:
        try:
            get_preset(preset)
        except KeyError as e:
            raise ExportError(e.args[0]) from None
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"{checkpoint}: no such checkpoint file")
        model = load_model(checkpoint, preset, trust=trust, options=RuntimeOptions.for_export())
    else:
        torch.manual_seed(seed)
        model = build_model(preset, options=RuntimeOptions.for_export())
    name = model.preset
    model.eval()
    report = export_onnx(model, out_dir, batch_size=batch_size, preset=name, source=checkpoint)
    if check:
        reference = build_model(name).eval()           # the library defaults (fused sampler, ...)
        reference.load_state_dict(model.state_dict())
        report.parity = check_parity(reference, out_dir, tolerance=tolerance)
        meta = dict(report.metadata, parity=report.parity)
        atomic_write_json(Path(out_dir) / META_FILE, meta, indent=1)
        report.metadata = meta
        if not report.parity["ok"]:
            bad = ", ".join(f"{k} {v:.2e} (float32 floor {report.parity['float32_floor'].get(k, 0):.1e})"
                            for k, v in report.parity["failed"].items())
            raise ExportError(f"{out_dir}: onnxruntime differs from PyTorch: {bad} "
                              f"(tolerance {tolerance:.0e} or 2x the floor)")
    return report
