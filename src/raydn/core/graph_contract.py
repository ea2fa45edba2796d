"""The exported graph contract: what ``raydn export`` writes and ``raydn.deploy`` reads.

An export directory holds ``encoder.onnx`` (``images`` (B, N, 3, H, W) float32 normalised RGB ->
``feat_0`` .. ``feat_{L-1}``), ``head_step.onnx`` (the L feature levels + :data:`HEAD_INPUTS` ->
:data:`HEAD_OUTPUTS`) and the metadata ``raydn_onnx.json`` (:data:`EXPORT_FORMAT`; schema checked by
:func:`read_metadata`). Each graph carries the export id and a copy of the metadata in its ONNX
``metadata_props`` (:data:`PROP_EXPORT_ID`, :data:`PROP_METADATA`); the metadata records each graph's
sha256. The writer is :mod:`raydn.interop.export`, the reader :mod:`raydn.deploy`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from raydn.core.files import file_sha256  # re-exported: export / deploy import it from here
from raydn.errors import RaydnError

__all__ = ["EXPORT_FORMAT", "ENCODER_FILE", "HEAD_FILE", "META_FILE", "HEAD_INPUTS", "HEAD_OUTPUTS",
           "STATE_FIELDS", "PROP_EXPORT_ID", "PROP_METADATA", "UNSIGNED_FIELDS", "ExportError",
           "head_step_inputs", "read_metadata", "file_sha256"]

#: /2: the metadata carries ``export_id`` and ``sha256``, the graphs ``metadata_props`` (fingerprint).
EXPORT_FORMAT = "raydn-onnx/2"
ENCODER_FILE = "encoder.onnx"
HEAD_FILE = "head_step.onnx"
META_FILE = "raydn_onnx.json"
#: ONNX ``metadata_props`` keys of each graph: the export id, and the metadata (JSON) it was exported with.
PROP_EXPORT_ID = "raydn_export_id"
PROP_METADATA = "raydn_metadata"
#: Metadata fields added after the graphs were written (not part of the copy inside them).
UNSIGNED_FIELDS = ("sha256", "parity")

#: The TemporalState fields in graph order; graph names are ``mem_<field>`` / ``new_mem_<field>``.
STATE_FIELDS = ("embedding", "reference_point", "timestamp", "egopose", "velo")

#: Head-step inputs after the L feature levels ``feat_0..feat_{L-1}`` (name, meaning).
HEAD_INPUTS = (
    ("intrinsics", "(B, N, 4, 4) float32: 4x4 viewpad with the 3x3 K of the network input (pixels)"),
    ("extrinsics", "(B, N, 4, 4) float32: LiDAR -> camera"),
    ("lidar2img", "(B, N, 4, 4) float32: LiDAR -> pixel x depth of the network input"),
    ("ego_pose", "(B, 4, 4) float32: LiDAR -> global (metres)"),
    ("ego_pose_inv", "(B, 4, 4) float32: global -> LiDAR"),
    ("timestamp", "(B,) float64: seconds (absolute; the graph subtracts in float64)"),
    ("prev_exists", "(B,) float32: 1 = continue the slot's sequence, 0 = reset its memory"),
    ("mem_embedding", "(B, M, C) float32: memory query features"),
    ("mem_reference_point", "(B, M, 3) float32: memory centres, metres, global frame"),
    ("mem_timestamp", "(B, M, 1) float64: -t_insert, seconds"),
    ("mem_egopose", "(B, M, 4, 4) float32: insertion LiDAR frame -> global"),
    ("mem_velo", "(B, M, 2) float32: m/s, predicted at insertion"),
)

#: Head-step outputs (name, meaning); k = min(max_num, (Q + P) * classes).
HEAD_OUTPUTS = (
    ("boxes", "(B, k, 9) float32: [x, y, z_center, l, w, h, yaw, vx, vy], LiDAR frame, metres/rad/m/s"),
    ("scores", "(B, k) float32: sigmoid scores, descending per sample"),
    ("labels", "(B, k) int64: class index (class_names)"),
    ("keep", "(B, k) bool: centre inside post_center_range (predict() returns the kept rows)"),
    ("cls_logits", "(B, Q+P, classes) float32: last decoder layer logits"),
    ("bbox_preds", "(B, Q+P, 10) float32: last layer [x, y, z, log l, log w, log h, sin, cos, vx, vy]"),
    ("query", "(B, k) int64: the query (row of cls_logits) each decoded row came from"),
    ("memory_index", "(B, K) int64: the queries written into the new memory's first K rows"),
    ("new_mem_embedding", "(B, M, C) float32"),
    ("new_mem_reference_point", "(B, M, 3) float32: global frame"),
    ("new_mem_timestamp", "(B, M, 1) float64: -t_insert, seconds"),
    ("new_mem_egopose", "(B, M, 4, 4) float32"),
    ("new_mem_velo", "(B, M, 2) float32"),
)


class ExportError(RaydnError):
    """Export failed (missing exporter packages, unsupported model, unreadable export dir)."""


def head_step_inputs(feats, batch, state) -> tuple[Tensor, ...]:
    """The head-step graph's positional inputs (float32, timestamps float64) of one frame: ``feats``
    the L levels, ``batch`` a :class:`~raydn.core.batch.FrameBatch`, ``state`` a
    :class:`~raydn.core.state.TemporalState`."""
    f32 = torch.float32
    return (*[f.to(f32) for f in feats], batch.intrinsics.to(f32), batch.extrinsics.to(f32),
            batch.lidar2img.to(f32), batch.ego_pose.to(f32), batch.ego_pose_inv.to(f32),
            batch.timestamp.to(torch.float64), batch.prev_exists.to(f32),
            *(getattr(state, f).to(torch.float64 if f == "timestamp" else f32)
              for f in STATE_FIELDS))


def read_metadata(onnx_dir: str | os.PathLike) -> dict:
    """The metadata of an export directory; :class:`ExportError` naming what is missing/wrong."""
    d = Path(onnx_dir)
    p = d / META_FILE
    if not d.is_dir():
        raise ExportError(f"{d}: not a directory (expected a `raydn export` output)")
    if not p.is_file():
        raise ExportError(f"{d}: no {META_FILE} (not a complete `raydn export` output)")
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{p}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        hint = " (an older raydn's export: export the model again)" if str(got).startswith("raydn-onnx/") else ""
        raise ExportError(f"{p}: format {got!r}, expected {EXPORT_FORMAT!r}{hint}")
    files, sha = meta.get("files"), meta.get("sha256")
    if (not isinstance(files, dict) or set(files) != {"encoder", "head_step"}
            or not all(isinstance(v, str) for v in files.values())):
        raise ExportError(f"{p}: 'files' must map encoder and head_step to file names, got {files!r}")
    if not isinstance(meta.get("export_id"), str) or not isinstance(sha, dict) or set(sha) != set(files):
        raise ExportError(f"{p}: no graph fingerprint ('export_id' and 'sha256' of encoder and "
                          f"head_step): not written by `raydn export`, export the model again")
    for role, name in files.items():
        if not (d / name).is_file():
            raise ExportError(f"{d}: {role} graph {name} is missing")
    return meta
