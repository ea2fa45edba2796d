"""SIGTERM and SIGHUP as an exception: :class:`raydn.errors.Terminated` (a ``KeyboardInterrupt``).

``timeout``, batch schedulers (SLURM sends SIGTERM to every task before SIGKILL), container runtimes
and a closed terminal (SIGHUP) end a process with a signal whose default action leaves no message and
skips every clean-up. :func:`handlers` (installed by ``raydn.cli.main`` for every command, and by the
local training processes of :mod:`raydn.engine.launch`) turns them into ``Terminated``, so the
clean-up paths Ctrl-C already runs (temporary files of :mod:`raydn.io`, output folders, the trainer's
``finally``) run for them too; the CLI prints ``raydn CMD: terminated (SIGTERM)`` and exits 143.

* Only the process that installed the handlers raises. A forked data-loader worker (which inherits
  them) ignores the signal: its owner ends it when it stops (and torch's watchdog ends it when the
  owner died); any other forked process gets the default action back.
* Inside :func:`deferred` (the training loop) the signal is only recorded; the code polls
  :func:`pending` at a consistent point (between iterations), saves, then raises ``Terminated``.
* After one ``Terminated`` was raised, repeated signals are ignored so that the clean-up is not
  interrupted half-way (SIGKILL, which a scheduler sends after its grace period, still ends it).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

from torch.utils.data import get_worker_info

from raydn.errors import Terminated

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)

_owner: int | None = None      # pid of the process whose handlers raise
_defer_depth = 0
_pending: int | None = None    # signal received while deferred (or not yet raised)
_raised = False


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    global _pending, _raised
    if os.getpid() != _owner:  # a forked child inherited the handler
        try:
            loader_worker = get_worker_info() is not None
        except Exception:  # pragma: no cover - torch half-imported
            loader_worker = False
        if loader_worker:
            return  # the owner shuts its loader workers down when it stops
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _raised:
        return  # clean-up in progress
    _pending = signum
    if _defer_depth > 0:
        return
    _raised = True
    raise Terminated(signum)


@contextlib.contextmanager
def handlers() -> Iterator[None]:
    """SIGTERM / SIGHUP raise :class:`Terminated` in this process while the block runs; the previous
    handlers come back afterwards. A no-op outside the main thread (Python allows handlers only there)."""
    global _owner, _pending, _raised, _defer_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    state = (_owner, _pending, _raised, _defer_depth)
    _owner, _pending, _raised, _defer_depth = os.getpid(), None, False, 0
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _owner, _pending, _raised, _defer_depth = state


def installed() -> bool:
    """Whether :func:`handlers` is active in this process."""
    return _owner == os.getpid()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a SIGTERM / SIGHUP is only recorded (see :func:`pending`); one received
    there and not acted on is raised when the block ends."""
    global _defer_depth, _raised
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
    if _defer_depth == 0 and _pending is not None and not _raised and installed():
        _raised = True
        raise Terminated(_pending)


def pending() -> int | None:
    """The signal received inside :func:`deferred` and not raised yet (``None``: none)."""
    return None if _raised else _pending


def raise_pending(signum: int | None = None) -> None:
    """Raise :class:`Terminated` for the pending signal (or ``signum``: another rank's)."""
    global _raised
    signum = signum or _pending or signal.SIGTERM
    _raised = True
    raise Terminated(signum)


__all__ = ["SIGNALS", "deferred", "handlers", "installed", "pending", "raise_pending"]
