"""``raydn eval``: streaming inference in scene order + the official nuScenes metric."""
from __future__ import annotations

HELP = "evaluate a checkpoint: streaming inference, nuScenes submission JSON, official metric"


def add_arguments(p):
    from raydn.commands._args import add_device_argument, add_progress_argument, add_trust_argument
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="CKPT",
                      help="raydn checkpoint (training checkpoint or `raydn convert` output)")
    what.add_argument("--submission", metavar="FILE",
                      help="score this existing nuScenes submission JSON instead (checked first: every "
                           "sample of --data, finite values, known classes, <= 500 boxes per sample)")
    p.add_argument("--data", required=True, metavar="INFOS", help="val/test info pickle (from `raydn prepare`)")
    p.add_argument("--dataroot", required=True, metavar="DIR", help="nuScenes dataroot (for the metric's GT)")
    p.add_argument("--version", default=None,
                   help="nuScenes version (default: from the info file's metadata)")
    p.add_argument("--eval-set", default=None, metavar="SPLIT", help="split to score (default: val / mini_val)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: next to the checkpoint; with --submission: its folder)")
    p.add_argument("--evaluator", choices=["devkit", "fast", "both"], default="devkit",
                   help="official devkit metric, our fast evaluator, or both (cross-checked)")
    p.add_argument("--no-nms", action="store_true",
                   help="decode without the preset's class-wise BEV NMS (the demo presets decode with one; "
                        "the official presets are NMS-free either way)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader worker processes")
    add_device_argument(p)
    add_trust_argument(p)
    p.add_argument("--no-plots", action="store_true", help="skip the devkit's metric plots")
    add_progress_argument(p)
    p.add_argument("--format-only", action="store_true",
                   help="write the submission JSON only (e.g. for the test split)")
    p.add_argument("--tracking", action="store_true",
                   help="also track (--tracker) and write tracking_results_nusc.json, scored with the devkit's "
                        "tracking metric (AMOTA, AMOTP, MOTA, IDS, ...; needs raydn[tracking]); with "
                        "--submission: the file is a tracking submission, scored with that metric")
    from raydn.commands._args import add_tracker_arguments
    add_tracker_arguments(p)


def run(args) -> int:
    from pathlib import Path

    from raydn.data.dataset import NuScenesStreamingDataset
    from raydn.data.infos import load_info_file
    from raydn.engine.distributed import cleanup_distributed, setup_distributed
    from raydn.engine.infer import evaluate_submission, stream_inference, write_submission
    from raydn.interop.convert import load_model
    from raydn.presets import get_preset

    from raydn.io import OutputFolder  # locked while writing; a run that writes nothing leaves no folder
    if args.submission and args.tracking:
        from raydn.engine.infer import default_eval_set
        from raydn.eval.tracking import run_tracking_eval
        out = Path(args.out or Path(args.submission).resolve().parent)
        version = args.version or load_info_file(args.data).get("metadata", {}).get("version", "v1.0-trainval")
        with OutputFolder(out, "eval"):
            run_tracking_eval(args.submission, args.dataroot, version,
                              args.eval_set or default_eval_set(version), out)
        print(f"tracking metrics written to {out}")
        return 0
    if args.submission:
        from raydn.engine.score import score_submission_file
        with OutputFolder(args.out or Path(args.submission).resolve().parent, "eval"):
            score_submission_file(args.submission, infos_path=args.data, dataroot=args.dataroot,
                                  version=args.version, eval_set=args.eval_set, out_dir=args.out,
                                  evaluator=args.evaluator, plots=not args.no_plots)
        print(f"metrics written to {args.out or Path(args.submission).resolve().parent}")
        return 0
    from raydn.commands._args import resolve_device
    dist = setup_distributed(resolve_device(args.device))
    folder = None
    clean = True  # after an error no barrier at cleanup (a lost peer would only raise again)
    try:
        if dist.is_main:
            folder = OutputFolder(Path(args.out) if args.out else Path(args.checkpoint).with_suffix("").parent / "eval",
                                  "eval").open()
        model = load_model(args.checkpoint, trust=args.trust_checkpoint).to(dist.device).eval()
        info = load_info_file(args.data)
        version = args.version or info.get("metadata", {}).get("version", "v1.0-trainval")
        if not args.format_only:  # the test split has no GT: refuse before inference or any output
            from raydn.engine.score import refuse_without_ground_truth
            refuse_without_ground_truth(version, args.eval_set, args.data)
        aug = get_preset(model.preset).train.aug if model.preset else None
        from dataclasses import replace
        aug = replace(aug, training=False)
        dataset = NuScenesStreamingDataset(info, aug, test_mode=True, validate=False)
        nms = model.cfg.head.nms_radius is not None and not args.no_nms
        if dist.is_main:
            print("decoding: " + ("class-wise BEV NMS (preset setting; --no-nms to skip)" if nms else "NMS-free"))
        dets, _ = stream_inference(model, dataset, rank=dist.rank, world_size=dist.world_size,
                                   num_workers=args.workers, progress=not args.no_progress, nms=nms,
                                   with_selection=args.tracking and args.tracker == "memory")
        if not dist.is_main:
            return 0
        out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix("").parent / "eval"
        out.mkdir(parents=True, exist_ok=True)
        path = write_submission(dets, dataset.infos, out / "results_nusc.json")
        print(f"submission: {path} ({len(dataset)} samples)")
        if args.tracking:
            from raydn.eval.tracking import write_tracking_submission
            tpath = write_tracking_submission(dets, dataset.infos, out / "tracking_results_nusc.json",
                                              tracker=args.tracker, head=model.cfg.head,
                                              birth_score=args.birth_score, keep_score=args.keep_score)
            print(f"tracking submission: {tpath} (tracker {args.tracker})")
        if args.format_only:
            return 0
        rep = evaluate_submission(path, dataroot=args.dataroot, version=version,
                                  eval_set=args.eval_set, out_dir=out, evaluator=args.evaluator,
                                  plots=not args.no_plots)
        if rep.metrics is not None and rep.fast_metrics is not None:
            d = abs(rep.metrics["nd_score"] - rep.fast_metrics["nd_score"])
            print(f"fast evaluator vs devkit: |dNDS| = {d:.2e} "
                  f"(devkit {rep.seconds['devkit']:.1f}s, fast {rep.seconds['fast']:.2f}s)")
        if dataset.load_annotations:  # duplicates along camera rays (raydn.eval.ray_duplicates)
            from raydn.eval.ray_duplicates import format_ray_duplicates, ray_duplicates
            from raydn.io import atomic_write_json
            rd = ray_duplicates(dets, dataset.infos)
            print(format_ray_duplicates(rd))
            atomic_write_json(out / "ray_duplicates.json", rd, indent=2)
        if args.tracking:
            from raydn.engine.infer import default_eval_set
            from raydn.eval.tracking import run_tracking_eval
            run_tracking_eval(tpath, args.dataroot, version, args.eval_set or default_eval_set(version), out)
        print(f"metrics written to {out}")
        return 0
    except BaseException:
        clean = False
        raise
    finally:
        if folder is not None:
            folder.close()
        cleanup_distributed(clean)
