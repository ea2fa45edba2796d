"""Overfit check (issue 9): train the demo model on a few frames of one scene, score the same frames.

A correct detector must reach mAP >= 0.9 and mATE <= 0.15 m on the frames it was trained on.

    python benchmarks/bench_overfit.py --world raydn_demo/world --infos raydn_demo/infos/nuscenes2d_temporal_infos_train.pkl
    python benchmarks/bench_overfit.py ... --frames 6 --iters 1500 --preset demo_repdetr3d

Prints the figures and writes them as JSON (``--json``)."""
from __future__ import annotations

import argparse
import json
import time

from raydn.engine.overfit import overfit_check
from raydn.io import atomic_write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--infos", required=True, help="train info pickle of a (synthetic) world")
    p.add_argument("--world", default=None, help="dataroot for relative image paths")
    p.add_argument("--preset", default="demo_raydn")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--scene", type=int, default=0)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--flush-denormal", action="store_true")
    a = p.parse_args()
    if a.flush_denormal:
        import torch
        torch.set_flush_denormal(True)
    t = time.time()
    r = overfit_check(a.infos, preset=a.preset, frames=a.frames, scene=a.scene, iters=a.iters, lr=a.lr,
                      seed=a.seed, data_root=a.world, progress=True)
    out = dict(r.as_dict(), preset=a.preset, seconds=round(time.time() - t, 1))
    print(json.dumps(out, indent=2))
    ok = r.mAP >= 0.9 and r.mATE <= 0.15
    print(f"overfit check: mAP {r.mAP:.3f} (>= 0.9), mATE {r.mATE:.3f} m (<= 0.15): "
          + ("PASS" if ok else "FAIL"))
    if a.json:
        atomic_write_json(a.json, out, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
