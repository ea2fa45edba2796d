"""Training across machines: two torchrun "nodes" on loopback (gloo, one process each), DDP's
unused-parameter search, collective timeouts and a lost or stalled peer (issue 17)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from raydn.engine.checkpoint import safe_torch_load
from raydn.errors import RaydnError

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "engine" / "multinode_worker.py"
LOST = "lost contact with a peer process"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1", **extra)
    return env


def _torchrun_node(node_rank: int, port: int, args: list[str], out: Path, **popen) -> subprocess.Popen:
    """One torchrun "node" of two on loopback (static rendezvous at 127.0.0.1:port)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
           "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
    return subprocess.Popen(cmd, env=_env(), stdout=open(out, "w"), stderr=subprocess.STDOUT, **popen)


def _wait_all_or_first_failure(procs, limit: float) -> list:
    """Exit codes of ``procs`` once all have ended, or as soon as one has failed (the others are
    then still running: None) -- a failed node would otherwise keep the other torchrun agent in
    its 300-s exit barrier."""
    t = time.time()
    while time.time() - t < limit:
        rcs = [p.poll() for p in procs]
        if all(rc is not None for rc in rcs) or any(rc not in (None, 0) for rc in rcs):
            return rcs
        time.sleep(0.2)
    return [p.poll() for p in procs]


def _cli_args(infos, out: Path, *extra) -> list[str]:
    return ["-m", "raydn.cli", "train", "--preset", "tiny_raydn", "--data", str(infos[1]["train"]),
            "--out", str(out), "--max-iters", "200", "--workers", "0", "--no-progress", "--device", "cpu",
            "--log-interval", "1", "--ckpt-interval", "1", *extra]


def _wait_for_iteration(log: Path, it: int, procs, limit: float = 120.0) -> None:
    t = time.time()
    while time.time() - t < limit:
        if log.exists() and f'{{"iter": {it},' in log.read_text():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    raise AssertionError(f"no iteration {it} in {log}: " + " | ".join(
        f"rc={p.poll()}" for p in procs))


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _signal_all(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _no_raydn_traceback(text: str) -> None:
    """No Python traceback went through raydn's code (torchrun's own failure summary may follow)."""
    assert not re.search(r'File ".*[/\\]raydn[/\\][^"]*\.py"', text), text[-4000:]


# ---------------------------------------------------------------- unit level
def test_collective_timeout_option_env_default():
    from raydn.engine.distributed import DEFAULT_TIMEOUT_S, collective_timeout
    assert collective_timeout(None, {}) == timedelta(seconds=DEFAULT_TIMEOUT_S) == timedelta(minutes=10)
    assert collective_timeout(None, {"RAYDN_DIST_TIMEOUT": "42"}) == timedelta(seconds=42)
    assert collective_timeout(7.5, {"RAYDN_DIST_TIMEOUT": "42"}) == timedelta(seconds=7.5)
    with pytest.raises(RaydnError, match="RAYDN_DIST_TIMEOUT"):
        collective_timeout(None, {"RAYDN_DIST_TIMEOUT": "ten"})
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(RaydnError, match="--dist-timeout"):
            collective_timeout(bad, {})


def test_peer_lost_error_only_for_a_process_group():
    """Without a multi-process group no error is taken for a lost peer."""
    from raydn.engine.distributed import peer_lost_error
    assert peer_lost_error(RuntimeError("Connection closed by peer"), 0, 3) is None


@pytest.mark.parametrize("preset", ["tiny_raydn", "tiny_repdetr3d"])
def test_every_trainable_parameter_takes_part(preset, synth_infos):
    """DDP runs without the per-step unused-parameter search because every trainable parameter
    gets a gradient from every training frame: with boxes or none, first frame or later, with
    Group-DETR query groups. Only the auxiliary 2D head depends on the data (2D labels)."""
    from dataclasses import replace

    from raydn.data.dataset import NuScenesStreamingDataset
    from raydn.data.synthetic_batch import synthetic_frame_batch
    from raydn.engine.train import _may_leave_parameters_unused
    from raydn.presets import build_model, get_preset
    p = get_preset(preset)
    torch.manual_seed(0)
    for groups in (1, 3):
        model = build_model(p, head=replace(p.model.head, query_groups=groups)).train()
        for boxes, frame in ((4, 0), (0, 0), (3, 1), (0, 1)):
            batch = synthetic_frame_batch(1, p.train.aug.final_dim, num_boxes=boxes, frame_index=frame)
            model.zero_grad(set_to_none=True)
            losses, _ = model.forward_train(batch, model.init_state(1))
            sum(v for k, v in losses.items() if "loss" in k).backward()
            unused = [n for n, q in model.named_parameters() if q.requires_grad and q.grad is None]
            assert unused == [], (groups, boxes, frame, unused[:5])
        # without 2D labels the auxiliary head has no loss: its parameters get no gradient
        batch = synthetic_frame_batch(1, p.train.aug.final_dim, num_boxes=3, frame_index=1)
        batch.gt_boxes_2d = None
        model.zero_grad(set_to_none=True)
        losses, _ = model.forward_train(batch, model.init_state(1))
        sum(v for k, v in losses.items() if "loss" in k).backward()
        unused = {n for n, q in model.named_parameters() if q.requires_grad and q.grad is None}
        assert unused and all(n.startswith("img_roi_head.") for n in unused)
    with_2d = NuScenesStreamingDataset(str(synth_infos[1]["train"]), p.train.aug)
    assert _may_leave_parameters_unused(model, with_2d) is False
    without = NuScenesStreamingDataset(str(synth_infos[1]["train"]), p.train.aug, with_2d=False)
    assert _may_leave_parameters_unused(model, without) is True


# ---------------------------------------------------------------- two nodes on loopback
@pytest.mark.slow
def test_two_nodes_on_loopback(synth_infos, tmp_path):
    """``torchrun --nnodes 2 --node_rank 0/1 --nproc_per_node 1`` on 127.0.0.1: disjoint data
    shards, parameters in sync, only rank 0 writes the run files (rank 1 only its per-rank resume
    state), no find_unused_parameters warning, and the same weights as with the unused-parameter
    search of before."""
    port, iters = _free_port(), 3
    result = tmp_path / "result.json"
    args = [str(WORKER), str(synth_infos[1]["train"]), str(tmp_path / "out"), str(result), str(iters)]
    nodes = [_torchrun_node(r, port, args, tmp_path / f"node{r}.txt") for r in (0, 1)]
    try:
        rcs = _wait_all_or_first_failure(nodes, limit=300)
    finally:
        for n in nodes:
            n.kill()
    logs = [(tmp_path / f"node{r}.txt").read_text() for r in (0, 1)]
    assert rcs == [0, 0], "\n".join(l[-3000:] for l in logs)
    res = json.loads(result.read_text())
    assert res["world_size"] == 2 and res["params_in_sync"]
    shard0, shard1 = res["seen"]
    assert len(shard0) == len(shard1) == iters and not set(shard0) & set(shard1), res["seen"]
    assert res["searched_unused"] is False
    assert res["max_abs_diff_vs_reference"] <= 1e-6 * max(1.0, res["max_abs_param"]), res
    for log in logs:  # the warning of every DDP run before; the reference run after the marker has it
        ours, reference = log.split("=== reference run")
        assert "find_unused_parameters" not in ours, ours[-3000:]
    assert "find_unused_parameters" in reference  # (so the check above can see the warning)
    assert sum(l.count("schedule:") for l in logs) == 2  # rank 0 alone prints (once per run)
    run = tmp_path / "out" / "run"
    names = {p.name for p in run.iterdir()}
    rank1 = {n for n in names if ".rank1." in n}
    assert rank1 == {f"iter_{iters:07d}.rank1.pt", "latest.rank1.pt"}, names
    # the run files (written once, by rank 0; other raydn features may add more beside them)
    assert {"config.json", "log.txt", f"iter_{iters:07d}.pt", "latest.pt"} <= names - rank1, names
    state = safe_torch_load(run / "latest.rank1.pt", map_location="cpu")
    assert "model" not in state and state["iteration"] == iters  # rank 1: its resume state only
    lines = (run / "log.txt").read_text().splitlines()
    assert [json.loads(l)["iter"] for l in lines if l.startswith("{")] == list(range(1, iters + 1))
    assert sum(l.startswith("schedule:") for l in lines) == 1


@pytest.mark.slow
def test_lost_node_ends_the_survivor_with_one_message(synth_infos, tmp_path):
    """kill -9 of a whole node (its torchrun agent and worker) mid-run: the other node's worker
    ends within seconds with ``raydn train: error: rank 0 lost contact with a peer process ...
    --resume auto``, no traceback of its own, a non-zero exit; the latest checkpoint is intact."""
    port, out = _free_port(), tmp_path / "run"
    args = _cli_args(synth_infos, out, "--dist-timeout", "60")
    survivor = _torchrun_node(0, port, args, tmp_path / "node0.txt")
    victim = _torchrun_node(1, port, args, tmp_path / "node1.txt")
    try:
        _wait_for_iteration(out / "log.txt", 2, [survivor, victim])
        _signal_all(_descendants(victim.pid), signal.SIGKILL)
        t = time.time()
        rc = survivor.wait(timeout=60)
        took = time.time() - t
    finally:
        for p in (survivor, victim):
            _signal_all(_descendants(p.pid), signal.SIGKILL)
            p.wait()
    text = (tmp_path / "node0.txt").read_text()
    assert rc != 0 and took < 30, (rc, took, text[-3000:])
    errors = [l for l in text.splitlines() if l.startswith("raydn train: error:")]
    assert len(errors) == 1 and f"rank 0 {LOST}" in errors[0] and "--resume auto" in errors[0], text[-3000:]
    _no_raydn_traceback(text)
    ckpt = safe_torch_load(out / "latest.pt", map_location="cpu")
    assert ckpt["iteration"] >= 2 and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_stalled_peer_times_out_under_srun_variables(synth_infos, tmp_path):
    """Two tasks started as ``srun`` starts them (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/
    SLURM_STEP_NODELIST, no torchrun): they train together; a task that stops answering (SIGSTOP)
    ends the other after ``--dist-timeout`` seconds with the one clean message, not torch's 30
    minutes of silence."""
    out, port = tmp_path / "run", _free_port()
    procs = []
    for rank in (0, 1):
        env = _env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_STEP_ID="0",
                   SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *_cli_args(synth_infos, out, "--dist-timeout", "5")],
                                      env=env, stdout=open(tmp_path / f"task{rank}.txt", "w"),
                                      stderr=subprocess.STDOUT))
    survivor, stalled = procs
    try:
        _wait_for_iteration(out / "log.txt", 2, procs)
        os.kill(stalled.pid, signal.SIGSTOP)
        t = time.time()
        rc = survivor.wait(timeout=90)
        took = time.time() - t
    finally:
        for p in procs:
            p.kill()
            p.wait()
    text = (tmp_path / "task0.txt").read_text()
    assert rc == 2 and 4 < took < 40, (rc, took, text[-3000:])
    assert "2 process(es)" in text  # one run of two processes, not two runs of one
    lines = [l for l in text.splitlines() if l.strip()]
    assert lines[-1].startswith(f"raydn train: error: rank 0 {LOST}") and "--resume auto" in lines[-1], text[-3000:]
    _no_raydn_traceback(text)
    assert safe_torch_load(out / "latest.pt", map_location="cpu")["iteration"] >= 2
