"""``raydn eval``: streaming inference in scene order + the official nuScenes metric."""
from __future__ import annotations

from pathlib import Path

from raydn.commands._args import (
    add_device_argument,
    add_progress_argument,
    add_tracker_arguments,
    add_trust_argument,
    resolve_device,
)
from raydn.eval.tracking import run_tracking_eval
from raydn.io import OutputFolder

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "evaluate a checkpoint: streaming inference, nuScenes submission JSON, official metric"


def add_arguments(p):
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", metavar="CKPT",
                      help="raydn checkpoint (training checkpoint or `raydn convert` output) or a shipped "
                            "reference model's name (e.g. demo_raydn-reference)")
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
    add_tracker_arguments(p)


def run(args) -> int:
    if args.submission:
        return _score_submission(args)
    return _evaluate_checkpoint(args)


def _score_submission(args) -> int:
    """``--submission FILE``: check and score an existing (detection or tracking) submission."""

    where = args.out or Path(args.submission).resolve().parent
    if args.tracking:
        out = Path(where)
        from raydn.data.infos import load_info_file
        from raydn.engine.infer import default_eval_set
        version = args.version or load_info_file(args.data).get("metadata", {}).get("version", "v1.0-trainval")
        with OutputFolder(out, "eval"):  # locked while writing; a run that writes nothing leaves no folder
            run_tracking_eval(args.submission, args.dataroot, version,
                              args.eval_set or default_eval_set(version), out)
        print(f"tracking metrics written to {out}")
        return 0
    from raydn.engine.score import score_submission_file
    with OutputFolder(where, "eval"):  # locked while writing; writing nothing leaves no folder
        score_submission_file(args.submission, infos_path=args.data, dataroot=args.dataroot,
                              version=args.version, eval_set=args.eval_set, out_dir=args.out,
                              evaluator=args.evaluator, plots=not args.no_plots)
    print(f"metrics written to {where}")
    return 0


def _evaluate_checkpoint(args) -> int:
    """``--checkpoint CKPT``: :func:`raydn.engine.evaluate.evaluate_checkpoint` (under DDP when
    started by torchrun: every rank infers its chunk, rank 0 writes and scores)."""

    from raydn.engine.distributed import cleanup_distributed, setup_distributed
    from raydn.engine.evaluate import EvalOptions, evaluate_checkpoint

    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix("").parent / "eval"
    options = EvalOptions(
        dataroot=args.dataroot, version=args.version, eval_set=args.eval_set, evaluator=args.evaluator,
        plots=not args.no_plots, nms=not args.no_nms, format_only=args.format_only,
        tracker=args.tracker if args.tracking else None, birth_score=args.birth_score,
        keep_score=args.keep_score, num_workers=args.workers, progress=not args.no_progress,
        trust_checkpoint=args.trust_checkpoint)
    dist = setup_distributed(resolve_device(args.device))
    folder = None
    clean = True  # after an error no barrier at cleanup (a lost peer would only raise again)
    try:
        if dist.is_main:
            folder = OutputFolder(out, "eval").open()  # locked while writing
        result = evaluate_checkpoint(args.checkpoint, args.data, out, options, device=dist.device,
                                     rank=dist.rank, world_size=dist.world_size, say=print)
        if result is not None and not args.format_only:
            print(f"metrics written to {out}")
        return 0
    except BaseException:
        clean = False
        raise
    finally:
        if folder is not None:
            folder.close()
        cleanup_distributed(clean)
