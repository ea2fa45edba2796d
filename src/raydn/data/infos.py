"""Safe loading and validation of the official info pickles (spec §2.1).

``nuscenes2d_temporal_infos_{train,val,test}.pkl`` = ``{'infos': [record, ...], 'metadata': {...}}``
as written by StreamPETR's ``tools/create_data_nusc.py`` (and by ``raydn prepare``). Pickle can
execute code, so :func:`load_info_file` uses a restricted :class:`pickle.Unpickler` that only resolves
numpy array/dtype/scalar reconstruction helpers and plain builtin containers; anything else is a
:class:`~raydn.errors.DataError` naming the file and the refused global.

:func:`validate_record` checks one record (camera keys, matrix shapes, finite values, box shapes)
and raises a :class:`DataError` naming the file, the sample token and the field. The numeric
helpers (:func:`quaternion_to_matrix`, :func:`pose_matrix`) are float64 numpy.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES

__all__ = [
    "load_info_file", "loads_infos", "validate_record", "validate_infos", "has_annotations",
    "quaternion_to_matrix", "pose_matrix", "RestrictedUnpickler",
]

# (module, name) pairs an info pickle may reference. numpy moved ``core`` to ``_core`` in 2.0, and
# mmcv writes protocol-2 pickles that encode bytes through ``_codecs.encode``.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_NUMPY_NAMES = ("_reconstruct", "scalar", "_frombuffer")
_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "complex",
             "slice", "range", "str", "int", "float", "bool"}


def _numpy_helper(name: str):
    """Resolve a numpy pickle helper by name on either numpy 1.x or 2.x."""
    for modname in ("numpy._core.multiarray", "numpy.core.multiarray",
                    "numpy._core.numeric", "numpy.core.numeric"):
        try:
            mod = __import__(modname, fromlist=[name])
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(name)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only allows numpy arrays/dtypes/scalars and builtin containers.

    ``source`` is only used in error messages (the file path)."""

    def __init__(self, file, source: str = "<bytes>"):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            return _numpy_helper(name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes as npd  # numpy >= 1.25
            return getattr(npd, name)
        if module == "_codecs" and name == "encode":
            import codecs
            return codecs.encode
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            import builtins
            return getattr(builtins, name)
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            import collections
            return getattr(collections, name)
        raise DataError(
            f"{self._source}: refusing to unpickle global '{module}.{name}' (info files may only "
            "contain numpy arrays, numpy scalars and builtin containers)")


def loads_infos(data: bytes, source: str = "<bytes>") -> dict:
    """Restricted-unpickle ``data`` and check the top-level layout. Returns the dict with
    ``'infos'`` (list of records, **unsorted**, unvalidated) and ``'metadata'``."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as exc:  # truncated / not a pickle / bad opcode
        raise DataError(f"{source}: not a readable info pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or "infos" not in obj:
        raise DataError(f"{source}: expected a dict with keys 'infos' and 'metadata' "
                        f"(official nuscenes2d_temporal_infos_*.pkl), got {type(obj).__name__}")
    if not isinstance(obj["infos"], list):
        raise DataError(f"{source}: 'infos' must be a list of records, got {type(obj['infos']).__name__}")
    obj.setdefault("metadata", {})
    return obj


def load_info_file(path: str | os.PathLike, validate: bool = True) -> dict:
    """Load an official info pickle safely.

    Returns ``{'infos': list[dict], 'metadata': dict}`` with the records in file order (the
    dataset sorts them by timestamp). With ``validate`` every record goes through
    :func:`validate_record` (raises :class:`DataError` naming the file, token and field)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: info file not found (run `raydn prepare` to create it)")
    obj = loads_infos(path.read_bytes(), str(path))
    if validate:
        validate_infos(obj["infos"], str(path))
    return obj


def has_annotations(record: dict) -> bool:
    """True when the record carries 3D ground truth (train/val infos; test infos have none)."""
    return "gt_boxes" in record


def _array(record: dict, key: str, shape: tuple, where: str, finite: bool = True) -> np.ndarray:
    """Fetch ``record[key]`` as float64 array of ``shape`` (``-1`` = any length) or raise."""
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    try:
        arr = np.asarray(record[key], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field '{key}' is not numeric ({exc})") from exc
    ok = arr.ndim == len(shape) and all(s == -1 or s == a for s, a in zip(shape, arr.shape))
    if not ok:
        want = "x".join("n" if s == -1 else str(s) for s in shape) or "scalar"
        raise DataError(f"{where}: field '{key}' has shape {tuple(arr.shape)}, expected {want}")
    if finite and not np.isfinite(arr).all():
        raise DataError(f"{where}: field '{key}' contains NaN/inf values")
    return arr


def validate_record(record: Any, source: str = "<infos>", index: int | None = None) -> None:
    """Validate one info record (spec §2.1). Raises :class:`DataError` that names ``source``,
    the sample token and the offending field. GT fields are checked only when present."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: record {index} is a {type(record).__name__}, expected a dict")
    token = record.get("token", f"<record {index}>")
    where = f"{source}: sample {token}"
    for key in ("token", "scene_token", "timestamp", "sweeps", "cams"):
        if key not in record:
            raise DataError(f"{where}: missing field '{key}'")
    _array(record, "timestamp", (), where)
    _array(record, "lidar2ego_translation", (3,), where)
    _array(record, "lidar2ego_rotation", (4,), where)
    _array(record, "ego2global_translation", (3,), where)
    _array(record, "ego2global_rotation", (4,), where)
    cams = record["cams"]
    if not isinstance(cams, dict):
        raise DataError(f"{where}: field 'cams' must be a dict keyed by camera name")
    missing = [c for c in CAMERA_NAMES if c not in cams]
    if missing:
        raise DataError(f"{where}: field 'cams' lacks cameras {missing} (expected {list(CAMERA_NAMES)})")
    for cam in CAMERA_NAMES:
        c = cams[cam]
        cw = f"{where}: cams.{cam}"
        if not isinstance(c, dict) or "data_path" not in c:
            raise DataError(f"{cw}: missing field 'data_path'")
        _array(c, "cam_intrinsic", (3, 3), cw)
        _array(c, "sensor2lidar_rotation", (3, 3), cw)
        _array(c, "sensor2lidar_translation", (3,), cw)
        _array(c, "timestamp", (), cw)
    if has_annotations(record):
        boxes = _array(record, "gt_boxes", (-1, 7), where, finite=False)
        n = boxes.shape[0]
        if not np.isfinite(boxes).all():
            bad = np.unique(np.nonzero(~np.isfinite(boxes))[0]).tolist()
            raise DataError(f"{where}: field 'gt_boxes' has NaN/inf values in boxes {bad[:10]}")
        if len(record.get("gt_names", ())) != n:
            raise DataError(f"{where}: field 'gt_names' has {len(record.get('gt_names', ()))} "
                            f"entries, expected {n} (one per gt_boxes row)")
        if "gt_velocity" in record:  # NaN velocities are legal (set to 0 later)
            _array(record, "gt_velocity", (n, 2), where, finite=False)
        if "valid_flag" in record and np.asarray(record["valid_flag"]).shape != (n,):
            raise DataError(f"{where}: field 'valid_flag' has shape "
                            f"{np.asarray(record['valid_flag']).shape}, expected ({n},)")
        for key in ("bboxes2d", "labels2d", "centers2d", "depths"):
            if key in record and len(record[key]) != len(CAMERA_NAMES):
                raise DataError(f"{where}: field '{key}' has {len(record[key])} entries, "
                                f"expected one per camera ({len(CAMERA_NAMES)})")


def validate_infos(infos: list, source: str = "<infos>") -> None:
    """Validate every record and check that sample tokens are unique."""
    seen = set()
    for i, rec in enumerate(infos):
        validate_record(rec, source, i)
        if rec["token"] in seen:
            raise DataError(f"{source}: duplicate sample token {rec['token']} (record {i})")
        seen.add(rec["token"])


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternion(s) ``(..., 4)`` in **w, x, y, z** order (nuScenes) -> rotation ``(..., 3, 3)``
    float64. The quaternion is normalised first (as pyquaternion does)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    m = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], axis=-1)
    return m.reshape(q.shape[:-1] + (3, 3))


def pose_matrix(rotation, translation) -> np.ndarray:
    """4x4 float64 column-convention transform from a rotation ((..., 3, 3) matrix or (..., 4) wxyz
    quaternion) and a translation (..., 3)."""
    rotation = np.asarray(rotation, dtype=np.float64)
    if rotation.shape[-1] == 4:
        rotation = quaternion_to_matrix(rotation)
    translation = np.asarray(translation, dtype=np.float64)
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out
