"""Subprocess for the kill -9 tests: trains the tiny preset and SIGKILLs itself at a chosen point.

usage: python train_kill_worker.py INFOS OUT MODE ITERATION THREADS
MODE ``run``:  killed right after iteration ITERATION finished (no checkpoint write in progress);
MODE ``save``: killed in the middle of writing ``iter_{ITERATION}.pt`` (half the bytes on disk).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from raydn.engine.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared options
from _train_options import train_options  # noqa: E402


def main() -> None:
    infos, out, mode, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]))   # the parent's: same reductions, same bits
    opts = train_options(infos, out, ckpt_interval=2)   # test_training_interruptions.py's _opts
    if mode == "run":
        step = Trainer.train_step

        def train_step(self, batch):
            logged = step(self, batch)
            if self.iteration == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return logged
        Trainer.train_step = train_step
    elif mode == "save":
        save = torch.save

        def partial_save(obj, f, *a, **kw):
            name = getattr(f, "name", str(f))
            if f".iter_{at:07d}." in os.path.basename(str(name)):
                f.write(b"PK\x03\x04" + b"\x00" * 1000)   # the start of a zip, then nothing
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *a, **kw)
        torch.save = partial_save
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    Trainer(opts).run()
    raise SystemExit("not killed")


if __name__ == "__main__":
    main()
