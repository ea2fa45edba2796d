"""Benchmark: fused deformable sampling vs the grid_sample reference, in one process.

Measures, at the real R50 shapes (4 levels 32x88, 16x44, 8x22, 4x11; C=256, G=8, P=13):

* eval   : B=1 -> BN=6 camera images, A=428 queries, forward under ``torch.no_grad``;
* train  : B=2 -> BN=12, A=1028 queries (with denoising groups), forward + backward w.r.t.
  value, locations and weights;

for the reference :func:`raydn.models.deformable.deformable_sample` and
:func:`raydn.models.deformable_fast.deformable_sample_fused`, runs them alternately (best of
``--repeats``, median printed too), prints both times and the ratio, the peak tensor memory of one call
(measured in a fresh process: CPU peak-RSS growth, CUDA ``max_memory_allocated``) and checks that both give the same
result. The machine load (``os.getloadavg``) is printed because the CPU may be shared.

Usage::

    python benchmarks/bench_deformable.py [--threads 2] [--repeats 3] [--device cpu] [--only eval|train]

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (set it explicitly to override): on a shared,
oversubscribed CPU the default spin-then-sleep policy makes EVERY parallel op with 2 threads cost
about one scheduler tick (~7.8 ms measured, whatever its size), which swamps all implementations.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see above)
import statistics
import subprocess
import sys
import time

import torch

from raydn.models.deformable import deformable_sample, deformable_sample_gather
from raydn.models.deformable_fast import deformable_sample_fused

SHAPES = [(32, 88), (16, 44), (8, 22), (4, 11)]
CASES = {"eval": (6, 428), "train": (12, 1028)}


def level_starts(shapes):
    starts, s = [], 0
    for h, w in shapes:
        starts.append(s)
        s += h * w
    return starts, s


#: fraction of the (camera, query, point) triples whose location lies inside the image: a key point
#: is projected into all 6 cameras but lies in one (two where views overlap); measured 19 % in the
#: demo's training steps (``--inside`` changes it)
INSIDE = 0.2


def make_inputs(BN: int, A: int, device: torch.device, grad: bool, seed: int = 0, C: int = 256, G: int = 8,
                P: int = 13, inside: float = INSIDE):
    """Random inputs; a fraction ``inside`` of the points falls inside the image, the others beside
    it (as points seen by another camera or behind this one).

    Returns value (BN, sum_HW, C), locations (BN, A, P, 2) and the weights as a contiguous
    (G, BN, A, L, P) leaf (the head's layout; pass ``as_bagl(w)`` to the samplers)."""
    gen = torch.Generator().manual_seed(seed)
    _, hw = level_starts(SHAPES)
    L = len(SHAPES)
    value = torch.randn(BN, hw, C, generator=gen)
    loc = torch.rand(BN, A, P, 2, generator=gen)
    away = torch.rand(BN, A, P, generator=gen) >= inside
    loc[..., 0] = torch.where(away, loc[..., 0] * 2.0 + 1.2, loc[..., 0])    # x in [1.2, 3.2): outside
    w = torch.softmax(torch.randn(G, BN, A, L * P, generator=gen), -1).view(G, BN, A, L, P)
    out = [t.to(device).requires_grad_(grad) for t in (value, loc, w)]
    return out


def as_bagl(w):
    """(G, BN, A, L, P) -> the (BN, A, G, L, P) view the samplers take."""
    return w.permute(1, 2, 0, 3, 4)


IMPLS = {"reference": deformable_sample, "gather": deformable_sample_gather, "fused": deformable_sample_fused}
LABELS = {"reference": "reference (grid_sample)    ", "gather": "gather (F.embedding_bag)   ",
          "fused": "fused (this op, sparse)    "}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_child(impl: str, name: str, device: torch.device, inside: float = INSIDE) -> int:
    """(In a fresh process) peak memory increase of ONE call: CUDA allocator peak, or on CPU the
    growth of the peak resident set size (VmHWM) over the resident size before the call."""
    BN, A = CASES[name]
    starts, _ = level_starts(SHAPES)
    train = name == "train"
    fn = IMPLS[impl]
    value, loc, w = make_inputs(BN, A, device, grad=train, inside=inside)
    go = torch.randn(BN, A, value.shape[-1]).to(device)

    def call():
        if train:
            fn(value, SHAPES, starts, loc, as_bagl(w)).backward(go)
        else:
            with torch.no_grad():
                fn(value, SHAPES, starts, loc, as_bagl(w))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:  # reset the peak-RSS mark to the current RSS (Linux >= 4.0); fine to skip otherwise
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_kib("VmRSS")
    call()
    return max(0, _status_kib("VmHWM") - before) * 1024


def peak_bytes(impl: str, name: str, device: torch.device, threads: int, inside: float) -> int:
    """Run :func:`peak_child` in a fresh interpreter (so caches of earlier runs do not hide the peak)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", impl, "--only", name,
           "--device", str(device), "--threads", str(threads), "--inside", str(inside)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def run_case(name: str, device: torch.device, repeats: int, threads: int, inside: float = INSIDE) -> dict:
    BN, A = CASES[name]
    starts, _ = level_starts(SHAPES)
    train = name == "train"
    value, loc, w = make_inputs(BN, A, device, grad=train, inside=inside)
    go = torch.randn(BN, A, value.shape[-1], generator=torch.Generator().manual_seed(1)).to(device)
    results = {}

    def call(fn):
        if train:
            for t in (value, loc, w):
                t.grad = None
            out = fn(value, SHAPES, starts, loc, as_bagl(w))
            out.backward(go)
            return out.detach(), [t.grad.clone() for t in (value, loc, w)]
        with torch.no_grad():
            return fn(value, SHAPES, starts, loc, as_bagl(w)), []

    fns = IMPLS
    times = {k: [] for k in fns}
    outs = {}
    for k, fn in fns.items():          # warm-up + outputs for the equality check
        outs[k] = call(fn)
    for _ in range(repeats):          # alternate the two to share the machine load fairly
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            call(fn)
            sync(device)
            times[k].append(time.perf_counter() - t0)
    peaks = {k: peak_bytes(k, name, device, threads, inside) for k in fns}
    diff_out = (outs["fused"][0] - outs["reference"][0]).abs().max().item()
    # relative to the largest reference entry (location gradients are ~1e2)
    diff_grads = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs["fused"][1], outs["reference"][1])]
    for k in fns:
        results[k] = dict(best=min(times[k]), median=statistics.median(times[k]), peak=peaks[k])
    results["diff_out"], results["diff_grads"] = diff_out, diff_grads
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=sorted(CASES), default=None)
    ap.add_argument("--inside", type=float, default=INSIDE,
                    help="fraction of the (camera, query, point) locations inside the image (default %(default)s)")
    ap.add_argument("--peak-child", choices=sorted(IMPLS), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.peak_child:
        print(peak_child(args.peak_child, args.only, device, args.inside))
        return 0
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average before {os.getloadavg()[0]:.2f}")
    cases = [args.only] if args.only else list(CASES)
    for name in cases:
        BN, A = CASES[name]
        what = "forward (no grad)" if name == "eval" else "forward + backward (value, locations, weights)"
        r = run_case(name, device, args.repeats, args.threads, args.inside)
        fus = r["fused"]
        print(f"\n[{name}] BN={BN} A={A} P=13 G=8 L=4 C=256, {args.inside:.0%} of the points inside the image -- {what}")
        for k in IMPLS:
            m = r[k]
            ratio = "" if k == "fused" else (
                f"   fused speed-up {m['best'] / fus['best']:5.2f}x (median {m['median'] / fus['median']:5.2f}x),"
                f" memory {m['peak'] / max(fus['peak'], 1):4.2f}x")
            print(f"  {LABELS[k]}: best {m['best'] * 1e3:8.1f} ms  median {m['median'] * 1e3:8.1f} ms"
                  f"  peak {m['peak'] / 2 ** 20:7.1f} MiB{ratio}")
        grads = ", ".join(f"{g:.1e}" for g in r["diff_grads"])
        print(f"  fused vs reference: max abs diff out {r['diff_out']:.1e}"
              + (f"; grads (value, loc, w) max rel diff {grads}" if grads else ""))
    print(f"\nload average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
