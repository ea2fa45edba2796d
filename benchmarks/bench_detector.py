"""Benchmark of the full R50 RayDN detector at inference (backbone / neck / head split).

R50 preset (ResNet-50 + FPN + RayDN head, Q=300, P=128, M=512), eval mode, B=1, 6 cameras at
256x704 (the 6 nuScenes cameras, official test-time resize/crop), memory carried from frame to
frame, random weights (timing does not depend on them). Prints the median time per frame of
each part next to the official figures measured on this machine's CPU with the official code
(detector 3.14 s = ResNet-50 1.71 + FPN 0.18 + head 1.22; head alone about 1.3 s), the ratios,
and the head's peak memory (tensor bytes allocated inside the head, tracked exactly with a
dispatch mode; plus the process RSS growth).

    python benchmarks/bench_detector.py [--frames 5] [--threads 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speed import _infer_frames  # noqa: E402  (shared timing loop)
from torch.utils._python_dispatch import TorchDispatchMode

from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.presets import build_model

OFFICIAL = {"backbone": 1.71, "neck": 0.18, "head": 1.22, "detector": 3.14}
OFFICIAL_HEAD_ALONE = 1.3


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the ``with`` block (CPU or GPU).

    Every op output storage is counted once while alive (a weakref finalizer subtracts it when
    freed); inputs created before the block are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        n = st.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)

        def release(key=key, n=n):
            self.live -= n
            self._seen.discard(key)

        weakref.finalize(st, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t)
        return out


def time_frames(model, frames: int, device: torch.device) -> dict[str, list]:
    """Per-part wall times over ``frames`` timed frames after 2 warm-up frames (memory warm);
    the timing loop is shared with ``bench_speed.py``."""
    times, _, _ = _infer_frames(model, device, "fp32", frames)
    times["detector"] = times.pop("total")
    return times


def head_peak_memory(model, device: torch.device) -> tuple[float, float | None]:
    """(peak MiB of tensors allocated inside one head forward, CUDA max_memory_allocated growth
    MiB or None) on a frame with a full memory."""
    state = model.init_state(1, device)
    with torch.inference_mode():
        for i in range(2):
            batch = synthetic_frame_batch(1, (256, 704), frame_index=i, with_targets=False).to(device)
            feats = model.extract_feats(batch.images)
            if i == 0:
                _, state = model.pts_bbox_head(feats, batch, state)
        cuda_mb = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model.pts_bbox_head(feats, batch, state)
            torch.cuda.synchronize()
            cuda_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        tracker = PeakTensorMemory()
        with tracker:
            out = model.pts_bbox_head(feats, batch, state)
        del out
    return tracker.peak / 2**20, cuda_mb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    torch.manual_seed(0)
    model = build_model("r50_raydn").eval().to(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0 = time.process_time()
    times = time_frames(model, args.frames, device)
    cpu_per_frame = (time.process_time() - c0) / (args.frames + 2)
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    peak_mb, cuda_mb = head_peak_memory(model, device)

    print(f"R50 RayDN detector, eval, B=1, 6x3x256x704, {device}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"load average before the run: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
          f"(1 / 5 / 15 min) on {os.cpu_count()} CPUs")
    print(f"{'part':<10s} {'ours (median s)':>16s} {'min s':>8s} {'official s':>11s} {'speed-up':>9s}")
    for part in ("backbone", "neck", "head", "detector"):
        med, mn = statistics.median(times[part]), min(times[part])
        print(f"{part:<10s} {med:16.3f} {mn:8.3f} {OFFICIAL[part]:11.2f} {OFFICIAL[part] / med:8.2f}x")
    head = statistics.median(times["head"])
    print(f"head vs the official head alone ({OFFICIAL_HEAD_ALONE:.1f} s): "
          f"{OFFICIAL_HEAD_ALONE / head:.2f}x faster (target >= 2x)")
    print(f"process CPU time per frame (all threads): {cpu_per_frame:.3f} s; "
          f"frames timed: {args.frames} after {2} warm-up")
    print(f"head peak memory (tensors allocated inside one head forward): {peak_mb:.0f} MiB"
          + (f"; CUDA max_memory_allocated growth {cuda_mb:.0f} MiB" if cuda_mb is not None else ""))
    print(f"process peak RSS growth during the timed frames: {rss_mb:.0f} MiB")


if __name__ == "__main__":
    main()
