"""SIGTERM / SIGHUP (``timeout``, schedulers, container runtimes, a closed terminal) and a closed
stdout pipe: one line, exit ``128 + signal`` (141 for the pipe), no traceback, no temporary file, no
empty folder, no orphaned loader worker; training saves a checkpoint first (``--resume auto``
continues from it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raydn import termination
from raydn.errors import Terminated
from raydn.io import LOCK_NAME, lock_holder
from _procs import CHILD_ENV, raydn_argv, slow_prepare_script, wait_for

def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):  # a zombie: ended, not reaped yet
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_during_training_saves_and_exits_143(synth_infos, tmp_path):
    """SIGTERM to ``raydn train`` (one loader worker) mid-run: the current iteration finishes, latest.pt
    and iter_N.pt are written, one line ``raydn train: terminated (SIGTERM)``, exit 143; no temporary
    file, no lock left, the loader worker gone; ``--resume auto`` continues from iteration N."""
    from raydn.engine.train import Trainer, TrainOptions
    out = tmp_path / "run"
    proc = subprocess.Popen(raydn_argv("train", "--preset", "tiny_raydn", "--data", synth_infos[1]["train"], "--out", out,
                                       "--device", "cpu", "--workers", "1", "--no-progress", "--log-interval", "1",
                                       "--max-iters", "500", "--ckpt-interval", "1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        wait_for(lambda: (out / "log.txt").is_file() and '"iter"' in (out / "log.txt").read_text(), proc,
                 "training never started")
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        p_out, p_err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, p_err[-3000:]
    assert p_err.endswith("raydn train: terminated (SIGTERM)\n") and "Traceback" not in p_err, p_err[-3000:]
    line = [ln for ln in p_out.splitlines() if ln.startswith("SIGTERM: stopped at iteration")]
    assert line, p_out[-3000:]
    n = int(line[0].split()[4].rstrip(","))
    assert f"checkpoint {out / 'latest.pt'} saved; continue with --resume auto" in line[0]
    assert torch.load(out / "latest.pt", weights_only=True)["iteration"] == n
    assert torch.load(out / f"iter_{n:07d}.pt", weights_only=True)["iteration"] == n
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], list(out.iterdir())
    assert lock_holder(out) is None and not (out / LOCK_NAME).exists()
    assert workers and all(_gone(w) for w in workers), workers
    trainer = Trainer(TrainOptions(preset="tiny_raydn", data=str(synth_infos[1]["train"]), out_dir=str(out),
                                   max_iters=500, workers=0, progress=False, tensorboard=False, device="cpu",
                                   resume="auto"))
    try:
        assert trainer.iteration == n
    finally:
        trainer.close()


_SLOW_PREPARE = slow_prepare_script(0.3)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_during_prepare_leaves_no_folder(synth_world, tmp_path, sig):
    """``raydn prepare`` into a new folder, ended by SIGTERM / SIGHUP while it reads the tables: one
    line, exit 128 + signal, and the folder it created is gone (not left empty)."""
    out = tmp_path / "infos"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(synth_world), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        wait_for(lambda: lock_holder(out) is not None, proc, "prepare never took the folder")
        time.sleep(0.5)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert err == f"raydn prepare: terminated ({sig.name})\n", err[-3000:]
    assert not out.exists()


def test_closed_stdout_pipe_is_quiet():
    """``raydn presets | head -1`` where head has gone: exit 141 (as a tool killed by SIGPIPE), nothing
    on stderr (no BrokenPipeError traceback, no 'Exception ignored' at exit)."""
    r, w = os.pipe()
    os.close(r)                               # the reader is gone before anything is written
    try:
        proc = subprocess.run(raydn_argv("presets"), stdout=w, stderr=subprocess.PIPE, text=True, env=CHILD_ENV, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_deferred_signal_is_raised_at_the_end_of_the_block():
    """Inside deferred() a SIGTERM is only recorded (the trainer polls it between iterations); it is
    raised when the block ends, and once raised, repeated signals do not interrupt the clean-up."""
    with termination.handlers():
        with pytest.raises(Terminated) as e:
            with termination.deferred():
                signal.raise_signal(signal.SIGTERM)
                assert termination.pending() == signal.SIGTERM    # still running
        assert e.value.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGTERM)                      # clean-up in progress: ignored
        assert termination.pending() is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    assert not termination.installed()


def test_forked_child_keeps_the_default_action():
    """A forked process (not a loader worker) that inherited the handlers dies of SIGTERM as usual
    instead of raising in code that does not expect it."""
    with termination.handlers():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                os._exit(7)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
