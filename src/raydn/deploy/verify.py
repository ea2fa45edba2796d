"""Is a `raydn export` output one consistent set? Checked by :class:`raydn.deploy.OnnxDetector` at load.

Three checks, each failing with one :class:`~raydn.interop.export.ExportError` line naming the file
(and the field):

1. **Same export**: each graph's ``metadata_props`` export id (:data:`PROP_EXPORT_ID`) equals the
   metadata's ``export_id``, and the graph file's sha256 equals the one the metadata recorded
   (an encoder from one export with the head of another runs, but its boxes are garbage).
2. **Shapes**: the metadata's headline fields (``batch_size``, ``num_cams``, ``image_size``,
   ``num_levels``, ``memory_len``, ``embed_dims``, the class count) and every recorded graph input /
   output equal what the onnxruntime sessions actually take and give (``get_inputs()`` /
   ``get_outputs()``).
3. **Metadata as exported**: every other field equals the copy each graph carries
   (:data:`PROP_METADATA`), except the fields written after the graphs (:data:`UNSIGNED_FIELDS`).
"""
from __future__ import annotations

import json
import os

from raydn.core.graph_contract import (
    META_FILE, PROP_EXPORT_ID, PROP_METADATA, UNSIGNED_FIELDS, ExportError, file_sha256,
)

__all__ = ["verify_export"]


def _short(v, n: int = 80) -> str:
    r = json.dumps(v) if not isinstance(v, str) else repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def _first_difference(a, b, path: str):
    """(path, a_value, b_value) of the first place where JSON values ``a`` and ``b`` differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}", a.get(k, "<absent>"), b.get(k, "<absent>")
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def _check_identity(meta: dict, role: str, path: str, props: dict) -> None:
    want = meta["export_id"]
    got = props.get(PROP_EXPORT_ID)
    if got != want:
        what = "carries no export id" if got is None else f"comes from another export (id {got})"
        raise ExportError(f"{path}: {what}, but {META_FILE} is export {want}: use the graphs and "
                          f"{META_FILE} of one `raydn export` output together")
    digest = file_sha256(path)
    if digest != meta["sha256"][role]:
        raise ExportError(f"{path}: modified after export (sha256 {digest[:16]}..., {META_FILE} "
                          f"records {meta['sha256'][role][:16]}...): export the model again")


def _check_shapes(meta: dict, meta_path: str, sessions: dict, paths: dict) -> None:
    enc, head = sessions["encoder"], sessions["head_step"]
    enc_in = {i.name: list(i.shape) for i in enc.get_inputs()}
    head_in = {i.name: list(i.shape) for i in head.get_inputs()}
    head_out = {o.name: list(o.shape) for o in head.get_outputs()}
    images, mem, cls = enc_in.get("images"), head_in.get("mem_embedding"), head_out.get("cls_logits")
    if images is None or len(images) != 5 or mem is None or len(mem) != 3 or cls is None:
        raise ExportError(f"{paths['encoder']} / {paths['head_step']}: not raydn graphs (expected inputs "
                          f"'images' (B, N, 3, H, W) and 'mem_embedding', output 'cls_logits')")
    headline = (  # (field, value in the graph, graph file, where it shows)
        ("batch_size", images[0], "encoder", f"input images {images}"),
        ("num_cams", images[1], "encoder", f"input images {images}"),
        ("image_size", images[3:5], "encoder", f"input images {images}"),
        ("num_levels", len(enc.get_outputs()), "encoder", "its feature outputs"),
        ("memory_len", mem[1], "head_step", f"input mem_embedding {mem}"),
        ("embed_dims", mem[2], "head_step", f"input mem_embedding {mem}"),
    )
    for name, actual, role, where in headline:
        if meta.get(name) != actual:
            raise ExportError(f"{meta_path}: {name} is {_short(meta.get(name))} but "
                              f"{os.path.basename(paths[role])} has {actual} ({where})")
    classes = meta.get("class_names")
    if not isinstance(classes, list) or len(classes) != cls[-1]:
        raise ExportError(f"{meta_path}: class_names lists {_short(classes)} but "
                          f"{os.path.basename(paths['head_step'])} scores {cls[-1]} classes")
    for role, sess in sessions.items():
        for kind, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            recorded = [(s.get("name"), s.get("shape")) for s in meta.get(role, {}).get(kind, [])]
            real = [(a.name, list(a.shape)) for a in actual]
            if recorded != real:
                i = next((j for j, (r, a) in enumerate(zip(recorded, real)) if r != a),
                         min(len(recorded), len(real)))
                rec = recorded[i] if i < len(recorded) else "<none>"
                got = real[i] if i < len(real) else "<none>"
                raise ExportError(f"{meta_path}: {role}.{kind}[{i}] is {_short(rec)} but "
                                  f"{os.path.basename(paths[role])} has {_short(got)}")


def _check_as_exported(meta: dict, meta_path: str, role: str, path: str, props: dict) -> None:
    try:
        signed = json.loads(props.get(PROP_METADATA, ""))
    except json.JSONDecodeError:
        raise ExportError(f"{path}: no readable copy of its metadata ({PROP_METADATA}): "
                          f"export the model again") from None
    mine = {k: v for k, v in meta.items() if k not in UNSIGNED_FIELDS}
    d = _first_difference(mine, signed, "")
    if d:
        field, now, then = d
        raise ExportError(f"{meta_path}: {field.lstrip('.')} is {_short(now)} but "
                          f"{os.path.basename(path)} was exported with {_short(then)} (the metadata "
                          f"was edited: use the file `raydn export` wrote)")


def verify_export(onnx_dir: str | os.PathLike, meta: dict, sessions: dict) -> None:
    """Check that ``sessions`` (``{"encoder": ..., "head_step": ...}`` onnxruntime
    ``InferenceSession`` of ``meta['files']``) and ``meta`` (:func:`read_metadata`) are one
    consistent export (see the module docstring). Raises :class:`ExportError`; returns None."""
    meta_path = os.path.join(str(onnx_dir), META_FILE)
    paths = {role: os.path.join(str(onnx_dir), meta["files"][role]) for role in sessions}
    props = {role: dict(s.get_modelmeta().custom_metadata_map) for role, s in sessions.items()}
    for role in sessions:
        _check_identity(meta, role, paths[role], props[role])
    _check_shapes(meta, meta_path, sessions, paths)
    for role in sessions:
        _check_as_exported(meta, meta_path, role, paths[role], props[role])
