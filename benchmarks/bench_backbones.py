"""Forward-time benchmark of the image encoders (eval, fp32, no grad), median over repeats.

    python benchmarks/bench_backbones.py                 # R50 + FPN on 6x3x256x704, contiguous and channels_last
    python benchmarks/bench_backbones.py --tiny          # also the tiny backbone on 6x3x128x352
    python benchmarks/bench_backbones.py --eva --device cuda   # also EVA02-L on 6x3x320x800

Reference (official code on this machine, from the brief): ResNet-50 1.71 s, FPN 0.18 s for 6x3x256x704.
Weights are random: speed does not depend on them. Prints one JSON line per measurement and writes
them to ``--out`` (atomically) when given.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from raydn.config import BackboneConfig, NeckConfig
from raydn.models.backbones import build_backbone
from raydn.models.neck import build_neck

OFFICIAL_CPU = {"resnet50": 1.71, "fpn": 0.18}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, repeats: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_r50_fpn(args, formats) -> list:
    """R50 backbone and FPN timed separately, once per memory format. The formats are timed
    *interleaved* (one run of each per round) so that a shared machine's load hits them alike."""
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet50")).eval().to(args.device)
    neck = build_neck(NeckConfig()).eval().to(args.device)
    x = torch.randn(6, 3, 256, 704, device=args.device)
    runs = {}
    with torch.no_grad():
        for fmt in formats:
            bb, nk = copy.deepcopy(backbone), copy.deepcopy(neck)
            xi = x
            if fmt is torch.channels_last:
                bb.to(memory_format=fmt)
                nk.to(memory_format=fmt)
                xi = x.contiguous(memory_format=fmt)
            feats = bb(xi)
            runs[fmt] = (bb, nk, xi, feats, [], [])
        for _ in range(args.warmup):
            for bb, nk, xi, feats, _, _ in runs.values():
                nk(bb(xi))
        for _ in range(args.repeats):
            for bb, nk, xi, feats, tb, tn in runs.values():
                tb.append(_timed(lambda: bb(xi), args.device))
                tn.append(_timed(lambda: nk(feats), args.device))
    out = []
    for fmt, (_, _, _, _, tb, tn) in runs.items():
        b, n = statistics.median(tb), statistics.median(tn)
        out.append({"model": "resnet50+fpn", "input": [6, 3, 256, 704], "device": args.device,
                    "memory_format": "channels_last" if fmt is torch.channels_last else "contiguous",
                    "backbone_s": round(b, 4), "fpn_s": round(n, 4), "total_s": round(b + n, 4),
                    "backbone_runs_s": [round(t, 3) for t in tb], "official_cpu_s": OFFICIAL_CPU})
    return out


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_tiny(args) -> dict:
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(name="tiny", frozen_bn=False, out_channels=64)).eval().to(args.device)
    x = torch.randn(6, 3, 128, 352, device=args.device)
    with torch.no_grad():
        t = median_time(lambda: model(x), args.repeats, args.warmup, args.device)
    return {"model": "tiny", "input": [6, 3, 128, 352], "device": args.device, "total_s": round(t, 4)}


def bench_eva(args) -> dict:
    torch.manual_seed(0)
    cfg = BackboneConfig(name="eva02", fp16_attention=True, drop_path_rate=0.0)
    model = build_backbone(cfg).eval().to(args.device)
    x = torch.randn(6, 3, 320, 800, device=args.device)
    with torch.no_grad():
        t = median_time(lambda: model(x), args.repeats, args.warmup, args.device)
    return {"model": "eva02-L+simfp (fp16 attention)", "input": [6, 3, 320, 800], "device": args.device,
            "total_s": round(t, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--eva", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as a JSON list here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = []
    formats = [torch.contiguous_format] + ([] if args.no_channels_last else [torch.channels_last])
    results += bench_r50_fpn(args, formats)
    if args.tiny:
        results.append(bench_tiny(args))
    if args.eva:
        results.append(bench_eva(args))
    for r in results:
        r.update(threads=torch.get_num_threads(), loadavg_1min_before=load, torch=torch.__version__)
        print(json.dumps(r))
    if args.out:
        from raydn.io import atomic_write_json
        atomic_write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
