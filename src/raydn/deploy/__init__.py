"""Run a `raydn export` output with onnxruntime: :class:`OnnxDetector`.

Same streaming API as :class:`raydn.models.detector.RayDNDetector`::

    from raydn.deploy import OnnxDetector
    det = OnnxDetector("exported/")                 # encoder.onnx + head_step.onnx + raydn_onnx.json
    state = det.init_state(batch_size=1)           # TemporalState (torch tensors, zeros)
    for batch in frames:                           # raydn.core.batch.FrameBatch, one frame per slot
        detections, state = det.predict(batch, state)   # list of dicts: boxes (k, 9), scores, labels

The state is a :class:`~raydn.core.state.TemporalState` of CPU torch tensors with the PyTorch
model's layout and frames (float64 timestamps), so the two back ends can hand a stream to each
other. Shapes are those fixed at export (batch size, cameras, image size: ``self.metadata``);
anything else is rejected with a message naming the tensor. At load the two graphs and the metadata
are verified to be one export, unmodified (:mod:`raydn.deploy.verify`).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from raydn.core.batch import FrameBatch
from raydn.core.graph_contract import STATE_FIELDS, ExportError, head_step_inputs, read_metadata
from raydn.core.state import TemporalState
from raydn.deploy.verify import verify_export
from raydn.models.decode import apply_bev_nms

__all__ = ["OnnxDetector"]


def _ort():
    try:
        import onnxruntime  # optional: raydn[deploy]
    except ImportError:
        raise ExportError("the onnxruntime back end needs the package onnxruntime: "
                          "pip install -c constraints.txt -e '.[deploy]'") from None
    return onnxruntime


class OnnxDetector:
    """The two exported graphs driven over a stream (see the module docstring).

    Args:
        onnx_dir: a `raydn export` output directory.
        threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()``, so that both
            back ends use the same number); inter-op threads are 1 (sequential execution); idle
            threads wait passively (no spinning).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
    """

    def __init__(self, onnx_dir: str | os.PathLike, *, threads: int | None = None,
                 providers: list[str] | None = None):
        ort = _ort()
        self.onnx_dir = str(onnx_dir)
        self.metadata = meta = read_metadata(onnx_dir)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # passive waiting, as OMP_WAIT_POLICY=PASSIVE for torch: spinning intra-op threads steal
        # the cores from whatever runs next on a shared CPU (the data loader, PyTorch, ...)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]
        files = meta["files"]
        try:
            self.encoder = ort.InferenceSession(os.path.join(onnx_dir, files["encoder"]),
                                                so, providers=providers)
            self.head = ort.InferenceSession(os.path.join(onnx_dir, files["head_step"]),
                                             so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportError(f"{onnx_dir}: onnxruntime cannot load the graphs ({e})") from None
        verify_export(onnx_dir, meta, {"encoder": self.encoder, "head_step": self.head})
        self.batch_size = int(meta["batch_size"])
        self.num_cams = int(meta["num_cams"])
        self.image_size = tuple(meta["image_size"])
        self.class_names = tuple(meta["class_names"])
        self.preset = meta.get("preset")
        self._head_inputs = [i.name for i in self.head.get_inputs()]
        self._head_outputs = [o.name for o in self.head.get_outputs()]
        self._feat_names = [o.name for o in self.encoder.get_outputs()]
        self._specs = {s["name"]: s for s in meta["head_step"]["inputs"]}

    # ----------------------------------------------------------------------------- state
    def init_state(self, batch_size: int | None = None, device=None) -> TemporalState:
        """Fresh memory (zeros, CPU tensors) for ``batch_size`` slots (must equal the exported batch
        size; default it). ``device`` is accepted for signature compatibility with
        ``RayDNDetector.init_state`` and must be None or a CPU device."""
        if device is not None and torch.device(device).type != "cpu":
            raise ExportError(f"OnnxDetector keeps its state on the CPU, got device={device!r}")
        B = self.batch_size if batch_size is None else int(batch_size)
        if B != self.batch_size:
            raise ExportError(f"{self.onnx_dir}: exported for batch size {self.batch_size}, "
                              f"got {B} (re-export with --batch-size {B})")
        meta = self.metadata
        return TemporalState.zeros(B, int(meta["memory_len"]), int(meta["embed_dims"]))

    # ----------------------------------------------------------------------------- passes
    def _check(self, name: str, t) -> np.ndarray:
        spec = self._specs.get(name)
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        if spec is not None and list(a.shape) != spec["shape"]:
            raise ExportError(f"{name}: expected shape {tuple(spec['shape'])} (fixed at export: batch "
                              f"{self.batch_size}, {self.num_cams} cameras, image "
                              f"{self.image_size[0]}x{self.image_size[1]}), got {tuple(a.shape)}")
        return np.ascontiguousarray(a)

    def extract_feats(self, images: torch.Tensor) -> list[np.ndarray]:
        """images (B, N, 3, H, W) normalised -> the L levels (numpy float32)."""
        want = (self.batch_size, self.num_cams, 3, *self.image_size)
        if tuple(images.shape) != want:
            raise ExportError(f"images: expected shape {want} (fixed at export), got {tuple(images.shape)}")
        x = np.ascontiguousarray(images.detach().cpu().numpy().astype(np.float32, copy=False))
        return self.encoder.run(self._feat_names, {"images": x})

    def step(self, batch: FrameBatch, state: TemporalState | None,
             feats: list[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], TemporalState]:
        """One frame: all head-step outputs by name (numpy) and the next state."""
        if state is None:
            state = self.init_state(batch.batch_size)
        if feats is None:
            if batch.images is None:
                raise ExportError("FrameBatch.images is None: nothing to encode")
            feats = self.extract_feats(batch.images)
        args = head_step_inputs([torch.from_numpy(np.asarray(f)) for f in feats], batch, state)
        feed = {n: self._check(n, a) for n, a in zip(self._head_inputs, args)}
        outs = dict(zip(self._head_outputs, self.head.run(self._head_outputs, feed)))
        new = TemporalState(**{f: torch.from_numpy(outs[f"new_mem_{f}"]) for f in STATE_FIELDS})
        return outs, new

    def predict(self, batch: FrameBatch, state: TemporalState | None = None
                ) -> tuple[list[dict], TemporalState]:
        """Decoded detections per sample, as ``RayDNDetector.predict``: dicts with ``boxes`` (k, 9)
        LiDAR boxes (gravity centre), ``scores`` (k,), ``labels`` (k,) int64 (torch tensors)."""
        outs, new = self.step(batch, state)
        return self.detections(outs), new

    def detections(self, outs: dict[str, np.ndarray]) -> list[dict]:
        """The decoded detections of :meth:`step`'s outputs: the graph's fixed ``max_num`` rows
        cut to ``keep`` (centre range), then the class-wise BEV NMS when the exported model
        decodes with one (``metadata['nms_radius']``, as :func:`raydn.models.decode.decode_single`)."""
        radius = self.metadata.get("nms_radius")
        dets = []
        for b in range(outs["boxes"].shape[0]):  # per slot: ragged kept rows
            keep = outs["keep"][b]
            d = {"boxes": torch.from_numpy(outs["boxes"][b][keep]),
                 "scores": torch.from_numpy(outs["scores"][b][keep]),
                 "labels": torch.from_numpy(outs["labels"][b][keep].astype(np.int64))}
            if "query" in outs:  # exports from raydn >= the query-id outputs
                d["query"] = torch.from_numpy(outs["query"][b][keep].astype(np.int64))
            dets.append(d if radius is None else apply_bev_nms(d, radius))
        return dets

    def __repr__(self) -> str:
        return (f"OnnxDetector({self.onnx_dir!r}, preset={self.preset!r}, batch={self.batch_size}, "
                f"cams={self.num_cams}, image={self.image_size[0]}x{self.image_size[1]})")
