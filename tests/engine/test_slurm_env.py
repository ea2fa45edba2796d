"""SLURM's ``srun`` variables mapped onto torch's (raydn.engine.distributed.slurm_environment),
with fake environments (no SLURM here)."""
from __future__ import annotations

import os
import stat

import pytest

from raydn.engine.distributed import SLURM_PORT_BASE, _first_host, setup_distributed, slurm_environment
from raydn.errors import RaydnError


def _srun_task(procid: int, ntasks: int, localid: int, **extra) -> dict:
    """What srun sets for one task of a step (the variables raydn reads)."""
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "48213", "SLURM_STEP_NODELIST": "gpu[007-008]",
           "SLURM_NODELIST": "gpu[007-008]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    env.update(extra)
    return env


@pytest.fixture
def no_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def test_srun_task_maps_to_torch_variables(no_scontrol):
    # 2 nodes x 4 GPUs: task 5 is the second GPU of the second node
    env = slurm_environment(_srun_task(5, 8, 1))
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                   "MASTER_PORT": str(SLURM_PORT_BASE + 213)}


def test_set_master_address_and_port_win(no_scontrol):
    env = slurm_environment(_srun_task(0, 2, 0, MASTER_ADDR="10.1.2.3", MASTER_PORT="12345"))
    assert env["MASTER_ADDR"] == "10.1.2.3" and env["MASTER_PORT"] == "12345"


def test_torchrun_variables_win_and_batch_script_is_one_process(no_scontrol):
    assert slurm_environment(_srun_task(3, 8, 3, RANK="0", WORLD_SIZE="2")) == {}
    batch_script = _srun_task(0, 8, 0)  # sbatch's script: the allocation's SLURM_NTASKS, no step
    del batch_script["SLURM_STEP_ID"]
    assert slurm_environment(batch_script) == {}
    assert slurm_environment({}) == {}
    assert slurm_environment({"SLURM_STEPID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                              "SLURM_NODELIST": "a1"})["RANK"] == "1"  # older SLURM_STEPID spelling


def test_master_address_fallbacks(no_scontrol):
    env = _srun_task(1, 2, 1)
    for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST"):
        del env[k]
    assert slurm_environment(env)["MASTER_ADDR"] == "10.0.0.7"  # the launch node
    del env["SLURM_LAUNCH_NODE_IPADDR"]
    with pytest.raises(RaydnError, match="MASTER_ADDR"):
        slurm_environment(env)


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"), ("gpu[003-005,9],cpu1", "gpu003"), ("a-[12,3]", "a-12"),
    ("cpu1,gpu[003-005]", "cpu1"), ("rack[1-2]-n[07-08]", "rack1-n07"), ("n[0009]", "n0009")])
def test_first_host_of_a_node_list(no_scontrol, nodelist, first):
    assert _first_host(nodelist) == first


def test_first_host_asks_scontrol_where_installed(monkeypatch, tmp_path):
    """``scontrol show hostnames LIST`` is the authority (as mmcv's init_dist('slurm'))."""
    exe = tmp_path / "bin" / "scontrol"
    exe.parent.mkdir()
    exe.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "from-scontrol-$3" && echo other\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(exe.parent) + os.pathsep + os.environ.get("PATH", ""))
    assert _first_host("gpu[1-2]") == "from-scontrol-gpu[1-2]"


@pytest.mark.parametrize("bad,match", [
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x'"), ({"SLURM_PROCID": "8"}, "outside SLURM_NTASKS"),
    ({"SLURM_LOCALID": ""}, "SLURM_LOCALID")])
def test_bad_slurm_values_are_named(no_scontrol, bad, match):
    with pytest.raises(RaydnError, match=match):
        slurm_environment(_srun_task(0, 8, 0, **bad))


def test_one_task_step_needs_no_process_group(monkeypatch, no_scontrol):
    """``srun -n1 raydn train`` (or an interactive step): world size 1, no process group."""
    import torch.distributed as dist
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that what setup_distributed exports is undone
        monkeypatch.delenv(k)
    for k, v in _srun_task(0, 1, 0).items():
        monkeypatch.setenv(k, v)
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed) == (0, 1, False)
    assert not dist.is_initialized()
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"  # exported for torch


def test_slurm_train_script_starts_one_task_per_gpu(tmp_path):
    """tools/slurm_train.sh, run with a fake ``srun`` that records its arguments."""
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "tools" / "slurm_train.sh"
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path / "args.txt"}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}", GPUS="16",
               GPUS_PER_NODE="8", SRUN_ARGS="--time=1:00:00 --exclusive")
    subprocess.run(["bash", str(script), "part", "job", "r50_raydn", "work dirs/r50",
                    "--data", "infos/train.pkl", "--lr", "4e-4"], env=env, check=True, timeout=30)
    args = (tmp_path / "args.txt").read_text().splitlines()
    for expected in ("--ntasks=16", "--ntasks-per-node=8", "--gres=gpu:8", "--kill-on-bad-exit=1",
                     "--time=1:00:00", "--exclusive"):
        assert expected in args, args
    cmd = args[args.index("-m"):]
    assert cmd[:3] == ["-m", "raydn.cli", "train"]
    assert cmd[cmd.index("--preset") + 1] == "r50_raydn" and cmd[cmd.index("--out") + 1] == "work dirs/r50"
    assert cmd[cmd.index("--resume") + 1] == "auto" and cmd[-4:] == ["--data", "infos/train.pkl", "--lr", "4e-4"]
    usage = subprocess.run(["bash", str(script), "part"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "PARTITION JOB_NAME PRESET WORK_DIR" in usage.stderr
