"""Speed benchmark of the R50 RayDN preset: ours vs an in-run baseline vs the official figures.

One run measures, at the issue's shapes (6 cameras x 256x704, R50 preset: Q=300, P=128, M=512,
6 layers, 4 levels 32x88 .. 4x11):

* ``head_train``  head training step, B=2 with 40 and 38 boxes, denoising on, dropout on (train
  mode), forward + criterion (split "forward") and backward; feature maps require grad (as inside
  the detector);
* ``det_train``   detector training step, B=1, 40 boxes: GridMask, ResNet-50 with checkpointing
  (with_cp), FPN, YOLOX aux head with 2D targets, RayDN head, both losses; forward / backward;
* ``det_infer``   detector inference, one frame with a warm memory (the 2nd and later frames),
  eval, split backbone / neck / head;
* ``flops``       achieved FLOP/s of the full R50 inference (FLOPs counted with
  ``torch.utils.flop_counter.FlopCounterMode``; time = ``det_infer`` median of the same child)
  next to a 4096 x 4096 x 4096 fp32 matmul's FLOP/s measured in the same process.

Variants (same weights, same inputs, same outputs up to float rounding):

* ``baseline``: the same model built with ``RuntimeOptions.baseline()``
  (:mod:`raydn.models.options`): the plain ``grid_sample`` reference sampler and every other
  optimisation switched off (unfolded BN, contiguous NCHW convolutions, SDPA attention);
* ``ours``: the library defaults (fused sampling op, channels-last encoder, ...).

Every (case, variant) runs in a FRESH child process (so that its peak memory is its own: CPU peak
RSS ``ru_maxrss`` of the child, CUDA ``max_memory_allocated``), the two variants of a case one
after the other; times are medians over ``--repeats`` timed steps after one warm-up step.
The machine load (``os.getloadavg``) is printed before and after: the CPU may be shared.

    python benchmarks/bench_speed.py                     # all cases, CPU, 2 threads, fp32
    python benchmarks/bench_speed.py --cases head_train det_infer --repeats 5
    python benchmarks/bench_speed.py --device cuda --dtype bf16   # bf16 autocast on GPU

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (set before torch is imported): with spinning OpenMP
threads on a shared CPU every parallel op costs a scheduler tick (~8 ms).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the torch import (see above)

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

#: The official implementation on this machine's CPU (2 threads, fp32, medians), from the issue.
OFFICIAL = {
    "head_train": {"total": 28.5, "forward": 6.9, "backward": 21.9},
    "det_train": {"total": 23.1, "forward": 5.9, "backward": 17.2, "peak_mb": 3.9 * 1000},
    "det_infer": {"total": 3.14, "backbone": 1.71, "neck": 0.18, "head": 1.22},
}
#: Goals of the issue: speed-up vs the official figure.
GOALS = {"head_train": 5.0, "det_train": 3.0, "det_infer": 2.0, "flops": 0.5}
CASES = ("head_train", "det_train", "det_infer", "flops")
VARIANTS = ("baseline", "ours")
IMAGE_SIZE = (256, 704)


# ------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _step_summary(fwd, bwd, **extra) -> dict:
    """Medians of the timed training steps (forward, backward, total) plus ``extra`` fields."""
    tot = [a + b for a, b in zip(fwd, bwd)]
    return {"total": _median(tot), "forward": _median(fwd), "backward": _median(bwd), **extra}


def build(variant: str, device: torch.device):
    """The R50 RayDN detector (random weights, seed 0) configured as ``variant``."""
    from raydn.models.options import RuntimeOptions
    from raydn.presets import build_model

    torch.manual_seed(0)
    options = RuntimeOptions.baseline() if variant == "baseline" else RuntimeOptions()
    model = build_model("r50_raydn", options=options)
    return model.to(device)


@contextlib.contextmanager
def no_dropout(model):
    """Temporarily set every dropout probability of ``model`` to 0 (for an exact equality check of
    the training path: the variants draw their dropout masks differently)."""
    from raydn.models.transformer import PackedMultiheadAttention
    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or isinstance(m, PackedMultiheadAttention):
            attr = "p" if isinstance(m, torch.nn.Dropout) else "dropout"
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, 0.0)
    try:
        yield
    finally:
        for m, attr, v in saved:
            setattr(m, attr, v)


def make_batch(B: int, counts, frame_index: int, device: torch.device, images: bool = True):
    from raydn.data.synthetic_batch import synthetic_frame_batch
    return synthetic_frame_batch(B, IMAGE_SIZE, frame_index=frame_index, num_boxes=counts,
                                 with_targets=True, with_images=images, seed=7).to(device)


# ------------------------------------------------------------------------------------- cases
def case_head_train(variant, device, dtype, repeats):
    """Head alone, train mode, B=2 (40 / 38 boxes), denoising + dropout on."""
    model = build(variant, device).train()
    head, crit = model.pts_bbox_head, model.criterion
    B, levels = 2, [(32, 88), (16, 44), (8, 22), (4, 11)]
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(B, 6, 256, h, w, generator=g).to(device).requires_grad_(True) for h, w in levels]
    state = head.init_state(B, device)
    with no_dropout(head), torch.no_grad(), _autocast(device, dtype):   # equality check, untimed
        torch.manual_seed(1)
        b0 = make_batch(B, [40, 38], 0, device, images=False)
        out0, _ = head(feats, b0, state)
        loss_nodrop = float(sum(crit(out0, b0.gt_boxes, b0.gt_labels).values()))
    fwd, bwd, first = [], [], None
    torch.manual_seed(1)  # dropout / denoising draws
    for i in range(1 + 1 + repeats):                  # frame 0 fills the memory, 1 warm-up step
        batch = make_batch(B, [40, 38], i, device, images=False)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, dtype):
            out, new_state = head(feats, batch, state)
            loss = sum(crit(out, batch.gt_boxes, batch.gt_labels).values())
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        for f in feats:
            f.grad = None
        head.zero_grad(set_to_none=True)
        state = new_state.detach()
        first = float(loss) if first is None else first
        if i >= 2:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return _step_summary(fwd, bwd, loss_nodrop=loss_nodrop, loss_first=first, loss=float(loss))


def case_det_train(variant, device, dtype, repeats):
    """Full detector training step, B=1, 40 boxes (aux 2D targets), both losses, backward."""
    model = build(variant, device).train()
    state = model.init_state(1, device)
    with no_dropout(model), torch.no_grad(), _autocast(device, dtype):  # equality check, untimed
        torch.manual_seed(1)
        loss_nodrop = float(sum(model.forward_train(make_batch(1, [40], 0, device), state)[0].values()))
    fwd, bwd, first = [], [], None
    torch.manual_seed(1)  # grid mask / denoising / dropout draws
    for i in range(1 + 1 + repeats):
        batch = make_batch(1, [40], i, device)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, dtype):
            losses, new_state = model.forward_train(batch, state)
            loss = sum(losses.values())
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        state = new_state
        first = float(loss) if first is None else first
        if i >= 2:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return _step_summary(fwd, bwd, loss_nodrop=loss_nodrop, loss_first=first, loss=float(loss),
                         n_losses=len(losses))


def _infer_frames(model, device, dtype, frames):
    """Per-part times of ``frames`` frames after 2 warm-up frames (memory warm)."""
    times = {"backbone": [], "neck": [], "head": [], "total": []}
    state = model.init_state(1, device)
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range(2 + frames):
            batch = make_batch(1, [0], i, device)
            _sync(device)
            t0 = time.perf_counter()
            x = model.prepare_images(batch.images)
            feats = model.img_backbone(x)
            _sync(device)
            t1 = time.perf_counter()
            feats = model.img_neck(feats)
            _sync(device)
            t2 = time.perf_counter()
            feats = model.collect_feats(feats, 1)
            out, state = model.pts_bbox_head(feats, batch, state)
            _sync(device)
            t3 = time.perf_counter()
            if i >= 2:
                for k, v in (("backbone", t1 - t0), ("neck", t2 - t1), ("head", t3 - t2), ("total", t3 - t0)):
                    times[k].append(v)
    return times, state, out


def score_parity(out, ref) -> dict:
    """Last-frame score agreement of ``out`` (e.g. bf16) with ``ref`` (fp32), same frames and
    weights: max / mean |sigmoid score difference| over all queries x classes, and the overlap of
    the top-100 (query, class) pairs."""
    a = out["all_cls_scores"][-1].float().sigmoid().flatten(1)
    b = ref["all_cls_scores"][-1].float().sigmoid().flatten(1)
    k = min(100, b.shape[1])
    ta, tb = set(a.topk(k, dim=1).indices[0].tolist()), set(b.topk(k, dim=1).indices[0].tolist())
    return {"max_abs": float((a - b).abs().max()), "mean_abs": float((a - b).abs().mean()),
            "top100_overlap": len(ta & tb) / k, "max_score": float(a.max()), "max_score_fp32": float(b.max())}


def case_det_infer(variant, device, dtype, repeats):
    model = build(variant, device).eval()
    times, _, out = _infer_frames(model, device, dtype, repeats)
    res = {k: _median(v) for k, v in times.items()}
    res["score_sum"] = float(out["all_cls_scores"][-1].float().sigmoid().sum())
    if dtype != "fp32":  # the same frames again in fp32 (same model, same memory history)
        _, _, ref = _infer_frames(model, device, "fp32", repeats)
        res["vs_fp32"] = score_parity(out, ref)
    return res


def _timed_matmul(a, b, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    _sync(device)
    return time.perf_counter() - t0


def case_flops(variant, device, dtype, repeats, n=4096):
    """FLOPs of one full inference frame (memory warm) and its achieved FLOP/s, next to the FLOP/s
    of an n x n x n fp32 matmul. Frames and matmuls are timed alternately (same machine load)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build(variant, device).eval()
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    state = model.init_state(1, device)
    frame_t, mm_t = [], []
    with torch.inference_mode(), _autocast(device, dtype):
        for i in range(2 + max(3, repeats)):
            batch = make_batch(1, [0], i, device)
            if i == 1:
                counter = FlopCounterMode(display=False)
                with counter:
                    model.pts_bbox_head(model.extract_feats(batch.images), batch, state)
            _sync(device)
            t0 = time.perf_counter()
            _, state = model.pts_bbox_head(model.extract_feats(batch.images), batch, state)
            _sync(device)
            t = time.perf_counter() - t0
            m = _timed_matmul(a, b, device)
            if i >= 2:
                frame_t.append(t)
                mm_t.append(m)
    flops = counter.get_total_flops()
    t, tm = _median(frame_t), _median(mm_t)
    mm_rate = 2.0 * n ** 3 / tm
    return {"flops": flops, "total": t, "achieved": flops / t, "matmul": mm_rate,
            "ratio": flops / t / mm_rate, "matmul_s": tm}


CASE_FNS = {"head_train": case_head_train, "det_train": case_det_train, "det_infer": case_det_infer,
            "flops": case_flops}


# ------------------------------------------------------------------------------------- driver
def child(case: str, variant: str, device: torch.device, dtype: str, repeats: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = CASE_FNS[case](variant, device, dtype, repeats)
    res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return res


def run_child(case, variant, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, variant, "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"child {case}/{variant} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_s(x):
    return f"{x:8.3f}" if x == x else "       -"


def print_table(results: dict, args) -> None:
    mem_key = "cuda_peak_mb" if args.device.startswith("cuda") else "peak_mb"
    mem_name = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS of the child"
    print(f"\n{'case / part':<24s} {'official s':>10s} {'baseline s':>10s} {'ours s':>8s} "
          f"{'vs official':>11s} {'vs baseline':>11s}   goal")
    for case in ("head_train", "det_train", "det_infer"):
        if case not in results:
            continue
        b, o = results[case].get("baseline"), results[case].get("ours")
        off = OFFICIAL[case]
        for part in ([k for k in off if k != "peak_mb"]):
            ob = o.get(part, float("nan")) if o else float("nan")
            bb = b.get(part, float("nan")) if b else float("nan")
            r_off = off[part] / ob if ob == ob else float("nan")
            r_base = bb / ob if (ob == ob and bb == bb) else float("nan")
            goal = ""
            if part == "total":
                need = off[part] / GOALS[case]
                goal = f"<= {need:.2f} s: {'MET' if ob <= need else 'NOT met'}"
            print(f"{case + ' ' + part:<24s} {off[part]:10.2f} {_fmt_s(bb):>10s} {_fmt_s(ob)} "
                  f"{r_off:10.2f}x {r_base:10.2f}x   {goal}")
        pb = b.get(mem_key) if b else None
        po = o.get(mem_key) if o else None
        offm = off.get("peak_mb")
        print(f"{case + ' peak MB':<24s} {(f'{offm:.0f}' if offm else '-'):>10s} "
              f"{(f'{pb:.0f}' if pb else '-'):>10s} {(f'{po:.0f}' if po else '-'):>8s}"
              f"   ({mem_name})")
    if "flops" in results and results["flops"].get("ours"):
        f = results["flops"]["ours"]
        print(f"\nfull R50 inference: {f['flops'] / 1e9:.1f} GFLOP per frame in {f['total']:.3f} s "
              f"-> {f['achieved'] / 1e9:.1f} GFLOP/s; fp32 matmul 4096^3: {f['matmul'] / 1e9:.1f} GFLOP/s; "
              f"ratio {f['ratio']:.2f} (goal >= {GOALS['flops']}: {'MET' if f['ratio'] >= GOALS['flops'] else 'NOT met'})")
        if results["flops"].get("baseline"):
            fb = results["flops"]["baseline"]
            print(f"  baseline: {fb['achieved'] / 1e9:.1f} GFLOP/s in {fb['total']:.3f} s, ratio {fb['ratio']:.2f}")
    for variant, r in results.get("det_infer", {}).items():
        if r and "vs_fp32" in r:
            p = r["vs_fp32"]
            print(f"det_infer {variant}: {args.dtype} vs fp32 scores (last frame, same weights and "
                  f"frames): max |diff| {p['max_abs']:.2e}, mean {p['mean_abs']:.2e}, top-100 "
                  f"overlap {p['top100_overlap']:.2f}, max score {p['max_score']:.4f} vs "
                  f"{p['max_score_fp32']:.4f}")
    for case in ("head_train", "det_train", "det_infer"):
        if case in results and results[case].get("baseline") and results[case].get("ours"):
            b, o = results[case]["baseline"], results[case]["ours"]
            keys = ["loss_nodrop", "loss"] if "loss" in o else ["score_sum"]
            print(f"{case}: " + "; ".join(f"{k} baseline {b[k]:.7g}, ours {o[k]:.7g}" for k in keys)
                  + (" (loss_nodrop: first frame, same draws, dropout off -> equal up to float "
                     "rounding; loss: last timed step, dropout masks are drawn differently)"
                     if "loss" in o else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: torch.autocast(bfloat16) around forward (meant for the GPU)")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per child (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--out", default=None, help="also write the raw results as JSON here")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        res = child(args.child[0], args.child[1], device, args.dtype, args.repeats)
        print(json.dumps(res))
        return 0
    print(f"torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, repeats {args.repeats}, "
          f"cpus {os.cpu_count()}")
    print(f"load average before: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    results: dict = {}
    for case in args.cases:
        for variant in args.variants:
            t0 = time.perf_counter()
            results.setdefault(case, {})[variant] = r = run_child(case, variant, args)
            print(f"  {case:<10s} {variant:<8s} {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})}"
                  f"  [{time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f}]", flush=True)
    print_table(results, args)
    print(f"\nload average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        from raydn.io import atomic_write_json
        atomic_write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
