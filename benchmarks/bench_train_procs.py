"""Training throughput on a small CPU: one process with all cores vs K processes x 1 thread (DDP).

Both runs train the same preset with the same recipe (total batch, lr, schedule) for ``--iters``
iterations through ``raydn train`` (the multi-process one under ``torch.distributed.run``, what
``raydn demo`` does in-process with :mod:`raydn.engine.launch`); seconds per iteration are read
from each run's ``log.txt`` between iteration ``--skip`` and the end (start-up and the stem-cache
fill excluded). Run it on a quiet machine:

    python benchmarks/bench_train_procs.py --infos W/infos/nuscenes2d_temporal_infos_train.pkl
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def seconds_per_iter(log: Path, skip: int) -> float:
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    t = {r["iter"]: r["time"] for r in rows}
    last = max(t)
    return (t[last] - t[skip]) / (last - skip)


def run(cmd: list[str], threads: int, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds_per_iter(out / "log.txt", ARGS.skip)


def main() -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--infos", required=True, help="train info pickle")
    p.add_argument("--preset", default="demo_raydn")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--skip", type=int, default=20, help="iterations excluded from the timing")
    p.add_argument("--procs", type=int, default=2)
    ARGS = p.parse_args()
    if ARGS.iters % 10 or ARGS.skip % 10:
        raise SystemExit("--iters and --skip must be multiples of 10 (the log interval)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    raydn = [sys.executable, "-m", "raydn.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        common = ["train", "--preset", ARGS.preset, "--data", ARGS.infos, "--max-iters", str(ARGS.iters),
                  "--log-interval", "10", "--no-progress", "--workers", "1", "--device", "cpu",
                  "--ckpt-interval", "1000000"]
        one = Path(tmp, "one")
        s1 = run(raydn + common + ["--out", str(one)], cores, one)
        multi = Path(tmp, "multi")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={ARGS.procs}", "-m", "raydn.cli"]
        sk = run(launcher + common + ["--out", str(multi)], max(1, cores // ARGS.procs), multi)
    print(f"{ARGS.preset}, {cores} cores, iterations {ARGS.skip}..{ARGS.iters}:")
    print(f"  1 process x {cores} threads : {s1:.3f} s/it")
    print(f"  {ARGS.procs} processes x {max(1, cores // ARGS.procs)} thread(s): {sk:.3f} s/it")
    print(f"  speed-up: {s1 / sk:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
