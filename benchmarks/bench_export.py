"""CPU latency per frame: onnxruntime (the `raydn export` graphs) vs PyTorch, memory warm.

For every preset (default ``tiny_raydn`` and ``r50_raydn``; random weights, seed 0, B = 1, 6 cameras
at the preset's input size) the same frames go through

* ``pytorch``: the library defaults (fused deformable sampler, folded BN, channels-last encoder
  where it applies), ``torch.inference_mode``;
* ``pytorch_plain`` (``--plain``): the model as exported (``RuntimeOptions.for_export()``: the
  ``grid_sample`` sampler, unfolded BN, contiguous layout), i.e. the same graph in PyTorch;
* ``onnxruntime``: :class:`raydn.deploy.OnnxDetector` on the exported graphs (CPU provider,
  sequential execution).

Per frame the variants run one after the other (same machine load); the memory of each variant is
carried from its own previous frame; 2 warm-up frames, then ``--frames`` timed ones; medians of
the encoder (backbone + neck), the head step and the total, and the in-run ratio. Thread counts are
equal: ``torch.set_num_threads(T)`` and onnxruntime ``intra_op_num_threads = T``
(``OMP_NUM_THREADS`` is set to T before torch is imported). The machine may be shared: the load
average is printed before and after.

    python benchmarks/bench_export.py                        # tiny + R50, 2 threads, 5 frames
    python benchmarks/bench_export.py --presets tiny_raydn --frames 20 --plain
    python benchmarks/bench_export.py --export-dir /tmp/onnx  # reuse / keep the exports (per preset)
"""
from __future__ import annotations

import argparse
import os
import sys


def _threads_from_argv(argv) -> int:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 2


_T = _threads_from_argv(sys.argv)
os.environ["OMP_NUM_THREADS"] = str(_T)          # before torch: same thread count for both
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

PARTS = ("encoder", "head", "total")


def _export(preset: str, model_state: dict, out_dir: str) -> float:
    """Export ``preset`` with the given weights into ``out_dir`` unless a complete export of the
    same preset is there; returns the export time (0 when reused)."""
    from raydn.interop.export import ExportError, export_onnx, read_metadata
    from raydn.models.options import RuntimeOptions
    from raydn.presets import build_model
    try:
        if read_metadata(out_dir).get("preset") == preset:
            return 0.0
    except ExportError:
        pass
    m = build_model(preset, options=RuntimeOptions.for_export()).eval()
    m.load_state_dict(model_state)
    t0 = time.perf_counter()
    export_onnx(m, out_dir, preset=preset)
    return time.perf_counter() - t0


def bench_preset(preset: str, frames: int, threads: int, export_dir: str | None, plain: bool) -> dict:
    from raydn.data.synthetic_batch import synthetic_frame_batch
    from raydn.deploy import OnnxDetector
    from raydn.models.options import RuntimeOptions
    from raydn.presets import build_model

    torch.manual_seed(0)
    model = build_model(preset).eval()
    variants = {"pytorch": model}
    if plain:
        pm = build_model(preset, options=RuntimeOptions.for_export()).eval()
        pm.load_state_dict(model.state_dict())
        variants["pytorch_plain"] = pm
    tmp = None
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="raydn-bench-export-")
        d = tmp.name
    else:
        d = os.path.join(export_dir, preset)
    export_s = _export(preset, model.state_dict(), d)
    det = OnnxDetector(d, threads=threads)
    size = tuple(model.cfg.image_size)
    times = {v: {p: [] for p in PARTS} for v in [*variants, "onnxruntime"]}
    states = {v: (m.init_state(1) if v != "onnxruntime" else det.init_state(1))
              for v, m in [*variants.items(), ("onnxruntime", None)]}
    last = {}
    for i in range(2 + frames):
        batch = synthetic_frame_batch(1, size, frame_index=i, num_boxes=0, with_targets=False, seed=5)
        for v in times:
            t0 = time.perf_counter()
            if v == "onnxruntime":
                feats = det.extract_feats(batch.images)
                t1 = time.perf_counter()
                outs, states[v] = det.step(batch, states[v], feats=feats)
                last[v] = torch.from_numpy(outs["scores"])
            else:
                m = variants[v]
                with torch.inference_mode():
                    feats = m.extract_feats(batch.images)
                    t1 = time.perf_counter()
                    out, states[v] = m.pts_bbox_head(feats, batch, states[v])
                    last[v] = out["all_cls_scores"][-1].sigmoid().flatten(1).topk(
                        min(m.cfg.head.max_num, out["all_cls_scores"][-1][0].numel()), dim=1).values
            t2 = time.perf_counter()
            if i >= 2:
                times[v]["encoder"].append(t1 - t0)
                times[v]["head"].append(t2 - t1)
                times[v]["total"].append(t2 - t0)
    res = {v: {p: statistics.median(x) for p, x in t.items()} for v, t in times.items()}
    score_diff = float((last["onnxruntime"] - last["pytorch"]).abs().max())
    if tmp is not None:
        tmp.cleanup()
    return {"preset": preset, "image_size": list(size), "frames": frames, "threads": threads,
            "export_s": export_s, "median_s": res, "last_frame_max_score_diff": score_diff}


def print_table(results: list[dict]) -> None:
    print(f"\n{'preset':<11s} {'part':<8s} {'pytorch s':>10s} {'plain pt s':>10s} {'ort s':>9s} "
          f"{'ort / pytorch':>13s}")
    for r in results:
        m = r["median_s"]
        for p in PARTS:
            pt, ox = m["pytorch"][p], m["onnxruntime"][p]
            pl = m.get("pytorch_plain", {}).get(p)
            print(f"{r['preset']:<11s} {p:<8s} {pt:10.4f} {(f'{pl:.4f}' if pl else '-'):>10s} "
                  f"{ox:9.4f} {ox / pt:12.2f}x")
        print(f"{'':<11s} last-frame max |score difference| onnxruntime vs pytorch: "
              f"{r['last_frame_max_score_diff']:.1e}; export {r['export_s']:.0f} s"
              + (" (reused)" if r["export_s"] == 0 else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny_raydn", "r50_raydn"])
    ap.add_argument("--frames", type=int, default=5, help="timed frames (after 2 warm-up frames)")
    ap.add_argument("--threads", type=int, default=_T, help="torch and onnxruntime threads")
    ap.add_argument("--plain", action="store_true",
                    help="also time PyTorch with the export's plain paths (grid_sample sampler)")
    ap.add_argument("--export-dir", default=None,
                    help="keep / reuse the exports in DIR/<preset> (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="also write the results as JSON (atomically)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, CPU, {args.threads} "
          f"threads (torch and onnxruntime), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"{os.cpu_count()} cpus")
    print(f"load average before: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    results = []
    for preset in args.presets:
        t0 = time.perf_counter()
        results.append(bench_preset(preset, args.frames, args.threads, args.export_dir, args.plain))
        print(f"  {preset}: done in {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f}",
              flush=True)
    print_table(results)
    print(f"\nload average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.out:
        from raydn.io import atomic_write_json
        atomic_write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
