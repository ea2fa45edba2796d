"""Benchmark of the denoising-query builder (``build_denoising_queries``, spec §6) at the R50
preset's sizes: B=2 samples x 60 GT boxes, Q=300 learnable queries, P=128 propagated, M=512 memory,
6 cameras at 256x704.

Prints the median time per call of RayDN's builder (10 box-noise groups + 1 ray group x 5 rays:
D = 60 x 15 = 900 DN queries) and of the StreamPETR/RepDETR3D baseline (box noise only,
``ray.enabled=False``: D = 600) run in the same process, and their ratio. The unit tests check
what the builder returns (``tests/models/test_denoising.py``); this script holds the timing that
used to be asserted there (< 200 ms on a loaded 2-core CPU).

    python benchmarks/bench_denoising.py [--boxes 60] [--repeats 20] [--threads 1] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from raydn.config import DenoisingConfig
from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.models.denoising import build_denoising_queries

PAD = (256, 704)
QUERIES, PROPAGATED, MEMORY = 300, 128, 512


def time_builder(cfg: DenoisingConfig, boxes: int, repeats: int, device: str) -> tuple[float, int]:
    """Median seconds per ``build_denoising_queries`` call (after one warm-up) and the pad size D."""
    batch = synthetic_frame_batch(2, PAD, num_boxes=boxes, with_images=False, seed=0)
    gt_boxes = [b.to(device) for b in batch.gt_boxes]
    gt_labels = [x.to(device) for x in batch.gt_labels]
    ref = torch.rand(QUERIES, 3, generator=torch.Generator().manual_seed(0)).to(device)
    l2i = batch.lidar2img.to(device)
    gen = torch.Generator().manual_seed(1)

    def call():
        out = build_denoising_queries(gt_boxes, gt_labels, ref, l2i, PAD, cfg, num_propagated=PROPAGATED,
                                      memory_len=MEMORY, generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out.pad_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=60, help="GT boxes per sample (2 samples)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    raydn = DenoisingConfig()
    baseline = replace(raydn, ray=replace(raydn.ray, enabled=False))
    base_s, base_d = time_builder(baseline, args.boxes, args.repeats, args.device)
    ray_s, ray_d = time_builder(raydn, args.boxes, args.repeats, args.device)
    print(f"build_denoising_queries, 2 x {args.boxes} boxes, Q={QUERIES} P={PROPAGATED} M={MEMORY}, "
          f"{args.device}, {args.threads} thread(s), median of {args.repeats}:")
    print(f"  box noise only (baseline) D={base_d:4d}: {base_s * 1e3:8.2f} ms")
    print(f"  RayDN (box + ray noise)   D={ray_d:4d}: {ray_s * 1e3:8.2f} ms  "
          f"({ray_s / base_s:.2f}x the baseline)")


if __name__ == "__main__":
    main()
