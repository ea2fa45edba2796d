"""One code path for one process, ``torchrun`` (one or many machines) and SLURM's ``srun``.

``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``srun`` (one task per GPU,
as mmdet3d's ``tools/slurm_train.sh``) sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/
SLURM_STEP_NODELIST, which :func:`slurm_environment` maps onto the same variables. We then join
the process group with NCCL on GPU and gloo on CPU. Without either, everything is a no-op.

Collectives time out after :func:`collective_timeout` (``--dist-timeout`` / ``RAYDN_DIST_TIMEOUT``
seconds, default 10 minutes instead of torch's 30): a stalled or lost peer ends the run with one
:class:`raydn.errors.PeerLostError` (:func:`peer_lost_error`) instead of a silent wait.
"""
from __future__ import annotations

import os
import gc
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist
from raydn.errors import PeerLostError, RaydnError

#: seconds a collective may wait for the other processes (``--dist-timeout`` / RAYDN_DIST_TIMEOUT)
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "RAYDN_DIST_TIMEOUT"
#: MASTER_PORT under SLURM when none is set: this base + SLURM_JOB_ID % 1000 (two jobs sharing a
#: node do not collide; mmcv's fixed 29500 does)
SLURM_PORT_BASE = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ------------------------------------------------------------------ launcher environments
def _first_host(nodelist: str) -> str:
    """First host name of a SLURM node list, as ``scontrol show hostnames LIST | head -n1``:
    ``gpu[003-005,9],cpu1`` -> ``gpu003``, ``rack[1-2]-n[07-08]`` -> ``rack1-n07``. Uses
    ``scontrol`` where installed, the node-list syntax otherwise."""
    exe = shutil.which("scontrol")
    if exe is not None:
        try:
            out = subprocess.run([exe, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    depth, first = 0, nodelist
    for i, ch in enumerate(nodelist):  # the first top-level entry
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            first = nodelist[:i]
            break
    host = re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first.strip())  # each range: its first value
    if not host or any(c in host for c in "[],"):
        raise RaydnError(f"SLURM node list {nodelist!r}: cannot tell its first host; set MASTER_ADDR")
    return host


def slurm_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT of a task started by ``srun``.

    Empty when torchrun's variables are present (RANK and WORLD_SIZE: they win), or when this is
    not a task of an ``srun`` step (no SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_ID: the batch script
    itself holds SLURM_NTASKS of the whole allocation but is one process). MASTER_ADDR and
    MASTER_PORT already set are kept; otherwise the address is the step's first host (``scontrol
    show hostnames``, then the node-list syntax, then SLURM_LAUNCH_NODE_IPADDR) and the port
    ``SLURM_PORT_BASE + SLURM_JOB_ID % 1000``.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if not all(k in env for k in ("SLURM_PROCID", "SLURM_NTASKS")) or \
            not any(k in env for k in ("SLURM_STEP_ID", "SLURM_STEPID")):
        return {}

    def num(key: str) -> int:
        try:
            return int(env[key])
        except ValueError:
            raise RaydnError(f"SLURM variable {key}={env[key]!r}: expected an integer") from None

    rank, world = num("SLURM_PROCID"), num("SLURM_NTASKS")
    if not 0 <= rank < world:
        raise RaydnError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world}")
    out = {"RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_RANK": str(num("SLURM_LOCALID")) if "SLURM_LOCALID" in env else "0"}
    if env.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                      if env.get(k)), None)
        if nodes is not None:
            out["MASTER_ADDR"] = _first_host(nodes)
        elif env.get("SLURM_LAUNCH_NODE_IPADDR"):
            out["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
        else:
            raise RaydnError("SLURM: no SLURM_STEP_NODELIST / SLURM_NODELIST to take the master "
                             "address from; set MASTER_ADDR")
    if env.get("MASTER_PORT"):
        out["MASTER_PORT"] = env["MASTER_PORT"]
    else:
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
        out["MASTER_PORT"] = str(SLURM_PORT_BASE + (int(job) % 1000 if job.isdigit() else 0))
    return out


def collective_timeout(seconds: float | None = None, environ: Mapping[str, str] | None = None
                       ) -> timedelta:
    """How long a collective waits for the other processes: ``seconds`` (``--dist-timeout``), else
    RAYDN_DIST_TIMEOUT, else :data:`DEFAULT_TIMEOUT_S`."""
    env = os.environ if environ is None else environ
    where = "--dist-timeout"
    if seconds is None and env.get(TIMEOUT_ENV):
        where = TIMEOUT_ENV
        try:
            seconds = float(env[TIMEOUT_ENV])
        except ValueError:
            raise RaydnError(f"{TIMEOUT_ENV}={env[TIMEOUT_ENV]!r}: expected seconds") from None
    seconds = DEFAULT_TIMEOUT_S if seconds is None else float(seconds)
    if not seconds > 0 or seconds == float("inf"):
        raise RaydnError(f"{where}: expected a positive number of seconds, got {seconds}")
    return timedelta(seconds=seconds)


def setup_distributed(device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group when launched by torchrun or srun (world size > 1); choose the
    device (``cuda:LOCAL_RANK`` modulo the visible GPUs, where SLURM shows each task only its own).
    ``timeout_s``: see :func:`collective_timeout`."""
    os.environ.update(slurm_environment())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = collective_timeout(timeout_s) if world > 1 else None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()) if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed(clean: bool = True) -> None:
    """Leave the process group. After a normal end (``clean``) all ranks first meet at a barrier so
    that no rank tears its connections down while another still uses them (gloo aborts the process
    otherwise); after an error there is no barrier (a lost peer would only make it fail again)."""
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        # Objects that still hold the process group (a DDP reducer in a reference cycle, pending
        # work) are freed now, while the interpreter is fully alive: freed during interpreter
        # finalisation instead, gloo's threads end in std::terminate (SIGABRT, "terminate called
        # without an active exception") after an otherwise successful run -- and torchrun's other
        # agents then wait 300 s in their exit barrier.
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


# ------------------------------------------------------------------ lost peers
_PEER_FAILURE = re.compile(  # gloo's and NCCL's messages for a dead or stalled peer
    r"connection (closed|reset|refused)|broken pipe|timed out waiting|collective operation timeout|"
    r"gloo|nccl|processgroup", re.IGNORECASE)


def peer_lost_error(exc: BaseException, rank: int, iteration: int | None = None):
    """A :class:`raydn.errors.PeerLostError` for ``exc`` when it is a failed collective of this
    process group (a peer process that died or stalled past the timeout), else None.

    torch raises ``torch.distributed.DistError`` subclasses from collectives, but a failure seen by
    DDP's gradient hooks arrives as a plain RuntimeError with the backend's message; those are
    recognised by their text, and only while a multi-process group exists."""
    if isinstance(exc, PeerLostError):
        return exc
    if not is_dist():
        return None
    if not (isinstance(exc, getattr(dist, "DistError", ())) or
            (isinstance(exc, RuntimeError) and _PEER_FAILURE.search(str(exc)))):
        return None
    cause = " ".join(str(exc).split())
    cause = re.sub(r"\[?/[^\s\]]*\.(cc|cpp|h)(:\d+)?\]?\s*", "", cause)  # C++ source locations
    cause = cause.split(". ")[0].rstrip(".")  # gloo appends advice to read the other logs
    if len(cause) > 160:
        cause = cause[:157] + "..."
    at = f" after iteration {iteration}" if iteration is not None else ""
    return PeerLostError(f"rank {rank} lost contact with a peer process{at} ({cause}): the run can be "
                         f"resumed with --resume auto (from its latest checkpoint)")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity on one process)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s integer on every rank (identity on one process). Uses a CPU tensor with gloo
    and the current CUDA device with NCCL."""
    if not is_dist():
        return int(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(t, src)
    return int(t.item())
