"""Output folders: two ``raydn train`` runs into one ``--out`` (the second fails at once, naming the
first), the lock released when its holder dies (``kill -9`` included), leftovers of killed writes
removed by the next command, no empty folder left by a command that wrote nothing, file modes that
follow the umask."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from raydn.cli import main as cli_main
from raydn.errors import FolderBusyError
from raydn.io import (LOCK_NAME, FolderLock, OutputFolder, atomic_torch_save, atomic_write_json,
                      clean_stale_temp_files, lock_holder)
from _deps import require
from _procs import CHILD_ENV, raydn_argv, wait_for


def _train_cmd(infos, out, *extra):
    return raydn_argv("train", "--preset", "tiny_raydn", "--data", infos[1]["train"], "--out", out, "--device", "cpu",
                      "--workers", "0", "--no-progress", "--log-interval", "1", *extra)


def _iterations_logged(out):
    log = out / "log.txt"
    return log.is_file() and '"iter"' in log.read_text()


def test_second_train_into_a_busy_folder_fails_at_once(synth_infos, tmp_path):
    """While one ``raydn train`` writes into OUT, a second one into OUT exits 2 within seconds with one
    line naming the first (pid) and touches nothing; the first then ends normally (SIGTERM here) and
    releases the folder: a third run resumes from its checkpoint."""
    out = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(synth_infos, out, "--max-iters", "500", "--ckpt-interval", "1000"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        wait_for(lambda: _iterations_logged(out), first, "first run never trained")
        log_before = (out / "log.txt").read_text()
        t0 = time.time()
        second = subprocess.run(_train_cmd(synth_infos, out, "--max-iters", "2"), capture_output=True,
                                text=True, env=CHILD_ENV, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr == (f"raydn train: error: another raydn train (pid {first.pid}) is writing into {out}; "
                                 f"wait for it to end or choose another output folder\n"), second.stderr
        assert "Traceback" not in second.stdout + second.stderr
        # refused before the model, the data loader or the stem cache were built
        assert time.time() - t0 < 60
        assert (out / "log.txt").read_text().startswith(log_before)   # nothing of the second run
        first.send_signal(signal.SIGTERM)
        f_out, f_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, f_err[-3000:]
    assert lock_holder(out) is None and not (out / LOCK_NAME).exists()
    third = subprocess.run(_train_cmd(synth_infos, out, "--max-iters", "2"), capture_output=True, text=True,
                           env=CHILD_ENV, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    """``kill -9`` cannot clean up: the lock file stays, but the kernel released the lock, so the next
    command takes the folder; a live holder is named (pid, command) in the refusal."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom raydn.io import FolderLock\n"
                               "lock = FolderLock(sys.argv[1], 'export').acquire()\nprint('locked', flush=True)\n"
                               "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert lock_holder(out) == {"pid": holder.pid, "host": os.uname().nodename, "command": "raydn export"}
        with pytest.raises(FolderBusyError, match=rf"another raydn export \(pid {holder.pid}\) is writing into {out}"):
            OutputFolder(out, "eval").open()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).exists() and lock_holder(out) is None      # stale file, no lock
    with OutputFolder(out, "eval") as folder:
        assert lock_holder(out)["pid"] == os.getpid() and folder.created is False
    assert not (out / LOCK_NAME).exists()


def test_waiting_lock_is_not_fooled_by_a_removed_lock_file(tmp_path):
    """A waiter that opened the lock file before the holder removed it must not hold a lock on the
    removed file while a third process locks a new one: the lock is only held on the current file."""
    out = tmp_path / "run"
    first = FolderLock(out, "prepare").acquire()
    stale = os.open(out / LOCK_NAME, os.O_RDWR)     # what a waiter holds open
    first.release()
    os.close(stale)
    second = FolderLock(out, "prepare").acquire()
    try:
        with pytest.raises(FolderBusyError):
            FolderLock(out, "prepare").acquire()
    finally:
        second.release()


def test_leftovers_of_killed_writes_are_removed_by_the_next_command(tmp_path):
    """Temporary names of raydn.io (and of earlier versions: checkpoints, the export's staging folder)
    are removed on opening the folder and its sub-folders; other hidden files, a sub-folder another
    command holds, and deeper folders (a dataroot's image folders) are left alone."""
    out = tmp_path / "out"
    (out / "eval" / "plots").mkdir(parents=True)
    (out / "busy").mkdir()
    (out / "samples" / "CAM_FRONT").mkdir(parents=True)
    stale = [out / ".results_nusc.k2j4ab_c.raydn-tmp.json", out / ".latest.k2j4abcd.pt",
             out / ".iter_0000004.rank1.x1y2z3w4.pt", out / "eval" / ".metrics.abcdefgh.raydn-tmp.json",
             out / ".report.abcdefgh.raydn-tmp"]
    kept = [out / ".hidden", out / ".latest.pt.bak", out / "notes.raydn-tmp.txt", out / "busy" / ".a.abcdefgh.raydn-tmp.json",
            out / "samples" / "CAM_FRONT" / ".x.abcdefgh.raydn-tmp.jpg", out / "eval" / "plots" / ".p.abcdefgh.raydn-tmp.png",
            out / "results_nusc.json"]
    for p in stale + kept:
        p.write_bytes(b"x")
    (out / ".raydn-export-q1w2e3r4").mkdir()
    (out / ".raydn-export-q1w2e3r4" / "encoder.onnx").write_bytes(b"x")
    (out / "busy" / LOCK_NAME).write_bytes(b"")
    with OutputFolder(out, "eval") as folder:
        assert sorted(folder.removed) == sorted(stale + [out / ".raydn-export-q1w2e3r4"])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert not (out / ".raydn-export-q1w2e3r4").exists()
    assert clean_stale_temp_files(tmp_path / "missing") == []


def test_atomic_write_removes_its_temp_file_on_sigterm(tmp_path):
    """SIGTERM in the middle of a write (under the CLI's handlers): Terminated, no temporary file, no
    destination file."""
    from raydn import termination
    from raydn.errors import Terminated
    from raydn.io import atomic_path
    with termination.handlers():
        with pytest.raises(Terminated) as e:
            with atomic_path(tmp_path / "results.json") as tmp:
                tmp.write_text("{half")
                signal.raise_signal(signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM and str(e.value) == "SIGTERM"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, mask):
    """Files written through temporary files get ``0o666 & ~umask`` like a plain open() (mkstemp: 0600)."""
    from raydn.interop.convert import save_state_dict_atomic
    old = os.umask(mask)
    try:
        paths = [atomic_write_json(tmp_path / "a.json", {"x": 1}),
                 atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "b.pt")]
        save_state_dict_atomic({"w": torch.ones(1)}, tmp_path / "c.pt")
        paths.append(tmp_path / "c.pt")
        with OutputFolder(tmp_path / "d", "eval"):
            (tmp_path / "d" / "x").write_bytes(b"")
            assert (os.stat(tmp_path / "d" / LOCK_NAME).st_mode & 0o777) == 0o666 & ~mask
    finally:
        os.umask(old)
    for p in paths:
        assert (os.stat(p).st_mode & 0o777) == 0o666 & ~mask, p


def test_a_command_that_writes_nothing_leaves_no_folder(tmp_path):
    """OutputFolder removes the folders it created when they hold no file (sub-folders too), keeps one
    that existed before or that got a file."""
    with pytest.raises(RuntimeError):
        with OutputFolder(tmp_path / "a" / "b", "eval") as f:
            (f.path / "plots").mkdir()
            raise RuntimeError("boom")
    assert not (tmp_path / "a" / "b").exists() and (tmp_path / "a").exists()  # only what it created
    (tmp_path / "c").mkdir()
    with OutputFolder(tmp_path / "c", "eval"):
        pass
    assert (tmp_path / "c").is_dir()
    with OutputFolder(tmp_path / "d", "eval") as f:
        (f.path / "m.json").write_text("{}")
    assert (tmp_path / "d" / "m.json").is_file()


def test_eval_the_devkit_rejects_leaves_no_empty_out_folder(synth_infos, synth_world, tmp_path, capsys):
    """A submission past our checks that the devkit rejects (scored against another split): exit 2, one
    line, and the --out folder it would have written is not left behind empty."""
    require("nuscenes")
    from test_submission_inputs import _write
    from raydn.data.infos import load_info_file
    from raydn.eval.submission import build_submission
    infos = load_info_file(synth_infos[1]["val"])["infos"]
    dets = [{"boxes": np.zeros((0, 9), np.float32), "scores": np.zeros(0, np.float32),
             "labels": np.zeros(0, np.int64)} for _ in infos]          # a valid, empty submission
    path = _write(tmp_path / "sub", build_submission(dets, infos))
    out = tmp_path / "metrics"
    rc = cli_main(["eval", "--submission", str(path), "--data", str(synth_infos[1]["val"]), "--dataroot",
                   str(synth_world), "--eval-set", "mini_train", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "rejected by the nuScenes devkit" in err and "Traceback" not in err, err
    assert not out.exists()
