"""Training engine: schedule derivation, learning, exact resume, torchrun/DDP (CPU, tiny preset)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raydn.engine.schedule import derive_schedule, lr_factor
from raydn.engine.train import Trainer
from _train_options import train_options

REPO = Path(__file__).resolve().parents[2]


def test_schedule_follows_total_batch():
    ref = dict(num_train_frames=28130, reference_total_batch=16, reference_lr=4e-4, epochs=60,
               reference_warmup_iters=500)
    s = derive_schedule(world_size=8, batch_per_gpu=2, **ref)
    assert (s.iters_per_epoch, s.max_iters, s.warmup_iters) == (1758, 105480, 500)
    assert s.lr == pytest.approx(4e-4)
    # 4 GPUs x 2: half the total batch -> twice the iterations, half the lr (RayDN #19)
    h = derive_schedule(world_size=4, batch_per_gpu=2, **ref)
    assert (h.iters_per_epoch, h.max_iters, h.warmup_iters) == (3516, 210960, 1000)
    assert h.lr == pytest.approx(2e-4)
    # same total batch, different split -> identical schedule
    a = derive_schedule(world_size=2, batch_per_gpu=4, **ref)
    b = derive_schedule(world_size=1, batch_per_gpu=8, **ref)
    assert (a.max_iters, a.lr, a.warmup_iters) == (b.max_iters, b.lr, b.warmup_iters)


def test_lr_curve_matches_mmcv_formulas():
    I, W = 1000, 100
    assert lr_factor(0, I, W, 1 / 3, 1e-3) == pytest.approx(1 / 3)
    assert lr_factor(W, I, W, 1 / 3, 1e-3) == pytest.approx(1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * 0.1)) / 2)
    mid = lr_factor(50, I, W, 1 / 3, 1e-3)
    cos = 1e-3 + (1 - 1e-3) * (1 + math.cos(math.pi * 0.05)) / 2
    assert mid == pytest.approx(cos * (1 - 0.5 * (2 / 3)))
    assert lr_factor(I, I, W, 1 / 3, 1e-3) == pytest.approx(1e-3)




def test_training_reduces_loss_on_fixed_batches(synth_infos, tmp_path):
    torch.manual_seed(0)
    tr = Trainer(train_options(synth_infos, tmp_path / "fit", max_iters=200))
    it = iter(tr.loader)
    batches = [next(it) for _ in range(2)]

    def loss_now():
        torch.manual_seed(123)  # same denoising draws every time
        state = tr.model.init_state(tr.batch_per_gpu)
        total = 0.0
        with torch.no_grad():
            for b in batches:
                losses, state = tr.model.forward_train(b, state)
                total += float(sum(v for k, v in losses.items() if "loss" in k))
        return total

    before = loss_now()
    for _ in range(12):
        for b in batches:
            tr.train_step(b)
    after = loss_now()
    assert math.isfinite(before) and math.isfinite(after)
    assert after < 0.85 * before, (before, after)


def test_resume_equals_uninterrupted(synth_infos, tmp_path):
    """6 iterations in one go == 3 iterations, stop (checkpoint), resume, 3 more: bit-exact on
    CPU (same RNG streams, sampler position, temporal memory, optimiser state)."""
    full = Trainer(train_options(synth_infos, tmp_path / "full", workers=1)).run()
    first = Trainer(train_options(synth_infos, tmp_path / "split", workers=1, stop_after=3)).run()
    assert first["iteration"] == 3 and (tmp_path / "split" / "latest.pt").exists()
    second = Trainer(train_options(synth_infos, tmp_path / "split", workers=1, resume="auto")).run()
    assert second["iteration"] == 6
    a = [h["loss"] for h in full["history"]]
    b = [h["loss"] for h in second["history"]]
    assert len(a) == len(b) == 6
    assert a == b, f"uninterrupted {a} vs resumed {b}"
    ck_a = torch.load(tmp_path / "full" / "latest.pt", weights_only=True)
    ck_b = torch.load(tmp_path / "split" / "latest.pt", weights_only=True)
    for k, v in ck_a["model"].items():
        assert torch.equal(v, ck_b["model"][k]), k


def test_fitted_iters_arithmetic():
    from raydn.engine.train import _fitted_iters
    assert _fitted_iters(20, 90.0, 0.5, 1000) == 200            # 0.5 s/it, 90 s left -> 180 more
    assert _fitted_iters(20, 1e6, 0.5, 1000) == 1000            # never longer than the schedule
    assert _fitted_iters(20, -20.0, 1.5, 1000) == 20            # over budget already: stop now


def test_budget_probes_schedule_and_speed():
    """The time budget measures after ``probe`` iterations, 7 probes later, then every 8 probes
    (counted from the run's first iteration, up to the schedule's end); each measure is the speed
    since the previous one."""
    from raydn.engine import train as train_mod
    probes = train_mod._BudgetProbes(start=10, max_iters=100, probe=5, t0=1000.0)
    assert sorted(probes.probes) == [15, 50, 90]
    assert probes.cap == 100 and probes.due(15) and not probes.due(16)
    assert probes.measure(15, now=1010.0) == pytest.approx(2.0)   # 10 s for 5 iterations
    assert probes.measure(50, now=1080.0) == pytest.approx(2.0)   # 70 s for 35 more


def test_time_budget_shortens_schedule_and_resume_keeps_it(synth_infos, tmp_path):
    """A (zero) time budget ends the run right after the speed probe, with the lr schedule
    re-derived for that length; resuming does not lengthen it again."""
    out = tmp_path / "budget"
    res = Trainer(train_options(synth_infos, out, max_iters=40, time_budget_s=0.0, budget_probe=2)).run()
    assert res["iteration"] == 2 and res["schedule"]["max_iters"] == 2
    ck = torch.load(out / "latest.pt", weights_only=True)
    assert ck["schedule"]["max_iters"] == 2
    again = Trainer(train_options(synth_infos, out, max_iters=40, resume="auto"))
    assert again.schedule.max_iters == 2 and again.run()["iteration"] == 2


def test_time_budget_refit_gives_iterations_back(synth_infos, tmp_path):
    """The second (steady-speed) fit may lengthen a schedule the first fit shortened, never past the cap."""
    tr = Trainer(train_options(synth_infos, tmp_path / "refit", max_iters=40, time_budget_s=20.0))
    tr.iteration = 10
    tr._fit_time_budget(elapsed=10.0, rate=1.0, cap=40)      # 10 s left at 1 s/it
    assert tr.schedule.max_iters == 20
    tr._fit_time_budget(elapsed=12.0, rate=0.5, cap=40)      # 8 s left at 0.5 s/it
    assert tr.schedule.max_iters == 26
    tr._fit_time_budget(elapsed=12.0, rate=0.01, cap=40)
    assert tr.schedule.max_iters == 40


def test_time_budget_never_goes_below_the_floor(synth_infos, tmp_path, capsys):
    """A slow machine: the budget would allow 5 iterations, the floor keeps 15 and says so."""
    tr = Trainer(train_options(synth_infos, tmp_path / "floor", max_iters=40, time_budget_s=20.0,
                       budget_min_iters=15))
    tr.iteration = 2
    tr._fit_time_budget(elapsed=17.0, rate=1.0, cap=40)      # 3 s left -> 5, floor 15
    assert tr.schedule.max_iters == 15
    assert "keeping 15" in capsys.readouterr().out
    tr._fit_time_budget(elapsed=0.0, rate=0.01, cap=40)      # fast: the cap, not the floor
    assert tr.schedule.max_iters == 40


def test_checkpoint_files_and_logs(synth_infos, tmp_path):
    out = tmp_path / "logs"
    res = Trainer(train_options(synth_infos, out, max_iters=2, ckpt_interval=1, tensorboard=True)).run()
    assert res["iteration"] == 2
    assert (out / "iter_0000001.pt").exists() and (out / "iter_0000002.pt").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["schedule"]["max_iters"] == 2 and cfg["preset"]["name"] == "tiny_raydn"
    lines = [json.loads(l) for l in (out / "log.txt").read_text().splitlines() if l.startswith("{")]
    assert [l["iter"] for l in lines] == [1, 2] and all("loss_cls" in l for l in lines)
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(synth_infos, tmp_path):
    """Two gloo processes x 1 sample == the one-process 1 x 2 schedule; parameters stay equal."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "engine" / "ddp_worker.py"), str(synth_infos[1]["train"]),
           str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "ddp" / "ddp_result.json").read_text())
    assert res["world_size"] == 2 and res["params_in_sync"], res
    single = Trainer(train_options(synth_infos, tmp_path / "one", max_iters=None, epochs=2))
    assert res["schedule"]["total_batch_size"] == single.schedule.total_batch_size == 2
    assert res["schedule"]["max_iters"] == single.schedule.max_iters
    assert res["schedule"]["lr"] == single.schedule.lr
