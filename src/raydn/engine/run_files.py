"""The checkpoint files of a run folder: which one to resume from, stale temporary files, retention,
and writing them so that a failed write (full disk, ``kill -9``) never costs the previous checkpoint.

Layout written by the trainer: ``iter_0000500.pt`` (every ``ckpt_interval`` iterations) and
``latest.pt`` (a copy of the newest), plus ``*.rank{r}.pt`` per-rank files under DDP. Every file is
written to a temporary ``.{name}.XXXXXXXX.raydn-tmp.pt`` beside it and renamed into place
(``raydn.io``), so a file with a final name is always complete; a process killed mid-write leaves
only the temporary file, which the next run removes when it opens the folder (:func:`open_run_folder`:
the folder's lock, then :func:`clean_stale_temp_files`).
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Callable

from raydn import io as raydn_io
from raydn.engine.distributed import broadcast_int
from raydn.errors import CheckpointError, FolderBusyError
from raydn.io import OutputFolder

_ITER_RE = re.compile(r"^iter_(\d{7})\.pt$")


def iteration_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the ``iter_*.pt`` files (main rank) in ``out_dir``, newest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _ITER_RE.match(p.name))]
    return sorted(found, reverse=True)


def clean_stale_temp_files(out_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary files left by an interrupted write (``kill -9`` mid-save); returns the removed
    paths. :func:`raydn.io.clean_stale_temp_files` (the one implementation; only the temporary names
    of :mod:`raydn.io` are touched) -- the trainer gets it through :func:`open_run_folder`."""
    return raydn_io.clean_stale_temp_files(out_dir)


def open_run_folder(out_dir: str | os.PathLike, is_main: bool = True) -> "OutputFolder | None":
    """Open the run folder of a training run for its lifetime (:class:`raydn.io.OutputFolder`):
    created, locked against a second ``raydn train`` (which fails at once with
    :class:`~raydn.errors.FolderBusyError` naming this process), temporary files of interrupted
    writes removed (printed). Under DDP only the main rank takes the lock (the ranks share the
    folder legitimately); the others learn the outcome from it so that all ranks fail alike.
    Returns the open folder (main rank) or ``None``; close it when the run ends."""
    folder, error = None, None
    if is_main:
        try:
            folder = OutputFolder(out_dir, "train").open()
        except FolderBusyError as e:
            error = e
        else:
            for stale in folder.removed:
                print(f"removed {stale.relative_to(folder.path)}, a write that did not finish", flush=True)
    if broadcast_int(0 if is_main and error is None else 1) != 0:
        raise error if error is not None else FolderBusyError(
            f"another raydn train is writing into {out_dir} (rank 0 could not lock it)")
    return folder


def _rank_file(path: Path, rank: int) -> Path:
    return path.with_name(path.stem + f".rank{rank}.pt")


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int | None, world_size: int = 1) -> list[Path]:
    """Keep the newest ``keep_last`` ``iter_*.pt`` files (and their per-rank files), delete the older
    ones; ``None`` keeps everything. ``latest.pt`` is never deleted. Returns the removed paths."""
    if keep_last is None:
        return []
    if keep_last < 1:
        raise CheckpointError(f"--keep-last must be >= 1 (got {keep_last})")
    removed = []
    for _, path in iteration_checkpoints(out_dir)[keep_last:]:
        for p in [path] + [_rank_file(path, r) for r in range(1, world_size)]:
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed


def save_or_explain(save: Callable[[], None], path: Path, previous: Path | None) -> None:
    """Run ``save`` (which writes ``path`` atomically); an ``OSError`` (full disk, quota, read-only
    folder) becomes a :class:`CheckpointError` that says the previous checkpoint is intact."""
    try:
        save()
    except OSError as e:
        why = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        keep = (f"the previous checkpoint {previous} is intact; free space, then continue with --resume auto"
                if previous is not None and previous.exists() else "no earlier checkpoint exists")
        raise CheckpointError(f"cannot write checkpoint {path}: {why} (errno {e.errno}); nothing "
                              f"half-written was left behind, {keep}") from None


def find_resume_checkpoint(out_dir: str | os.PathLike, where: str | None,
                           load: Callable[[Path], dict], warn: Callable[[str], None] = print
                           ) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from: ``(checkpoint dict, path)`` or ``(None, None)`` for a fresh start.

    ``where='auto'``: the newest complete checkpoint of ``out_dir`` -- ``latest.pt``, or an
    ``iter_*.pt`` of a later iteration (a run killed between writing ``iter_N.pt`` and ``latest.pt``),
    and when ``latest.pt`` cannot be read (corrupt) the newest intact ``iter_*.pt``, with a warning
    naming the corrupt file. A path: exactly that file; if it cannot be read the error names the
    newest intact checkpoint beside it to use instead."""
    if not where:
        return None, None
    out_dir = Path(out_dir)
    if where != "auto":
        path = Path(where)
        try:
            return load(path), path
        except CheckpointError as e:
            alt = _newest_intact(path.parent, load, exclude=path)
            hint = (f"; the newest intact checkpoint beside it is {alt[1]} (iteration {alt[0]['iteration']}):"
                    f" pass --resume {alt[1]} or --resume auto" if alt else "")
            raise CheckpointError(f"{e}{hint}") from None
    latest = out_dir / "latest.pt"
    ckpt = None
    if latest.exists():
        try:
            ckpt = load(latest)
        except CheckpointError as e:
            warn(f"warning: cannot resume from {latest}: {e}")
    newer = [(it, p) for it, p in iteration_checkpoints(out_dir)
             if ckpt is None or it > int(ckpt.get("iteration", -1))]
    for it, p in newer:
        try:
            found = load(p)
        except CheckpointError as e:
            warn(f"warning: skipping unreadable checkpoint {p}: {e}")
            continue
        if ckpt is None:
            warn(f"resuming from {p} (iteration {it}), the newest intact checkpoint")
        return found, p
    if ckpt is not None:
        return ckpt, latest
    if latest.exists():
        raise CheckpointError(f"{latest} cannot be read and no intact iter_*.pt checkpoint lies beside it; "
                              f"start afresh in another --out folder (or remove {latest})")
    return None, None


def _newest_intact(folder: Path, load, exclude: Path):
    for _, p in iteration_checkpoints(folder):
        if p.resolve() == exclude.resolve():
            continue
        try:
            return load(p), p
        except CheckpointError:
            continue
    return None


__all__ = ["clean_stale_temp_files", "find_resume_checkpoint", "iteration_checkpoints", "open_run_folder",
           "prune_checkpoints",
           "save_or_explain"]
