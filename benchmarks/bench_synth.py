"""Time `raydn synth` on the default 10-scene mini world (8 mini_train + 2 mini_val, 40 keyframes).

Usage: python benchmarks/bench_synth.py [--out DIR] [--workers 2] [--scenes 10] [--samples 40]
Target: under 2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from raydn.data.synth import generate_world


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--scale", type=float, default=0.4)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp()) / "synth"
    t0 = time.perf_counter()
    generate_world(out, scenes=a.scenes, seed=0, samples_per_scene=a.samples, workers=a.workers,
                   scale=a.scale, overwrite=True)
    dt = time.perf_counter() - t0
    n = a.scenes * a.samples
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"{a.scenes} scenes x {a.samples} samples = {n} samples ({6 * n} images) with {a.workers} workers: "
          f"{dt:.1f} s ({n / dt:.2f} samples/s), {size:.0f} MiB")
    if not a.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
