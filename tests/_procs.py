"""Helpers of the tests that run ``raydn`` in child processes (signals, run folders, prepare locks)."""
from __future__ import annotations

import os
import sys
import time

import pytest

# one thread per child (2 shared cores), output line by line
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def raydn_argv(*argv) -> list[str]:
    """The command line of ``python -m raydn.cli ARGV...`` (arguments converted with ``str``)."""
    return [sys.executable, "-m", "raydn.cli", *map(str, argv)]


def wait_for(cond, proc, what: str, timeout: float = 240) -> None:
    """Poll ``cond()`` every 50 ms until it holds. Fails naming ``what`` (with the child's output)
    when ``proc`` ends first, or after ``timeout`` seconds (a liveness bound: generous)."""
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{what}: the process ended first (rc {proc.returncode})\n{out[-2000:]}\n{err[-2000:]}")
        assert time.time() < deadline, what
        time.sleep(0.05)


def slow_prepare_script(sleep_s: float) -> str:
    """Python source for ``python -c SCRIPT DATAROOT OUT``: ``raydn prepare`` (v1.0-mini, no progress)
    that sleeps ``sleep_s`` seconds per sample it builds, so a test can act while it holds OUT."""
    return f"""
import sys, time
import raydn.data.prepare as p
build = p.build_info
def slow(*a, **kw):
    time.sleep({sleep_s!r})
    return build(*a, **kw)
p.build_info = slow
from raydn.cli import main
sys.exit(main(["prepare", "--dataroot", sys.argv[1], "--version", "v1.0-mini", "--out", sys.argv[2],
               "--no-progress"]))
"""
