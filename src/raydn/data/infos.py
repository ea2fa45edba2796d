"""Safe loading and validation of the official info pickles (spec §2.1).

``nuscenes2d_temporal_infos_{train,val,test}.pkl`` = ``{'infos': [record, ...], 'metadata': {...}}``
as written by StreamPETR's ``tools/create_data_nusc.py`` (and by ``raydn prepare``). Pickle can
execute code, so :func:`load_info_file` uses a restricted :class:`pickle.Unpickler` that only resolves
numpy array/dtype/scalar reconstruction helpers and plain builtin containers; anything else is a
:class:`~raydn.errors.DataError` naming the file and the refused global. Even these can be asked to
allocate gigabytes from a few bytes (``bytearray(2**31)``, an array of a huge shape) or to crash
numpy (an object array with fewer entries than its shape): every constructor is charged against an
allocation budget proportional to the file size (:class:`raydn.limits.AllocationBudget`) **before**
it allocates, arrays are checked against the data they are given, and a file larger than
:data:`raydn.limits.MAX_INFO_FILE_BYTES` is refused before it is read.

:func:`validate_record` checks one record (camera keys, matrix shapes, finite values, box shapes)
and raises a :class:`DataError` naming the file, the sample token and the field. Rotations and poses of the
records: :mod:`raydn.core.frames` (``pose_matrix(rotation, translation)``).
"""
from __future__ import annotations

import builtins
import codecs
import collections
import io
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np

from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES
from raydn.limits import MAX_INFO_FILE_BYTES, AllocationBudget, check_file_size

__all__ = [
    "load_info_file", "loads_infos", "validate_record", "validate_infos", "has_annotations",
    "RestrictedUnpickler",
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


def _n_elements(shape) -> int:
    """Number of elements of an array ``shape`` (int or tuple of non-negative ints); ValueError otherwise."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    n = 1
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"bad array shape {dims!r}")
        n *= d
    return n


class _CheckedArray(np.ndarray):
    """What the restricted unpickler builds arrays as: ``__setstate__`` checks the state (object
    arrays: one entry per element -- numpy crashes otherwise; numpy itself checks that other arrays
    get exactly their bytes) and charges the data to the loading unpickler's allocation budget
    before numpy keeps or copies it. Turned into plain ndarrays after loading."""

    def __new__(cls, *args, **kwargs):  # a pickle calling numpy.ndarray(shape) directly
        raise ValueError("numpy.ndarray(...) called directly (numpy pickles use _reconstruct)")

    def __setstate__(self, state):
        budget = getattr(_LOADING, "budget", None)
        if budget is None or type(state) is not tuple or len(state) not in (4, 5):
            raise ValueError("unexpected ndarray state")
        shape, dtype, data = state[-4], state[-3], state[-1]
        if type(data) is list:       # object arrays (numpy segfaults on a short list)
            if not isinstance(dtype, np.dtype) or dtype != _OBJECT or len(data) != _n_elements(shape):
                raise ValueError(f"object array of shape {shape!r} with {len(data)} entries")
            budget.charge(8 * len(data), "an object array")
        elif isinstance(data, (bytes, bytearray)) and isinstance(dtype, np.dtype) and not dtype.hasobject:
            budget.charge(len(data), "an array")   # numpy checks len(data) == shape x itemsize
        else:
            raise ValueError(f"unexpected ndarray state (data of type {type(data).__name__})")
        np.ndarray.__setstate__(self, state)


_OBJECT = np.dtype(object)
_LOADING = threading.local()   # .budget: the AllocationBudget of the load running in this thread


def _sized(arg) -> int:
    """Bytes of a buffer (an ndarray's ``nbytes``), else ``len``; 0 for unsized objects."""
    if isinstance(arg, np.ndarray):
        return int(arg.nbytes)
    try:
        return len(arg)
    except TypeError:
        return 0


def _container_cost(per_item: int):
    """Cost of ``container(iterable)``: ``per_item`` bytes per item, plus 32 for each item object it
    creates (iterating a range or an ndarray makes new int / numpy scalar objects)."""
    def cost(*a) -> int:
        if not a:
            return 0
        it = a[0]
        n = int(it.size) if isinstance(it, np.ndarray) else _sized(it)
        return n * (per_item + (32 if isinstance(it, (range, np.ndarray)) else 0))
    return cost


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only allows numpy arrays/dtypes/scalars and builtin containers.

    ``source`` is only used in error messages (the file path). Every constructor a pickle may call
    charges ``budget`` (:class:`raydn.limits.AllocationBudget`; default: sized for ``file_bytes``,
    or unlimited-size files of 1 GiB) with what it would allocate **before** allocating, so that a
    few crafted bytes (``bytearray(2**31)``, ``list(range(2**28))``, an array of a huge shape)
    are refused at once; arrays are checked against the data they are given. Use :meth:`load`
    (it returns plain ndarrays)."""

    def __init__(self, file, source: str = "<bytes>", *, file_bytes: int | None = None, budget=None):
        super().__init__(file)
        self._source = source
        self._budget = budget or AllocationBudget(source, file_bytes if file_bytes is not None else 1 << 30)
        self._wrappers: dict = {}

    def load(self):
        outer = getattr(_LOADING, "budget", None)
        _LOADING.budget = self._budget
        try:
            obj = super().load()
        finally:
            _LOADING.budget = outer
        return _plain_arrays(obj, self._source)

    # --------------------------------------------------------------- constructors, charged first
    def _charged(self, key: str, fn, cost):
        """``fn`` behind a charge of ``cost(*args)`` bytes (one wrapper per name and unpickler)."""
        if key not in self._wrappers:
            budget = self._budget

            def call(*args):
                budget.charge(cost(*args), lambda: f"{key}(...)")
                return fn(*args)
            call.__raydn_original__ = fn
            self._wrappers[key] = call
        return self._wrappers[key]

    def _builtin(self, name: str):
        fn = getattr(builtins, name)
        if name in ("list", "tuple"):
            return self._charged(name, fn, _container_cost(8))
        if name in ("set", "frozenset", "dict"):
            return self._charged(name, fn, _container_cost(64))
        if name in ("bytes", "bytearray"):
            def cost(*a):
                if not a:
                    return 0
                return a[0] if isinstance(a[0], int) and not isinstance(a[0], bool) else 4 * _sized(a[0])
            return self._charged(name, fn, cost)
        if name == "str":
            def str_cost(*a):
                if a and not isinstance(a[0], (str, bytes, bytearray, int, float, complex, bool)):
                    raise DataError(f"{self._source}: refusing to unpickle str() of a "
                                    f"{type(a[0]).__name__} (info files never need it)")
                return 4 * _sized(a[0]) if a else 0
            return self._charged(name, fn, str_cost)
        return fn  # int, float, complex, bool, slice, range: no allocation beyond their arguments

    def _numpy(self, name: str):
        fn = _numpy_helper(name)
        if name == "_reconstruct":
            budget = self._budget

            def reconstruct(subtype, shape, dtype):
                if subtype is not _CheckedArray:
                    raise ValueError("_reconstruct of a type other than numpy.ndarray")
                if shape != (0,):  # numpy's own pickles: always (0,), the data comes with the state
                    budget.charge(_n_elements(shape) * np.dtype(dtype).itemsize,
                                  lambda: f"an array of shape {shape!r}")
                return fn(_CheckedArray, shape, dtype)
            return reconstruct
        if name == "scalar":
            def scalar_cost(dtype, *obj):
                if not isinstance(dtype, np.dtype) or dtype.hasobject or len(obj) != 1:
                    raise ValueError("numpy scalar with an object dtype or without data")
                return dtype.itemsize
            return self._charged(name, fn, scalar_cost)
        return self._charged(name, fn, lambda buf, *a: _sized(buf))  # _frombuffer: a view of buf

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            return self._numpy(name)
        if module == "numpy" and name == "ndarray":
            return _CheckedArray   # only as _reconstruct's first argument (calling it is refused)
        if module == "numpy" and name == "dtype":
            return np.dtype
        if module == "numpy.dtypes" and name.endswith("DType"):
            import numpy.dtypes as npd  # numpy >= 1.25
            return getattr(npd, name)
        if module == "_codecs" and name == "encode":

            def encode_cost(obj, encoding="utf-8", *errors):
                if codecs.lookup(encoding).name not in ("iso8859-1", "utf-8", "ascii"):
                    raise DataError(f"{self._source}: refusing to unpickle _codecs.encode(..., "
                                    f"{encoding!r}) (info files only encode bytes as latin-1)")
                return 4 * _sized(obj)
            return self._charged("_codecs.encode", codecs.encode, encode_cost)
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return self._builtin(name)
        if module == "collections" and name in ("OrderedDict", "defaultdict"):
            fn = getattr(collections, name)
            if name == "OrderedDict":
                return self._charged(name, fn, _container_cost(64))

            def defaultdict(factory=None, *a):  # the factory as the real builtin, not a wrapper
                factory = getattr(factory, "__raydn_original__", factory)
                if isinstance(factory, type) and issubclass(factory, np.ndarray):
                    raise ValueError("defaultdict of ndarray")
                self._budget.charge(_container_cost(64)(*a), "defaultdict(...)")
                return fn(factory, *a)
            return defaultdict
        raise DataError(
            f"{self._source}: refusing to unpickle global '{module}.{name}' (info files may only "
            "contain numpy arrays, numpy scalars and builtin containers)")


#: Info files hold records of dicts of arrays, ~5 levels deep.
MAX_INFO_NESTING = 100


def _plain_arrays(obj, source: str):
    """``obj`` with every :class:`_CheckedArray` as a plain ndarray (views, no copy), walking dicts,
    lists, tuples, sets and object arrays; a structure nested deeper than :data:`MAX_INFO_NESTING`
    is a DataError."""
    done: dict = {}

    def walk(o, depth):
        if depth > MAX_INFO_NESTING:
            raise DataError(f"{source}: nested deeper than {MAX_INFO_NESTING} levels; info files hold "
                            "records of dicts of arrays (the file is corrupt or crafted)")
        t = type(o)
        if t in (str, bytes, int, float, bool, type(None)):
            return o
        key = id(o)
        if key in done:
            return done[key]
        if t is _CheckedArray:
            out = o.view(np.ndarray)
            done[key] = out
            if out.dtype.hasobject:
                flat = out.reshape(-1)
                for i in range(flat.size):  # per element: object arrays are rare and small
                    flat[i] = walk(flat[i], depth + 1)
            return out
        if isinstance(o, dict):
            done[key] = o
            for k in list(o):  # per key: in place
                o[k] = walk(o[k], depth + 1)
            return o
        if isinstance(o, list):
            done[key] = o
            for i, v in enumerate(o):  # per item: in place
                o[i] = walk(v, depth + 1)
            return o
        if isinstance(o, (tuple, set, frozenset)):
            out = t(walk(v, depth + 1) for v in o)
            done[key] = out
            return out
        return o

    return walk(obj, 0)


def loads_infos(data: bytes, source: str = "<bytes>") -> dict:
    """Restricted-unpickle ``data`` and check the top-level layout. Returns the dict with
    ``'infos'`` (list of records, **unsorted**, unvalidated) and ``'metadata'``."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source, file_bytes=len(data)).load()
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
    check_file_size(path, MAX_INFO_FILE_BYTES, "info file")
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
