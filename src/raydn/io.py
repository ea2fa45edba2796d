"""Atomic file output: never a half-written file at the destination.

Everything the package writes (checkpoints, info records, submissions, metrics, pictures) goes
through :func:`atomic_path`: write to a temporary file in the destination folder, flush, then
``os.replace`` onto the final name; on any error the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so libraries that pick the format
    from the extension work); it replaces ``path`` when the block exits without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, **dump_kwargs).encode())


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path`."""
    import torch
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
