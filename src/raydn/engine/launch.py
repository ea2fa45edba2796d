"""Data-parallel training on one CPU machine without ``torchrun``: K local gloo processes.

On a small CPU (the demo's 2 cores) one training process uses its threads poorly: the demo step
is hundreds of small ops, and a second intra-op thread buys ~10 % (measured in
``benchmarks/bench_train_procs.py``). Two processes of one thread each, each with half the batch,
do nearly twice the work per second -- the same recipe (total batch, lr, schedule) as one
process, the same code path as ``torchrun`` (:mod:`raydn.engine.distributed`).

    result = train_local_processes(opts, procs=2)        # -> rank 0's ``Trainer.run()`` result
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from raydn import termination
from raydn.engine.train import TrainOptions, train
from raydn.errors import Terminated
from raydn.io import atomic_write_json

_RESULT = "result.json"


def default_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_procs(total_batch: int, device: str = "cpu") -> int:
    """Processes worth launching on this machine: one per core up to the total batch (CPU only)."""
    return 1 if device != "cpu" else max(1, min(int(total_batch), default_cores()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, opts: TrainOptions, world: int, port: int, threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        with termination.handlers():  # SIGTERM: every rank stops at one iteration, with a checkpoint
            result = train(replace(opts, progress=opts.progress and rank == 0))
    except Terminated as e:
        sys.exit(128 + e.signum)  # the parent turns this exit status back into Terminated
    if rank == 0:
        atomic_write_json(Path(opts.out_dir) / _RESULT, result)


#: seconds the training processes get to save a checkpoint and leave after a SIGTERM
_GRACE_S = 60.0


def _stop(processes) -> None:
    """SIGTERM the live ``processes`` (they save and leave: :mod:`raydn.termination`), SIGKILL those
    still alive after :data:`_GRACE_S` seconds."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _GRACE_S
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def train_local_processes(opts: TrainOptions, procs: int, threads_per_proc: int | None = None) -> dict:
    """Train ``opts`` in ``procs`` local processes (DDP over gloo); returns rank 0's result dict
    (``iteration``, ``history``, ``checkpoint``, ``schedule``). ``procs == 1`` trains in this process.

    The recipe's total batch is split over the processes (``batch_per_gpu = total / procs``), so the
    schedule is the one-process schedule; each process gets ``cores // procs`` threads by default.
    A failure in any process raises here (``torch.multiprocessing.ProcessRaisedException``) with
    that process's traceback.
    """
    if procs < 1:
        raise ValueError(f"train_local_processes: procs must be >= 1, got {procs}")
    if procs == 1:
        return train(opts)
    threads = threads_per_proc or max(1, default_cores() // procs)
    result_file = Path(opts.out_dir) / _RESULT
    result_file.unlink(missing_ok=True)
    # OMP_NUM_THREADS for the children's OpenMP pools (read when torch loads in the child)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        ctx = mp.start_processes(_worker, args=(opts, procs, _free_port(), threads), nprocs=procs,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(grace_period=_GRACE_S):
                pass
        except mp.ProcessExitedException as e:
            if e.exit_code - 128 in (signal.SIGTERM, signal.SIGHUP):
                raise Terminated(e.exit_code - 128) from None
            raise
        except BaseException:  # this process interrupted (SIGTERM, Ctrl-C): no child outlives it
            _stop(ctx.processes)
            raise
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return json.loads(result_file.read_text())
