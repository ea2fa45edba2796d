"""Size limits checked **before** a file is read or an object is allocated.

A small or malformed input must not make the process allocate gigabytes (or crash) before it is
rejected. Two mechanisms, each with one home here:

* :func:`check_file_size` -- a file is refused before it is read when it is larger than any real
  file of its kind (the limits below are far above the largest real ones);
* :class:`AllocationBudget` -- while a file is decoded (the restricted unpickler of the info files),
  every allocation the file asks for is charged first and refused when the total exceeds what a
  file of that size can legitimately hold (:data:`ALLOC_PER_FILE_BYTE` bytes per byte of file, plus
  :data:`ALLOC_FLOOR` bytes).

Limits (bytes):

* info pickles: :data:`MAX_INFO_FILE_BYTES` 8 GiB (the official nuScenes trainval infos are < 1 GiB);
* calibration / odometry files: :data:`MAX_CALIBRATION_FILE_BYTES` 256 MiB (~500 bytes per frame:
  hours of frames);
* submission JSON: :data:`MAX_SUBMISSION_FILE_BYTES` 4 GiB (6019 val samples x 500 boxes x ~350
  bytes is ~1 GiB).
"""
from __future__ import annotations

import os
from pathlib import Path

from raydn.errors import DataError, RaydnError

GiB = 1 << 30
MiB = 1 << 20

MAX_INFO_FILE_BYTES = 8 * GiB
MAX_CALIBRATION_FILE_BYTES = 256 * MiB
MAX_SUBMISSION_FILE_BYTES = 4 * GiB

#: Decoding a file may allocate at most ALLOC_PER_FILE_BYTE bytes per byte of the file (an object
#: array costs 8 bytes per element, and each element takes at least one byte of pickle) plus ALLOC_FLOOR.
ALLOC_PER_FILE_BYTE = 16
ALLOC_FLOOR = 16 * MiB


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_file_size(path: str | os.PathLike, limit: int, what: str,
                    error: type[RaydnError] = DataError) -> int:
    """Size of ``path`` in bytes; raises ``error`` naming the file when it is larger than ``limit``
    (a stat only: nothing is read). A missing file is left to the caller's own message."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return 0
    if size > limit:
        raise error(f"{path}: {what} of {_human(size)} is larger than the limit of {_human(limit)}; "
                    f"expected a much smaller file (is this the right file?)")
    return size


class AllocationBudget:
    """Running total of what decoding ``source`` (of ``file_bytes`` bytes) has allocated.

    :meth:`charge` is called with the size of an allocation **before** it is made and raises
    :class:`DataError` once the total exceeds ``limit`` (default ``ALLOC_FLOOR +
    ALLOC_PER_FILE_BYTE * file_bytes``)."""

    def __init__(self, source: str, file_bytes: int, limit: int | None = None):
        self.source = source
        self.file_bytes = int(file_bytes)
        self.limit = int(limit) if limit is not None else ALLOC_FLOOR + ALLOC_PER_FILE_BYTE * self.file_bytes
        self.used = 0

    def charge(self, nbytes: int, what) -> None:
        """Count ``nbytes`` or raise; ``what`` (a string, or a callable giving it: built only for
        the message) says what asked for them."""
        nbytes = int(nbytes)
        if self.used + nbytes <= self.limit and nbytes >= 0:
            self.used += nbytes
            return
        what = what() if callable(what) else what
        if nbytes < 0:
            raise DataError(f"{self.source}: {what} asks for a negative size ({nbytes})")
        if self.used + nbytes > self.limit:
            raise DataError(f"{self.source}: refusing to decode: {what} would allocate {_human(nbytes)} "
                            f"(total {_human(self.used + nbytes)}), more than a file of "
                            f"{_human(self.file_bytes)} can hold (limit {_human(self.limit)}); "
                            f"the file is corrupt or crafted")
        self.used += nbytes


__all__ = ["ALLOC_FLOOR", "ALLOC_PER_FILE_BYTE", "AllocationBudget", "MAX_CALIBRATION_FILE_BYTES",
           "MAX_INFO_FILE_BYTES", "MAX_SUBMISSION_FILE_BYTES", "check_file_size"]
