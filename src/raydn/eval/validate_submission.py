"""Checks of a nuScenes detection submission before it is scored, with messages that name the file,
the sample, the record and the field (the devkit answers most of these with a bare ``AssertionError``
or scores garbage).

Rules (nuScenes detection format): an object ``{"meta": {...}, "results": {sample_token: [record]}}``;
every sample of the evaluated split present, no other sample, at most 500 records per sample; each
record has ``sample_token`` (= its key), ``translation`` (3), ``size`` (3, all > 0), ``rotation`` (4,
a quaternion w, x, y, z), ``velocity`` (2; NaN allowed, as in the devkit), ``detection_name`` (one of
the 10 classes), ``detection_score`` (finite, in [0, 1]) and ``attribute_name`` ('' or a nuScenes
attribute).

The frame: submissions are in nuScenes' **global** frame. Boxes left in the ego/LiDAR (vehicle) frame
all lie within a few tens of metres of the origin, hundreds of metres from their sample's ego
position, and score mAP 0 / NDS 0 (the devkit drops every box more than 50 m from its ego).
:func:`check_global_frame` refuses such a submission with that explanation: when, over the samples
with boxes whose ego is more than :data:`FRAME_EGO_MIN_NORM` m from the origin, the median box is
within :data:`FRAME_NEAR_ORIGIN` m of the origin and more than :data:`FRAME_FAR_FROM_EGO` m from its
ego (no camera detection is that far; nothing that far can be matched). A refusal, not a warning:
such a file has nothing to score.

Size: a file larger than :data:`raydn.limits.MAX_SUBMISSION_FILE_BYTES` is refused before it is read.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from raydn.errors import DataError
from raydn.eval.constants import ATTRIBUTE_NAMES, DETECTION_NAMES
from raydn import limits  # the limit is read at each call (a module setting tests lower)

MAX_BOXES_PER_SAMPLE = 500
_VECTORS = (("translation", 3, False), ("size", 3, False), ("rotation", 4, False), ("velocity", 2, True))
META_KEYS = ("use_camera", "use_lidar", "use_radar", "use_map", "use_external")
FRAME_NEAR_ORIGIN = 80.0     # m: the median box of an ego-frame submission is this close to (0, 0)
FRAME_FAR_FROM_EGO = 150.0   # m: ... and this far from its sample's ego (cameras see ~60 m)
FRAME_EGO_MIN_NORM = 2 * FRAME_NEAR_ORIGIN  # m: samples whose ego is nearer the origin cannot tell


def _numbers(where: str, name: str, value, n: int, nan_ok: bool) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise DataError(f"{where}: field {name!r} must be a list of {n} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and v is not None:
            raise DataError(f"{where}: field {name!r} must be a list of {n} numbers, got {value!r}")
        f = float("nan") if v is None else float(v)
        if math.isinf(f) or (math.isnan(f) and not nan_ok):
            raise DataError(f"{where}: field {name!r} is {value!r}; expected finite numbers")
        out.append(f)
    return out


def check_box_fields(where: str, token: str, rec, fields: Sequence[str]) -> None:
    """The box part of one record of a detection or tracking submission: an object with the box
    fields and ``fields``, listed under its own sample, finite vectors, sizes > 0, a non-zero
    quaternion; raises :class:`DataError` naming ``where`` and the field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    missing = [k for k in ("sample_token", "translation", "size", "rotation", "velocity", *fields) if k not in rec]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    if rec["sample_token"] != token:
        raise DataError(f"{where}: field 'sample_token' is {rec['sample_token']!r} but the record is listed "
                        f"under sample {token!r}")
    vec = {name: _numbers(where, name, rec[name], n, nan_ok) for name, n, nan_ok in _VECTORS}
    if any(s <= 0 for s in vec["size"]):
        raise DataError(f"{where}: field 'size' is {rec['size']!r}; expected three sizes > 0 (w, l, h in metres)")
    if sum(q * q for q in vec["rotation"]) < 1e-12:
        raise DataError(f"{where}: field 'rotation' is {rec['rotation']!r}; expected a quaternion (w, x, y, z), "
                        f"not zero")


def check_record(where: str, token: str, rec) -> None:
    """One submission record (see the module docstring)."""
    check_box_fields(where, token, rec, ("detection_name", "detection_score", "attribute_name"))
    name = rec["detection_name"]
    if name not in DETECTION_NAMES:
        raise DataError(f"{where}: field 'detection_name' is {name!r}; expected one of {', '.join(DETECTION_NAMES)}")
    score = rec["detection_score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not (0.0 <= float(score) <= 1.0):
        raise DataError(f"{where}: field 'detection_score' is {score!r}; expected a number in [0, 1]")
    attr = rec["attribute_name"]
    if attr != "" and attr not in ATTRIBUTE_NAMES:
        raise DataError(f"{where}: field 'attribute_name' is {attr!r}; expected '' or one of "
                        f"{', '.join(ATTRIBUTE_NAMES)}")


def check_global_frame(path, results: Mapping[str, list], ego_translation: Mapping[str, Sequence[float]]) -> None:
    """Raise :class:`DataError` when the boxes of ``results`` (validated records) look like they are
    in the ego/LiDAR frame rather than the global frame (see the module docstring);
    ``ego_translation``: sample token -> the sample's ego position in the global frame (metres)."""
    near, far = [], []
    for token, recs in results.items():  # per sample: medians of a few hundred boxes
        ego = ego_translation.get(token)
        if not recs or ego is None or float(np.hypot(ego[0], ego[1])) <= FRAME_EGO_MIN_NORM:
            continue
        xy = np.array([r["translation"][:2] for r in recs], dtype=np.float64)
        near.append(float(np.median(np.hypot(xy[:, 0], xy[:, 1]))))
        far.append(float(np.median(np.hypot(xy[:, 0] - ego[0], xy[:, 1] - ego[1]))))
    if not near:
        return
    to_origin, to_ego = float(np.median(near)), float(np.median(far))
    if to_origin < FRAME_NEAR_ORIGIN and to_ego > FRAME_FAR_FROM_EGO:
        raise DataError(f"{path}: boxes look like they are in the ego (vehicle/LiDAR) frame: their median "
                        f"distance to the global origin is {to_origin:.0f} m but to their sample's ego position "
                        f"{to_ego:.0f} m ({len(near)} samples); nuScenes submissions are in the global frame "
                        f"(transform each box by the sample's lidar2ego and ego2global poses, as "
                        f"raydn.eval.submission.build_submission does). Scored as it is, every box would be "
                        f"dropped as too far from its ego: mAP 0, NDS 0")


def validate_submission(path: str | os.PathLike, sample_tokens: Collection[str],
                        max_boxes_per_sample: int = MAX_BOXES_PER_SAMPLE,
                        ego_translation: Mapping[str, Sequence[float]] | None = None, *,
                        check=check_record, kind: str = "submission", items: str = "detections") -> dict:
    """Read and check the submission at ``path`` against the evaluated split's ``sample_tokens``
    (and, given ``ego_translation`` (token -> global ego position), that the boxes are in the global
    frame: :func:`check_global_frame`). Returns the parsed JSON; raises :class:`DataError` at the
    first problem. ``check(where, token, record)`` checks one box record (the detection rules by
    default; :mod:`raydn.eval.tracking` passes its own, with ``kind`` / ``items`` for the messages)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} file not found")
    limits.check_file_size(path, limits.MAX_SUBMISSION_FILE_BYTES, "submission file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise DataError(f"{path}: expected an object with 'meta' and a 'results' dict (sample token -> boxes)")
    meta = data.get("meta")
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise DataError(f"{path}: field 'meta' must be an object with {', '.join(META_KEYS)}, got {meta!r}")
    results = data["results"]
    expected = set(sample_tokens)
    unknown = [t for t in results if t not in expected]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} sample(s) are not in the evaluated split, e.g. {unknown[0]!r}")
    absent = [t for t in sample_tokens if t not in results]
    if absent:
        raise DataError(f"{path}: {len(absent)} sample(s) of the evaluated split are missing, e.g. {absent[0]!r} "
                        f"(every sample must be listed, with an empty list if it has no {items})")
    for token, recs in results.items():
        if not isinstance(recs, list):
            raise DataError(f"{path}: results[{token!r}] must be a list of boxes, got {type(recs).__name__}")
        if len(recs) > max_boxes_per_sample:
            raise DataError(f"{path}: sample {token!r} has {len(recs)} boxes; at most {max_boxes_per_sample} "
                            f"are allowed (keep the highest-scoring ones)")
        for i, rec in enumerate(recs):
            check(f"{path}: results[{token!r}][{i}]", token, rec)
    if ego_translation is not None:
        check_global_frame(path, results, ego_translation)
    return data


__all__ = ["MAX_BOXES_PER_SAMPLE", "check_box_fields", "check_global_frame", "check_record", "validate_submission"]
