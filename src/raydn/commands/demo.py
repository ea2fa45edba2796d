"""``raydn demo``: the whole pipeline on the built-in synthetic world, CPU only.

synthetic nuScenes-format world -> info records -> streaming training of a small RayDN model (ray
denoising on) -> streaming inference on ``mini_val`` -> the official nuScenes metric -> pictures
(six cameras with predicted and ground-truth boxes, bird's-eye view, loss curve) -> a short report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from raydn.commands._args import add_deprecated_alias, add_progress_argument
from raydn.errors import CheckpointError, RaydnError
from raydn.geometry import CLASS_NAMES
from raydn.io import atomic_write_json

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "run the end-to-end demo on the built-in synthetic world (CPU, about 15 minutes)"


def add_arguments(p):
    p.add_argument("--out", default="raydn_demo", metavar="DIR", help="output folder")
    p.add_argument("--preset", default="demo_raydn", metavar="NAME",
                   help="preset to train (default demo_raydn: ImageNet MobileNetV2 + tiny head)")
    p.add_argument("--scenes", type=int, default=10, metavar="N", help="synthetic scenes (8 train + 2 val)")
    p.add_argument("--profile", choices=("demo", "rays", "realistic"), default="demo",
                   help="synthetic world layout (see `raydn synth --help`)")
    p.add_argument("--samples-per-scene", type=int, default=40, metavar="N",
                   help="keyframes per synthetic scene at 2 Hz")
    iters = p.add_argument("--max-iters", type=int, default=4000, metavar="N",
                           help="training iterations at most; the --time-budget usually sets fewer "
                                "(the cosine schedule is fitted to what the measured speed allows)")
    add_deprecated_alias(p, "--iters", iters)
    budget = p.add_argument("--time-budget", type=float, default=14.0, metavar="MINUTES",
                            help="wall-clock budget of the whole demo: training is shortened (its cosine "
                                 "schedule re-derived) when the measured speed would not fit; 0 = no budget")
    add_deprecated_alias(p, "--minutes", budget)
    p.add_argument("--min-iters", type=int, default=800, metavar="N",
                   help="never train fewer iterations than this, even when the --time-budget is "
                        "exceeded (a slow machine then takes longer instead of giving a poor model)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the world and the training")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader workers (per training process)")
    p.add_argument("--procs", type=int, default=None, metavar="N",
                   help="training processes (data parallel over gloo, the cores shared out); default: one "
                        "per core up to the total batch (2 on 2 cores: ~1.5x the iterations of one "
                        "2-thread process in the same budget, README 'Demo accuracy'); --quick: 1")
    p.add_argument("--reference-frames", type=int, default=40, metavar="N",
                   help="frames of the reference model's video (the first mini_val scene; 0: no video); "
                        "the reference model is scored and filmed when the preset ships one")
    frames = p.add_argument("--num-frames", type=int, default=4, metavar="N",
                            help="mini_val frames to render as pictures")
    add_deprecated_alias(p, "--frames", frames)
    p.add_argument("--quick", action="store_true",
                   help="a tiny world and a few iterations: checks the pipeline in ~1 minute")
    add_progress_argument(p)


#: the project plan's accuracy target for the demo (synthetic mini_val, official metric)
TARGET = {"mAP": 0.30, "NDS": 0.35}

#: seconds kept for streaming inference, the metric and the pictures after training (2 cores: ~20 s)
_EVAL_RESERVE_S = 45.0

#: seconds kept for the reference model: its metric (~15 s) and a 40-frame video (~16 s), 2 cores
_REFERENCE_RESERVE_S = 45.0


def _existing_world(root) -> dict | None:
    """Seed / profile / size of a world written by ``raydn synth`` at ``root`` (None if absent)."""
    meta = root / "raydn_synth.json"
    if not (root / "v1.0-mini").is_dir() or not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    return dict(seed=m.get("seed"), profile=m.get("profile", "realistic"),
                samples_per_scene=m.get("samples_per_scene"), n_scenes=len(m.get("scenes", [])))


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.time()


def run(args) -> int:
    """The five steps, each a function of this module or of the engine (the evaluation is
    :func:`raydn.engine.evaluate.evaluate_checkpoint`, the sequence ``raydn eval`` runs)."""

    import torch

    from raydn.data.prepare import prepare_infos
    from raydn.engine.evaluate import EvalOptions, evaluate_checkpoint
    from raydn.viz.render import plot_training_curves

    if not _backbone_weights_present(args.preset):  # fail before minutes of world generation, not after
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    scenes, spp, iters = args.scenes, args.samples_per_scene, args.max_iters
    if args.quick:
        scenes, spp, iters = 5, 6, 12
    timings = {}
    t_start = time.time()
    torch.manual_seed(args.seed)

    t = _step(f"1/6 synthetic world: {scenes} scenes x {spp} samples")
    root = _synthetic_world(out / "world", args, scenes, spp, progress)
    timings["world"] = time.time() - t

    t = _step("2/6 info records (official format)")
    paths = prepare_infos(root, "v1.0-mini", out / "infos", progress=progress)
    timings["prepare"] = time.time() - t

    t = _step(f"3/6 training {args.preset} (ray denoising on)")
    result, procs = _train(args, paths["train"], out / "train", iters, progress, t_start)
    timings["train"] = time.time() - t
    curve = plot_training_curves(result["history"], out / "loss_curve.png")

    t = _step("4/6 streaming inference on mini_val + official nuScenes metric")
    # inference NMS-free (the model's own output), then the preset's NMS on top: both are scored
    ev = evaluate_checkpoint(result["checkpoint"], paths["val"], out / "eval", EvalOptions(
        dataroot=root, version="v1.0-mini", eval_set="mini_val", evaluator="devkit", plots=True,
        score_without_nms=True, keep_frames=args.num_frames, num_workers=args.workers, progress=progress))
    timings["eval"] = time.time() - t

    t = _step("5/6 pictures")
    pictures = _render_pictures(ev, args.num_frames, out / "frames")
    timings["render"] = time.time() - t

    t = _step("6/6 the shipped reference model: the same recipe trained far longer")
    reference = _reference_model(args.preset, paths["val"], root, out / "reference", args, progress)
    timings["reference"] = time.time() - t

    report = _report(args.preset, ev, result, procs, timings, files={
        "world": str(root), "infos": {k: str(v) for k, v in paths.items()},
        "checkpoint": result["checkpoint"], "submission": str(ev.submission),
        "metrics": str(out / "eval" / "metrics_summary.json"),
        "loss_curve": str(curve), "frames": [str(p) for p in pictures]})
    report["reference_model"] = reference
    atomic_write_json(out / "report.json", report, indent=2)
    _print_report(report, ev, timings, out)
    return 0


def _backbone_weights_present(preset: str) -> bool:
    """Whether the preset's pretrained backbone weights can be found (else say so: False)."""
    from raydn.models.backbones.mobilenet import resolve_pretrained
    from raydn.presets import get_preset
    bb = get_preset(preset).model.backbone
    if bb.pretrained:
        try:
            resolve_pretrained(bb.pretrained, bb.name)
        except CheckpointError as e:
            print(f"error: preset {preset}: {e} (or pass --preset tiny_raydn)")
            return False
    return True


def _synthetic_world(root, args, scenes: int, spp: int, progress: bool):
    """The world at ``root``: reused when ``raydn synth`` wrote it with the same seed, profile and
    size, else generated."""
    from raydn.data.synth import generate_world
    wanted = dict(seed=args.seed, profile=args.profile, samples_per_scene=spp, n_scenes=scenes)
    if _existing_world(root) == wanted:
        print(f"reusing {root} (same seed, profile and size)")
    else:
        generate_world(root, scenes=scenes, seed=args.seed, split="mini", samples_per_scene=spp,
                       workers=max(1, args.workers), progress=progress, profile=args.profile,
                       overwrite=True)
    return root


def _train(args, train_infos, out_dir, iters: int, progress: bool, t_start: float) -> tuple[dict, int]:
    """Train the preset (in ``--procs`` processes) within what is left of the demo's time budget
    -> ``(the training result, the number of processes)``."""
    from raydn.engine.launch import default_cores, default_procs, train_local_processes
    from raydn.engine.train import TrainOptions
    from raydn.presets import get_preset
    budget = None
    if args.time_budget > 0 and not args.quick:  # what is left, less a reserve for evaluation + pictures
        reserve = _EVAL_RESERVE_S + (_REFERENCE_RESERVE_S if _reference_name(args.preset) else 0.0)
        budget = max(0.0, 60.0 * args.time_budget - (time.time() - t_start) - reserve)
        print(f"training budget: {budget / 60:.1f} min (demo budget {args.time_budget:g} min)")
    opts = TrainOptions(preset=args.preset, data=str(train_infos), out_dir=str(out_dir),
                        max_iters=iters, seed=args.seed, workers=args.workers,
                        ckpt_interval=10 ** 9, log_interval=25, progress=progress, device="cpu",
                        time_budget_s=budget, budget_min_iters=None if args.quick else args.min_iters)
    total_batch = get_preset(args.preset).train.total_batch_size
    if args.procs is None:  # --quick stays in this process: spawning would cost more than it trains
        procs = 1 if args.quick else default_procs(total_batch)
    else:
        procs = max(1, min(args.procs, total_batch))
    if procs > 1:
        print(f"{procs} training processes (data parallel over gloo, "
              f"{max(1, default_cores() // procs)} thread(s) each; --procs 1: one process)")
    return train_local_processes(opts, procs), procs


def _reference_name(preset: str) -> str | None:
    """The shipped reference model of ``preset`` (:mod:`raydn.weights`), or None."""
    from raydn.weights import list_reference_models
    name = f"{preset}-reference"
    return name if name in list_reference_models() else None


def _reference_model(preset: str, val_infos, root, folder: Path, args, progress: bool) -> dict | None:
    """Score the shipped reference model of ``preset`` on the same ``mini_val`` (the same metric
    and decoding as the model just trained) and film its first ``--reference-frames`` frames with
    ``raydn infer``'s renderer (boxes coloured by track, BEV paths). None when the preset ships none."""
    from raydn.engine.evaluate import EvalOptions, evaluate_checkpoint
    from raydn.engine.stream import (StreamOptions, nuscenes_stream, open_backend, run_stream,
                                     select_nuscenes_records)
    from raydn.interop.convert import load_model
    from raydn.presets import get_preset
    from raydn.weights import get_reference_model
    name = _reference_name(preset)
    if name is None:
        print(f"no reference model ships for preset {preset}: skipped")
        return None
    ref = get_reference_model(name)
    path = ref.verify()
    ev = evaluate_checkpoint(str(path), val_infos, folder / "eval", EvalOptions(
        dataroot=root, version="v1.0-mini", eval_set="mini_val", evaluator="devkit", plots=False,
        num_workers=args.workers, progress=progress))
    m = ev.report.metrics
    video, n_video = None, 0
    if args.reference_frames > 0:
        from raydn.viz.video import require_video_support
        try:
            require_video_support()
        except RaydnError as e:  # the metric stands without the video
            print(f"reference video skipped: {e}")
        else:
            model = load_model(str(path)).eval()
            aug = get_preset(model.preset).test_transform()
            records, scene_names, _ = select_nuscenes_records(root, version="v1.0-mini", infos=val_infos)
            rep = run_stream(open_backend("torch", model=model), nuscenes_stream(records, aug, data_root=root),
                             StreamOptions(out=folder / "detections.jsonl", video=folder / "reference.mp4",
                                           aug=aug, scene_names=scene_names, limit=args.reference_frames,
                                           progress=progress))
            video, n_video = str(rep.video), rep.video_frames
    meta = ref.meta
    return {"name": name, "label": f"reference model {name}: the {preset} recipe trained "
                                   f"{meta.get('iterations')} iterations (shipped weights, not this run)",
            "iterations": meta.get("iterations"), "cpu_hours": meta.get("cpu_hours"),
            "NDS": m["nd_score"], "mAP": m["mean_ap"], "tp_errors": m["tp_errors"],
            "submission": str(ev.submission), "video": video, "video_frames": n_video}


def _render_pictures(ev, num_frames: int, folder) -> list:
    """The kept frames' six cameras with predicted (score >= 0.3) and ground-truth boxes."""
    from raydn.viz.render import denormalize_images, render_frame, save_image_atomic
    aug = ev.dataset.aug
    pictures = []
    for idx in sorted(ev.batches)[:num_frames]:
        b = ev.batches[idx]
        imgs = denormalize_images(b.images[0], aug.img_mean, aug.img_std)
        gt = b.gt_boxes[0] if b.gt_boxes is not None else None
        im = render_frame(imgs, b.lidar2img[0], ev.detections[idx], gt, score_threshold=0.3,
                          title=f"{b.meta[0]['sample_token'][:8]}  score>=0.3")
        pictures.append(save_image_atomic(im, folder / f"frame_{idx:04d}.png"))
    return pictures


def _report(preset: str, ev, result: dict, procs: int, timings: dict, files: dict) -> dict:
    """``report.json``: the metric with and without NMS, ray duplicates, target, schedule, timings."""
    from raydn.presets import get_preset
    radius = get_preset(preset).model.head.nms_radius
    m, raw_metrics = ev.report.metrics, ev.raw_metrics
    return {
        "NDS": m["nd_score"], "mAP": m["mean_ap"], "tp_errors": m["tp_errors"],
        "per_class_AP": m["mean_dist_aps"], "iterations": result["iteration"], "train_processes": procs,
        "decoding": ("NMS-free (official)" if radius is None else
                     {"bev_nms_radius_m": dict(zip(CLASS_NAMES, radius))}),
        "without_nms": None if raw_metrics is None else {
            "NDS": raw_metrics["nd_score"], "mAP": raw_metrics["mean_ap"], "tp_errors": raw_metrics["tp_errors"],
            "evaluator": "raydn fast evaluator (equal to nuscenes-devkit to 1e-6)"},
        "ray_duplicates": dict(ev.ray_duplicates),
        "target": dict(TARGET, reached=bool(m["mean_ap"] >= TARGET["mAP"] and m["nd_score"] >= TARGET["NDS"])),
        "schedule": result["schedule"], "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "files": files,
    }


def _print_report(report: dict, ev, timings: dict, out) -> None:
    from raydn.eval.ray_duplicates import format_ray_duplicates
    m, raw_metrics = ev.report.metrics, ev.raw_metrics
    total = sum(timings.values())
    print("\n================ raydn demo report ================")
    print(f"synthetic mini_val: NDS {m['nd_score']:.4f}  mAP {m['mean_ap']:.4f}  "
          f"(official nuScenes metric, detection_cvpr_2019"
          + (")" if report["decoding"] == "NMS-free (official)" else
             "; decoded with the preset's class-wise BEV NMS)"))
    if raw_metrics is not None:
        print(f"  without NMS (the model's own NMS-free output): NDS {raw_metrics['nd_score']:.4f}  "
              f"mAP {raw_metrics['mean_ap']:.4f}")
    print(f"project target: mAP >= {TARGET['mAP']:.2f}, NDS >= {TARGET['NDS']:.2f} in <= 15 min on 2 cores: "
          + ("reached" if report["target"]["reached"] else "NOT reached (see README, 'Demo accuracy')"))
    print("TP errors: " + ", ".join(f"{k} {v:.3f}" for k, v in m["tp_errors"].items()))
    print(format_ray_duplicates(ev.ray_duplicates) + " (NMS-free output)")
    print(f"trained {report['iterations']} iterations; time: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {total:.0f}s")
    print(f"pictures: {out / 'frames'}  loss curve: {report['files']['loss_curve']}")
    ref = report.get("reference_model")
    if ref is not None:
        print(f"\n--- {ref['label']} ---")
        print(f"synthetic mini_val: NDS {ref['NDS']:.4f}  mAP {ref['mAP']:.4f}  (same metric and decoding); "
              + "TP errors: " + ", ".join(f"{k} {v:.3f}" for k, v in ref["tp_errors"].items()))
        if ref["video"]:
            print(f"video of the reference model: {ref['video']} ({ref['video_frames']} frames)")
    print(f"report: {out / 'report.json'}")
