"""Files and folders the package writes: never a half-written file at the destination, never two
commands writing into one folder, no leftovers of an interrupted one.

Everything the package writes (checkpoints, info records, submissions, metrics, pictures) goes
through :func:`atomic_path`: write to a hidden temporary file in the destination folder
(``.{stem}.XXXXXXXX.raydn-tmp{suffix}``), flush, give it the mode a plain ``open()`` would have
(``0o666 & ~umask``), then ``os.replace`` it onto the final name; on any error (``Terminated``,
``KeyboardInterrupt`` included) the temporary file is removed. A ``kill -9`` cannot be caught: the
temporary file it leaves is removed by :func:`clean_stale_temp_files` when the next command opens the
folder through :class:`OutputFolder`.

:class:`OutputFolder` is the one home of "a command's output folder": created on entry (and removed
again on exit if the command created it and wrote nothing), locked for the command's lifetime by
:class:`FolderLock` (``fcntl.flock`` on ``.raydn.lock`` inside it, released by the kernel when the
process dies), stale temporary files removed once the lock is held.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from raydn.errors import FolderBusyError, RaydnError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no folder locks; atomic writes still keep every file whole
    fcntl = None

#: marker in the names of temporary files (before the real suffix, which some writers need)
TEMP_MARK = ".raydn-tmp"
#: the lock file of an output folder
LOCK_NAME = ".raydn.lock"
# temporary names this package writes or wrote: atomic_path's (and, before it carried a marker,
# the checkpoints' ``.iter_0000003.k2j4abcd.pt`` / ``.latest.rank1.k2j4abcd.pt``), the ONNX
# export's staging folder ``.raydn-export-XXXX``
_TEMP_FILE_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.raydn-tmp(\.[A-Za-z0-9]+)?$"
                           r"|^\.(iter_\d{7}|latest)(\.rank\d+)?\.[A-Za-z0-9_]+\.pt$")
_TEMP_DIR_RE = re.compile(r"^\.raydn-(export|tmp)-[A-Za-z0-9_]+$")


# ------------------------------------------------------------------------------------ modes
def current_umask() -> int:
    """The process umask (read from ``/proc`` where possible: setting it to read it is racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


# ------------------------------------------------------------------------------------ atomic files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so libraries that pick the format
    from the extension work); it replaces ``path`` when the block exits without error, with the
    mode a plain ``open()`` would give (``mkstemp`` creates ``0600``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{TEMP_MARK}{path.suffix}",
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file name of :func:`atomic_path` (or of an earlier version)."""
    return bool(_TEMP_FILE_RE.match(name))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, **dump_kwargs).encode())


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def clean_stale_temp_files(folder: str | os.PathLike, depth: int = 1) -> list[Path]:
    """Remove the temporary files (and export staging folders) that interrupted writes left in
    ``folder`` and its sub-folders down to ``depth`` levels (default: ``folder/*`` and
    ``folder/*/*``, e.g. ``eval/plots``; a dataroot's image folders ``samples/CAM_*`` are not
    listed); returns the removed paths. Only the
    names this package gives its temporary files are touched; a sub-folder holding a lock file belongs
    to another command (its own next start cleans it) and is skipped. Call it while holding the
    folder's :class:`FolderLock`."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if len(here.relative_to(folder).parts) >= depth:
            dirnames[:] = []
        for name in filenames:
            if is_temp_name(name):
                with contextlib.suppress(FileNotFoundError):
                    (here / name).unlink()
                    removed.append(here / name)
        keep = []
        for d in dirnames:
            if _TEMP_DIR_RE.match(d):
                shutil.rmtree(here / d, ignore_errors=True)
                removed.append(here / d)
            elif not (here / d / LOCK_NAME).exists() and not (here / d).is_symlink():
                keep.append(d)
        dirnames[:] = keep
    return sorted(removed)


# ------------------------------------------------------------------------------------ locks
def lock_holder(folder: str | os.PathLike) -> dict | None:
    """``{"pid", "host", "command"}`` of the process holding ``folder``'s lock, ``None`` when nobody
    holds it (a lock file left by a killed process is not held)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    holder = {"pid": None, "host": None, "command": "raydn"}
    for _ in range(20):  # the holder writes its record right after taking the lock
        try:
            rec = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            holder.update({k: rec.get(k) for k in holder if rec.get(k) is not None})
            break
        time.sleep(0.01)
    return holder


def describe_holder(holder: dict) -> str:
    """``raydn train (pid 123)`` / ``raydn train (pid 123 on node7)``."""
    where = f"pid {holder['pid']}" if holder.get("pid") is not None else "pid unknown"
    if holder.get("host") and holder["host"] != socket.gethostname():
        where += f" on {holder['host']}"
    return f"{holder.get('command') or 'raydn'} ({where})"


class FolderLock:
    """Exclusive ``fcntl.flock`` on ``folder/.raydn.lock`` (created if needed; its content names the
    holder: pid, host, command). The kernel releases it when the process dies, ``kill -9``
    included; :meth:`release` also removes the file. ``wait=False``: :meth:`acquire` raises
    :class:`FolderBusyError` at once when another process holds it; ``wait=True``: it calls
    ``on_wait(holder)`` once, then blocks until the lock is free."""

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: bool = False, on_wait: Callable[[dict], None] | None = None) -> "FolderLock":
        if fcntl is None:  # pragma: no cover - not POSIX (see the import)
            return self
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this FolderLock")
        told = False
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    if not wait:
                        raise FolderBusyError(f"another {describe_holder(holder)} is writing into "
                                              f"{self.folder}; wait for it to end or choose another "
                                              f"output folder") from None
                    if not told and on_wait is not None:
                        on_wait(holder)
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # the previous holder may have removed the file between our open and our lock:
                # the lock is only ours if the path still names the inode we locked
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "command": f"raydn {self.command}"}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd = fd
            return self

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still held: no other process can be holding this name
        os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped without release (the fd would leak the lock)
        with contextlib.suppress(Exception):
            self.release()


class OutputFolder:
    """The output folder of one command, for the command's lifetime: :meth:`open` creates it
    (parents too), takes its :class:`FolderLock` (``wait`` / ``on_wait`` as there) and removes the
    temporary files of interrupted earlier writes (``removed``: their paths; ``depth`` as in
    :func:`clean_stale_temp_files`); :meth:`close` releases
    the lock and removes the folder again when this command created it and no file was written
    into it (a failed or interrupted first run leaves no empty folder, nor empty sub-folders).
    Also a context manager."""

    def __init__(self, path: str | os.PathLike, command: str, wait: bool = False,
                 on_wait: Callable[[dict], None] | None = None, depth: int = 1):
        self.path = Path(path)
        self.depth = depth  # of the stale temporary files' search (clean_stale_temp_files)
        self.command = command
        self.wait, self.on_wait = wait, on_wait
        self.created = False
        self.removed: list[Path] = []
        self._lock = FolderLock(self.path, command)

    def open(self) -> "OutputFolder":
        if self.path.exists() and not self.path.is_dir():
            raise RaydnError(f"output folder {self.path} is a file, expected a folder")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RaydnError(f"cannot create output folder {self.path}: {e.strerror or e}") from None
        try:
            self._lock.acquire(wait=self.wait, on_wait=self.on_wait)
            self.removed = clean_stale_temp_files(self.path, self.depth)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self._lock.release()
        if self.created:  # remove the folders of the tree that hold nothing, deepest first
            dirs = [Path(d) for d, _, _ in os.walk(self.path)] if self.path.is_dir() else []
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):  # not empty: kept
                    d.rmdir()
            self.created = False

    def __enter__(self) -> "OutputFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["FolderLock", "LOCK_NAME", "OutputFolder", "TEMP_MARK", "atomic_path", "atomic_torch_save",
           "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "clean_stale_temp_files",
           "current_umask", "default_file_mode", "describe_holder", "is_temp_name", "lock_holder"]
