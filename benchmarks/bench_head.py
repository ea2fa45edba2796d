"""Benchmark of the RayDN head (R50 preset: Q=300, P=128, M=512, 6 layers) at inference.

B=1, 6 cameras, 256x704 input -> feature levels 32x88, 16x44, 8x22, 4x11 (256 channels), eval mode,
memory carried from frame to frame. Prints the median time per frame and the peak-memory growth
next to the official figure (1.3 s per frame, from an issue report).

    python benchmarks/bench_head.py [--frames 10] [--threads 2] [--sampler gather|grid_sample]
                                     [--device cpu|cuda] [--compare]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from raydn.config import HeadConfig
from raydn.data.batch import FrameBatch
from raydn.models.head import RayDNHead

OFFICIAL_S = 1.3
LEVELS = [(32, 88), (16, 44), (8, 22), (4, 11)]


def make_inputs(device, seed=0, t=0.0, first=True):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(1, 6, 256, h, w, generator=g).to(device) for h, w in LEVELS]
    K = torch.tensor([[560.0, 0, 352, 0], [0, 560.0, 128, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mats = []
    for k in range(6):
        yaw = torch.tensor(k * torch.pi / 3)
        c, s = torch.cos(yaw), torch.sin(yaw)
        E = torch.eye(4)
        E[:3, :3] = torch.tensor([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]])
        mats.append(E)
    extr = torch.stack(mats)[None]
    intr = K.expand(1, 6, 4, 4).clone()
    ego = torch.eye(4)[None].clone()
    ego[0, :3, 3] = torch.tensor([600.0 + 5 * t, 1600.0, 0.0])
    batch = FrameBatch(images=None, intrinsics=intr, extrinsics=extr, lidar2img=intr @ extr,
                       ego_pose=ego, ego_pose_inv=torch.linalg.inv(ego),
                       timestamp=torch.tensor([1.53e9 + t], dtype=torch.float64),
                       prev_exists=torch.tensor([0.0 if first else 1.0]), pad_shape=(256, 704))
    return feats, batch.to(device)


def run(sampler: str, frames: int, device: str, states_in=None):
    """Run ``frames`` (+2 warm-up) frames. With ``states_in`` every frame starts from the given
    incoming state (to compare implementations without top-K tie flips compounding)."""
    torch.manual_seed(0)
    head = RayDNHead(HeadConfig(), sampler=sampler).eval().to(device)
    inputs = [make_inputs(device, seed=i, t=0.5 * i, first=(i == 0)) for i in range(frames + 2)]
    state, wall, cpu, outs, states = None, [], [], [], []
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for i, (feats, batch) in enumerate(inputs):
            if states_in is not None:
                state = states_in[i]
            states.append(state)
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out, state = head(feats, batch, state)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # 2 warm-up frames
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            outs.append(out["all_cls_scores"][-1])
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return statistics.median(wall), statistics.median(cpu), rss_mb, gpu_mb, outs, states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sampler", default="gather", choices=["gather", "grid_sample"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compare", action="store_true",
                   help="also run the grid_sample reference sampler and compare outputs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    med, cpu, rss, gpu, outs, states = run(args.sampler, args.frames, args.device)
    print(f"RayDN head R50 (Q=300, P=128, M=512), B=1, 6x256x704, {args.device}, "
          f"{args.threads} threads, sampler={args.sampler}")
    print(f"  median wall time per frame: {med:.3f} s over {args.frames} frames "
          f"(official: {OFFICIAL_S:.2f} s -> {OFFICIAL_S / med:.1f}x faster)")
    print(f"  median process CPU time per frame: {cpu:.3f} s (all threads; robust to a shared machine)")
    print(f"  peak RSS growth: {rss:.0f} MiB" + (f", peak GPU memory {gpu:.0f} MiB" if gpu else ""))
    if args.compare:
        other = "grid_sample" if args.sampler == "gather" else "gather"
        med2, cpu2, _, _, outs2, _ = run(other, args.frames, args.device, states_in=states)
        diff = max((a - b).abs().max().item() for a, b in zip(outs, outs2))
        print(f"  {other}: median wall {med2:.3f} s, CPU {cpu2:.3f} s; max |logit difference| "
              f"(same incoming memory) {diff:.2e}")


if __name__ == "__main__":
    main()
