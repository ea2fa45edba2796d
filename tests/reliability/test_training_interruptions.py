"""Training interrupted or starved: ``kill -9`` mid-run and mid-checkpoint-write, a corrupt
``latest.pt``, a full disk during a checkpoint write, checkpoint retention. Tiny preset, 6 iterations,
checkpoints every 2; the resumed runs must equal the uninterrupted one bit for bit (CPU)."""
from __future__ import annotations

from functools import partial
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydn.cli import main as cli_main
from raydn.engine.train import Trainer
from raydn.errors import CheckpointError
from _train_options import train_options

HERE = Path(__file__).resolve().parent


_opts = partial(train_options, ckpt_interval=2)  # train_kill_worker.py's run


@pytest.fixture(scope="module")
def uninterrupted(synth_infos, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    res = Trainer(_opts(synth_infos, out)).run()
    return res, torch.load(out / "latest.pt", weights_only=True)


def _assert_same_run(resumed_dir, resumed, uninterrupted):
    full, ck_full = uninterrupted
    assert resumed["iteration"] == 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    ck = torch.load(Path(resumed_dir) / "latest.pt", weights_only=True)
    for k, v in ck_full["model"].items():
        assert torch.equal(v, ck["model"][k]), k     # same computation on the same CPU: bit-exact


def _kill_run(infos, out, mode, at):
    proc = subprocess.run([sys.executable, str(HERE / "train_kill_worker.py"), str(infos[1]["train"]), str(out),
                           mode, str(at), str(torch.get_num_threads())], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("mode, at, last_complete", [("run", 5, 4), ("save", 4, 2)])
def test_kill9_then_resume_auto_is_bit_exact(synth_infos, uninterrupted, tmp_path, capsys, mode, at,
                                             last_complete):
    """kill -9 after iteration 5 (checkpoint 4 complete) or while iter_0000004.pt is being written
    (checkpoint 2 complete, a half-written temp file left): --resume auto removes the temp file,
    continues from the last complete checkpoint and ends equal to the uninterrupted run."""
    out = tmp_path / "run"
    _kill_run(synth_infos, out, mode, at)
    temps = sorted(p.name for p in out.glob(".iter_*.pt"))
    assert bool(temps) == (mode == "save"), temps
    assert torch.load(out / "latest.pt", weights_only=True)["iteration"] == last_complete
    trainer = Trainer(_opts(synth_infos, out, resume="auto"))
    assert trainer.iteration == last_complete
    assert not list(out.glob(".iter_*.pt")) and not list(out.glob(".latest*.pt"))
    if temps:
        assert f"removed {temps[0]}" in capsys.readouterr().out
    _assert_same_run(out, trainer.run(), uninterrupted)


def test_corrupt_latest_falls_back_to_the_newest_intact_iter_checkpoint(synth_infos, uninterrupted,
                                                                        tmp_path, capsys):
    out = tmp_path / "corrupt"
    Trainer(_opts(synth_infos, out, stop_after=4)).run()
    latest = out / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:5000])                     # truncated copy
    trainer = Trainer(_opts(synth_infos, out, resume="auto"))
    text = capsys.readouterr().out
    assert f"warning: cannot resume from {latest}: {latest}: corrupt or truncated checkpoint" in text, text
    assert f"resuming from {out / 'iter_0000004.pt'} (iteration 4)" in text, text
    assert trainer.iteration == 4
    _assert_same_run(out, trainer.run(), uninterrupted)


def test_explicit_corrupt_checkpoint_names_the_intact_one(synth_infos, tmp_path, capsys):
    out = tmp_path / "explicit"
    Trainer(_opts(synth_infos, out, stop_after=4)).run()
    bad = out / "iter_0000004.pt"
    bad.write_bytes(b"\x00" * 100)
    rc = cli_main(["train", "--preset", "tiny_raydn", "--data", str(synth_infos[1]["train"]), "--out", str(out),
                   "--resume", str(bad), "--workers", "0", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{bad}: not a PyTorch checkpoint" in err
    assert f"the newest intact checkpoint beside it is {out / 'iter_0000002.pt'} (iteration 2)" in err, err


def test_unreadable_latest_without_alternatives_is_an_error(synth_infos, tmp_path):
    out = tmp_path / "alone"
    out.mkdir()
    (out / "latest.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"latest\.pt cannot be read and no intact iter_\*\.pt"):
        Trainer(_opts(synth_infos, out, resume="auto"))


def test_full_disk_during_checkpoint_write_keeps_the_previous_one(synth_infos, tmp_path, monkeypatch):
    """torch.save raising ENOSPC half-way through iter_0000004.pt: a clear CheckpointError, the previous
    checkpoints intact and loadable, no temp file, no iter_0000004.pt."""
    out = tmp_path / "full_disk"
    save = torch.save

    def failing_save(obj, f, *a, **kw):
        if ".iter_0000004." in os.path.basename(getattr(f, "name", "")):
            f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as e:
        Trainer(_opts(synth_infos, out)).run()
    msg = str(e.value)
    assert f"cannot write checkpoint {out / 'iter_0000004.pt'}: disk full (errno {errno.ENOSPC})" in msg, msg
    assert f"the previous checkpoint {out / 'latest.pt'} is intact" in msg
    assert not (out / "iter_0000004.pt").exists()
    assert sorted(p.name for p in out.glob("*.pt")) == ["iter_0000002.pt", "latest.pt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.suffix == ".pt"]
    for name in ("latest.pt", "iter_0000002.pt"):
        assert torch.load(out / name, weights_only=True)["iteration"] == 2


def test_keep_last_retains_only_the_newest_checkpoints(synth_infos, tmp_path):
    out = tmp_path / "keep"
    Trainer(_opts(synth_infos, out, max_iters=4, ckpt_interval=1, keep_last=2)).run()
    assert sorted(p.name for p in out.glob("*.pt")) == ["iter_0000003.pt", "iter_0000004.pt", "latest.pt"]
    assert torch.load(out / "latest.pt", weights_only=True)["iteration"] == 4
    # the CLI option reaches the trainer and refuses nonsense
    rc = cli_main(["train", "--preset", "tiny_raydn", "--data", str(synth_infos[1]["train"]),
                   "--out", str(tmp_path / "k0"), "--keep-last", "0"])
    assert rc == 2 and not (tmp_path / "k0").exists()
