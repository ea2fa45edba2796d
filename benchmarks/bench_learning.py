"""Learning benchmark (issue 9): how fast and how well the demo model learns, with and without
ray denoising (and other training options), scored with the official nuScenes metric.

Each run trains a variant on a synthetic world's train split for a fixed number of iterations
(the same for every variant: a fair comparison on a shared machine, where wall-clock budgets
would depend on the load), evaluates checkpoints along the way on the val split (devkit metric +
duplicates along rays) and writes ``runs/<variant>_s<seed>/result.json``. ``--report`` gathers all
results of an output folder into a table (mean +- spread over seeds) and a PNG of mAP / NDS /
duplicate rate vs iterations.

    python benchmarks/bench_learning.py --world raydn_demo/world --out bench_learning \\
        --variants raydn,no_ray --seeds 0,1 --iters 1300 --evals 3       # hours on 2 CPU cores
    python benchmarks/bench_learning.py --out bench_learning --report     # table + learning_curves.png
    # equal wall-clock (issue 9's criterion for a learning-speed option): two variants side by side
    OMP_NUM_THREADS=1 python benchmarks/bench_learning.py --variants raydn --seeds 0 --minutes 14 &
    OMP_NUM_THREADS=1 python benchmarks/bench_learning.py --variants groups3 --seeds 0 --minutes 14
    # issue 20: dense depth supervision against the demo recipe, equal wall-clock, two seeds
    python benchmarks/bench_learning.py --variants raydn,depth --seeds 0,1 --minutes 14

Variants: ``raydn`` (demo_raydn), ``no_ray`` (demo_raydn with ray denoising off = demo_repdetr3d),
``groups3`` (demo_raydn + 3 Group-DETR training groups), ``no_cache`` (stem cache off), ``depth``
(demo_raydn + dense LiDAR depth supervision, ``ModelConfig.depth``, default weight 0.2).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = ("raydn", "no_ray", "groups3", "no_cache", "no_dn", "depth")


def variant_options(name: str) -> tuple[str, dict, dict]:
    """(preset, model_overrides, TrainOptions extras) of a variant."""
    from raydn.presets import get_preset
    head = get_preset("demo_raydn").model.head
    if name == "raydn":
        return "demo_raydn", {}, {}
    if name == "no_ray":
        return "demo_repdetr3d", {}, {}
    if name == "groups3":
        return "demo_raydn", {"head": replace(head, query_groups=3)}, {}
    if name == "no_cache":
        return "demo_raydn", {}, {"stem_cache": "off"}
    if name == "no_dn":
        return "demo_raydn", {"head": replace(head, denoising=replace(head.denoising, enabled=False))}, {}
    if name == "depth":
        depth = get_preset("demo_raydn").model.depth
        return "demo_raydn", {"depth": replace(depth, enabled=True)}, {}
    raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def evaluate_checkpoint(model, val_ds, world: Path, out_dir: Path) -> dict:
    """Streaming inference over the val split + devkit metric + duplicates along rays, all on the
    model's NMS-free output (what ray denoising trains); plus the devkit metric after the preset's
    BEV NMS (``mAP_nms`` / ``NDS_nms``, when the preset decodes with one)."""
    from raydn.engine.infer import evaluate_submission, stream_inference, write_submission
    from raydn.eval.ray_duplicates import ray_duplicates
    from raydn.models.decode import apply_bev_nms
    dets, _ = stream_inference(model.eval(), val_ds, num_workers=0, progress=False, nms=False)

    def score(d, folder):
        sub = write_submission(d, val_ds.infos, folder / "results_nusc.json")
        return evaluate_submission(sub, dataroot=world, version="v1.0-mini", eval_set="mini_val",
                                   out_dir=folder, evaluator="devkit", plots=False, quiet=True).metrics
    m = score(dets, out_dir)
    radius = model.cfg.head.nms_radius
    mn = score([apply_bev_nms(d, radius) for d in dets], out_dir / "nms") if radius is not None else m
    rd = ray_duplicates(dets, val_ds.infos)
    return {"mAP": m["mean_ap"], "NDS": m["nd_score"], "tp_errors": m["tp_errors"],
            "mAP_nms": mn["mean_ap"], "NDS_nms": mn["nd_score"],
            "ray_duplicates_per_gt": rd["ray_duplicates_per_gt"],
            "ray_duplicate_fp_share": rd["ray_duplicate_fp_share"],
            "false_positives": rd["false_positives"], "ray_duplicates": rd["ray_duplicates"]}


def run_one(world: Path, infos: Path, out: Path, variant: str, seed: int, iters: int, evals: int,
            workers: int, minutes: float | None = None) -> dict:
    """Train one variant (``iters`` iterations, or -- with ``minutes`` -- as many as fit in that
    wall-clock budget, at most ``iters``, the schedule fitted to it as in the demo) and score its
    checkpoints (with a budget: the final one only, the length being known only at the end)."""
    import torch

    from raydn.data.dataset import NuScenesStreamingDataset
    from raydn.engine.train import Trainer, TrainOptions
    preset, overrides, extra = variant_options(variant)
    label = variant if minutes is None else f"{variant}@{minutes:g}min"
    run_dir = out / "runs" / (f"{variant}_s{seed}" if minutes is None else f"{variant}_t{minutes:g}_s{seed}")
    every = max(1, iters // max(1, evals)) if minutes is None else 10 ** 9
    opts = TrainOptions(preset=preset, data=str(infos / "nuscenes2d_temporal_infos_train.pkl"),
                        out_dir=str(run_dir / "train"), max_iters=iters, seed=seed, workers=workers,
                        ckpt_interval=every, log_interval=25, progress=True, device="cpu",
                        tensorboard=False, model_overrides=overrides,
                        time_budget_s=None if minutes is None else 60.0 * minutes, **extra)
    t = time.time()
    trainer = Trainer(opts)
    result = trainer.run()
    train_s = time.time() - t
    aug = replace(trainer.preset.train.aug, training=False)
    val = NuScenesStreamingDataset(str(infos / "nuscenes2d_temporal_infos_val.pkl"), aug, test_mode=True)
    curve = []
    for ck in sorted((run_dir / "train").glob("iter_*.pt")):
        state = torch.load(ck, map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(state["model"])
        r = evaluate_checkpoint(trainer.model, val, world, run_dir / "eval" / ck.stem)
        r["iter"] = int(state["iteration"])
        curve.append(r)
        print(f"{variant} seed {seed} iter {r['iter']}: mAP {r['mAP']:.4f} NDS {r['NDS']:.4f} "
              f"(with NMS {r['mAP_nms']:.4f} / {r['NDS_nms']:.4f}) "
              f"ray dup/GT {r['ray_duplicates_per_gt']:.3f}", flush=True)
    done = int(result["iteration"])
    res = {"variant": label, "seed": seed, "preset": preset, "iters": done, "budget_minutes": minutes,
           "train_seconds": round(train_s, 1), "seconds_per_iter": round(train_s / max(1, done), 3),
           "final": curve[-1], "curve": curve, "loss": [h["loss"] for h in result["history"]]}
    from raydn.io import atomic_write_json
    atomic_write_json(run_dir / "result.json", res, indent=2)
    return res


def report(out: Path) -> str:
    import numpy as np
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    if not results:
        raise SystemExit(f"no results under {out / 'runs'}")
    by = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    lines = ["| variant | seeds | iterations | mAP | NDS | mATE | duplicates along rays / GT | ray-duplicate share of FPs "
             "| mAP with NMS | NDS with NMS | s/it |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ms(v):
        v = np.asarray(v, float)
        return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"
    for name, rs in by.items():
        f = [r["final"] for r in rs]
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {'/'.join(str(r['iters']) for r in rs)} | "
                     f"{ms([x['mAP'] for x in f])} | {ms([x['NDS'] for x in f])} | "
                     f"{ms([x['tp_errors']['trans_err'] for x in f])} | "
                     f"{ms([x['ray_duplicates_per_gt'] for x in f])} | {ms([x['ray_duplicate_fp_share'] for x in f])} | "
                     f"{ms([x.get('mAP_nms', float('nan')) for x in f])} | {ms([x.get('NDS_nms', float('nan')) for x in f])} | "
                     f"{ms([r['seconds_per_iter'] for r in rs])} |")
    table = "\n".join(lines)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = dict(zip(by, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for name, rs in by.items():
        for r in rs:
            it = [c["iter"] for c in r["curve"]]
            for ax, key in zip(axes, ("mAP", "NDS", "ray_duplicates_per_gt")):
                ax.plot(it, [c[key] for c in r["curve"]], "o-", color=colours[name], alpha=0.8,
                        label=f"{name} (seeds {','.join(str(x['seed']) for x in rs)})" if r is rs[0] else None)
            for ax, key in zip(axes, ("mAP_nms", "NDS_nms")):
                if all(key in c for c in r["curve"]):
                    ax.plot(it, [c[key] for c in r["curve"]], "s--", color=colours[name], alpha=0.5,
                            label=f"{name} with NMS" if r is rs[0] else None)
    for ax, title in zip(axes, ("mAP (synthetic val; dashed: with BEV NMS)", "NDS (synthetic val; dashed: with BEV NMS)",
                                 "duplicates along rays per GT box (NMS-free)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    from raydn.io import atomic_path
    with atomic_path(out / "learning_curves.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    (out / "ablation.md").write_text(table + "\n")
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="raydn_demo/world", help="synthetic dataroot (raydn synth --profile demo)")
    p.add_argument("--infos", default=None, help="folder of its info pickles (default: prepare into OUT/infos)")
    p.add_argument("--out", default="bench_learning")
    p.add_argument("--variants", default="raydn,no_ray")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--iters", type=int, default=1300)
    p.add_argument("--evals", type=int, default=3, help="checkpoints evaluated along the run")
    p.add_argument("--minutes", type=float, default=None,
                   help="equal wall-clock comparison: train each run for this many minutes (at most "
                        "--iters iterations; run variants side by side, e.g. OMP_NUM_THREADS=1, so "
                        "that they share the machine alike)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--report", action="store_true", help="only gather existing results")
    a = p.parse_args()
    out = Path(a.out)
    if not a.report:
        world = Path(a.world)
        infos = Path(a.infos) if a.infos else out / "infos"
        if not (infos / "nuscenes2d_temporal_infos_train.pkl").exists():
            from raydn.data.prepare import prepare_infos
            prepare_infos(world, "v1.0-mini", infos, progress=True)
        for v in a.variants.split(","):
            for s in a.seeds.split(","):
                run_one(world, infos, out, v.strip(), int(s), a.iters, a.evals, a.workers, a.minutes)
    print(report(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
