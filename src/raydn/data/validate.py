"""File checks of the data pipeline that turn bad files into clear :class:`~raydn.errors.DataError`
messages (the model-input checks of a frame batch are :func:`raydn.core.batch.check_frame_batch`).

* :func:`check_jpeg_file` -- a cheap integrity check of a camera image (start-of-image marker at the
  start, end-of-image marker at the end: a truncated download or copy lacks the latter), used by
  ``raydn prepare`` so that a broken image stops the preparation, not a training run hours later.
"""
from __future__ import annotations

import os
from pathlib import Path

from raydn.errors import DataError
from raydn.data.images import resolve_image_path
from raydn.geometry import CAMERA_NAMES


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
    paths = [resolve_image_path(rec["cams"][cam]["data_path"], dataset.data_root)
             for rec in dataset.infos for cam in CAMERA_NAMES]
    missing, broken = scan_files(paths)
    n = len(paths)
    if missing:
        raise DataError(f"{len(missing)} of {n} camera images are missing, e.g. {missing[0]} "
                        f"(check --dataroot)")
    if broken:
        raise DataError(f"{len(broken)} of {n} camera images are broken, e.g. {broken[0]}")


__all__ = ["check_dataset_images", "check_jpeg_file", "scan_files"]
