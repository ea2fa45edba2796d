"""Small input checks that turn bad values into clear :class:`~raydn.errors.DataError` messages.

* :func:`check_frame_batch` -- what ``RayDNDetector.predict`` checks before it touches the temporal
  memory: the camera count the model was built for, matching shapes, and finite images, calibration
  (``intrinsics``, ``extrinsics``, ``lidar2img``), odometry (``ego_pose``, ``ego_pose_inv``) and
  timestamps. A NaN anywhere in these would otherwise give plausible-looking boxes and be carried in
  the memory into every later frame of the scene. On an error the caller's ``state`` is untouched: the
  next good frame can be given with the same state (the bad frame is skipped), or with
  ``prev_exists = 0`` to start the memory afresh.
* :func:`check_jpeg_file` -- a cheap integrity check of a camera image (start-of-image marker at the
  start, end-of-image marker at the end: a truncated download or copy lacks the latter), used by
  ``raydn prepare`` so that a broken image stops the preparation, not a training run hours later.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from raydn.errors import DataError

#: FrameBatch fields that must be finite, with their expected trailing shape (None: any).
_FINITE_FIELDS = (("intrinsics", (4, 4)), ("extrinsics", (4, 4)), ("lidar2img", (4, 4)))
_POSE_FIELDS = ("ego_pose", "ego_pose_inv")


def _where(batch, b: int) -> str:
    """'frame <sample token>' when the batch carries one, else 'batch slot b'."""
    meta = getattr(batch, "meta", None) or []
    if b < len(meta) and isinstance(meta[b], dict) and meta[b].get("sample_token"):
        return f"frame {meta[b]['sample_token']!r} (batch slot {b})"
    return f"batch slot {b}"


def _first_bad(t: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first non-finite element, or None."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def check_frame_batch(batch, num_cams: int) -> None:
    """Raise :class:`DataError` naming the field, the batch slot/frame and the camera when ``batch``
    does not have ``num_cams`` cameras with consistent shapes, or holds NaN/inf values in its images,
    calibration, poses or timestamps. Costs one ``isfinite`` pass over the images (~1 ms per frame)."""
    B = batch.lidar2img.shape[0] if batch.lidar2img.dim() >= 1 else 0
    for name, tail in _FINITE_FIELDS:
        t = getattr(batch, name)
        if t.dim() != 4 or tuple(t.shape[2:]) != tail or t.shape[0] != B:
            raise DataError(f"FrameBatch.{name}: expected shape (B={B}, N={num_cams}, 4, 4), "
                            f"got {tuple(t.shape)}")
        if t.shape[1] != num_cams:
            raise DataError(f"FrameBatch.{name}: {t.shape[1]} cameras, but the model is built for "
                            f"{num_cams} (shape {tuple(t.shape)}, expected ({B}, {num_cams}, 4, 4))")
    if batch.images is not None:
        img = batch.images
        if img.dim() != 5 or img.shape[0] != B or img.shape[2] != 3:
            raise DataError(f"FrameBatch.images: expected shape (B={B}, N={num_cams}, 3, H, W), "
                            f"got {tuple(img.shape)}")
        if img.shape[1] != num_cams:
            raise DataError(f"FrameBatch.images: {img.shape[1]} cameras, but the model is built for "
                            f"{num_cams} (shape {tuple(img.shape)})")
    for name in _POSE_FIELDS:
        t = getattr(batch, name)
        if tuple(t.shape) != (B, 4, 4):
            raise DataError(f"FrameBatch.{name}: expected shape ({B}, 4, 4), got {tuple(t.shape)}")
    for name in ("timestamp", "prev_exists"):
        t = getattr(batch, name)
        if t.numel() != B:
            raise DataError(f"FrameBatch.{name}: expected {B} values (one per batch slot), got "
                            f"shape {tuple(t.shape)}")
    checks = [(n, getattr(batch, n), True) for n, _ in _FINITE_FIELDS]
    checks += [(n, getattr(batch, n), False) for n in _POSE_FIELDS + ("timestamp", "prev_exists")]
    if batch.images is not None and batch.images.is_floating_point():
        checks.insert(0, ("images", batch.images, True))
    for name, t, per_camera in checks:
        if not t.is_floating_point():
            continue
        idx = _first_bad(t)
        if idx is None:
            continue
        where = _where(batch, idx[0] if t.dim() else 0)
        cam = f", camera {idx[1]}" if per_camera and len(idx) > 1 else ""
        raise DataError(f"FrameBatch.{name}: NaN/inf value in {where}{cam} at index {list(idx)}; "
                        f"expected finite values. The frame was not used and the temporal state "
                        f"passed in is unchanged")


def check_jpeg_file(path: str | os.PathLike) -> None:
    """Raise :class:`DataError` when ``path`` is not a complete JPEG file: empty, no start-of-image
    marker (FF D8) at the start, or no end-of-image marker (FF D9) among its last 64 bytes (a
    truncated file). Reads 2 + 64 bytes; files not named ``*.jpg`` / ``*.jpeg`` are not checked."""
    path = Path(path)
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(max(0, size - 64))
            tail = f.read(64)
    except OSError as e:
        raise DataError(f"{path}: cannot read camera image: {e.strerror or e}") from None
    if size == 0:
        raise DataError(f"{path}: camera image is empty (0 bytes); expected a JPEG file")
    if head != b"\xff\xd8":
        raise DataError(f"{path}: not a JPEG file (starts with {head.hex()}, expected ffd8)")
    if b"\xff\xd9" not in tail:
        raise DataError(f"{path}: truncated JPEG ({size} bytes, no end-of-image marker ffd9 at the "
                        f"end); re-copy or re-download this image")


def scan_files(paths, is_image=None) -> tuple[list, list]:
    """(missing paths, broken-image messages) of ``paths``; ``is_image(path)`` says which ones
    must be complete JPEGs (:func:`check_jpeg_file`; default: all)."""
    missing, broken = [], []
    for path in paths:
        if not Path(path).is_file():
            missing.append(path)
        elif is_image is None or is_image(path):
            try:
                check_jpeg_file(path)
            except DataError as e:
                broken.append(str(e))
    return missing, broken


def check_dataset_images(dataset) -> None:
    """Every camera image of a :class:`~raydn.data.dataset.NuScenesStreamingDataset` exists and is a
    complete JPEG (:func:`check_jpeg_file`; 66 bytes read per image). Raises one :class:`DataError`
    with the count and the first bad file -- e.g. for info files not made by ``raydn prepare``."""
    from raydn.data.dataset import resolve_image_path
    from raydn.geometry import CAMERA_NAMES
    paths = [resolve_image_path(rec["cams"][cam]["data_path"], dataset.data_root)
             for rec in dataset.infos for cam in CAMERA_NAMES]
    missing, broken = scan_files(paths)
    n = len(paths)
    if missing:
        raise DataError(f"{len(missing)} of {n} camera images are missing, e.g. {missing[0]} "
                        f"(check --dataroot)")
    if broken:
        raise DataError(f"{len(broken)} of {n} camera images are broken, e.g. {broken[0]}")


__all__ = ["check_dataset_images", "check_frame_batch", "check_jpeg_file", "scan_files"]
