"""``raydn train``: streaming training on one process or many (``torchrun``)."""
from __future__ import annotations

import json
from pathlib import Path

from raydn.commands._args import (
    add_device_argument,
    add_progress_argument,
    add_trust_argument,
    resolve_device,
)
from raydn.errors import RaydnError

# Engine imports are inside run(): `raydn --help` builds every command's parser, and hoisting them
# costs ~0.4 s there (measured: build_parser 1.21 s -> 1.65 s, min of 6 runs).

HELP = "train a preset on prepared info records (one process, or many through torchrun)"


def add_arguments(p):
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="model preset (see `raydn presets`); required unless --config gives one or "
                        "--resume continues a run folder (which records its preset)")
    p.add_argument("--data", required=True, metavar="INFOS", help="train info pickle (from `raydn prepare`)")
    p.add_argument("--dataroot", default=None, metavar="DIR", help="root for relative image paths in the infos")
    p.add_argument("--out", default="work_dirs/run", metavar="DIR", help="output folder (checkpoints, logs, config)")
    p.add_argument("--batch-per-gpu", type=int, default=None, metavar="N",
                   help="samples per process (default: the preset's total batch / processes)")
    p.add_argument("--max-iters", type=int, default=None, metavar="N",
                   help="training iterations (overrides the preset's epochs)")
    p.add_argument("--epochs", type=float, default=None, metavar="E",
                   help="training epochs (overrides the preset's; --max-iters wins over it)")
    p.add_argument("--lr", type=float, default=None, metavar="LR", help="reference lr at the preset's total batch")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="random seed (model init, data order; default: the config's run.seed, 0)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML/JSON run configuration: a preset plus overrides of any model / recipe / "
                        "run key (e.g. a run folder's config.yaml, which repeats that run); "
                        "precedence: preset < --config < --set < explicit flags")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration key, value in YAML syntax, e.g. "
                        "head.denoising.ray.num_rays=7, train.aug.rot_range=[0,0] (repeatable; "
                        "`raydn config PRESET --list-keys` lists the keys)")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data loader worker processes")
    p.add_argument("--ckpt-interval", type=int, default=500, metavar="N",
                   help="write a checkpoint every N iterations (and at the end)")
    p.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="keep only the newest N iter_*.pt checkpoints (latest.pt always; default: all)")
    p.add_argument("--log-interval", type=int, default=10, metavar="N",
                   help="log the losses every N iterations (log.txt, TensorBoard)")
    p.add_argument("--resume", default=None, metavar="CKPT|auto", help="checkpoint to resume from, or 'auto'")
    # initialisation of a fresh run and the dry run (raydn.engine.initialisation, raydn.engine.dry_run)
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="backbone weights for a fresh run: an mmdet detector (backbone.*, e.g. the "
                        "nuImages Cascade Mask R-CNN of r50_*), a torchvision file or an official "
                        "RayDN/StreamPETR detector (img_backbone.*)")
    p.add_argument("--load-from", default=None, metavar="PATH",
                   help="whole-detector weights for a fresh run, loaded non-strictly as mmcv's load_from "
                        "(official or raydn layout; tensors of another shape are skipped and listed)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train an official preset from random weights on purpose (it otherwise needs "
                        "--pretrained / --load-from)")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model, load the initialisation, read the data, print what the run "
                        "would do (batch, iterations, lr per group, AMP, init report, data, parameters); "
                        "no training step, nothing written")
    p.add_argument("--amp", choices=["fp16", "bf16", "none"], default=None,
                   help="autocast of the image encoder (default: preset on GPU, none on CPU)")
    add_device_argument(p)
    add_trust_argument(p)
    add_progress_argument(p)
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall-clock budget of the training loop: the speed measured after 20 and 160 "
                        "iterations sets the schedule length (cosine end included, never above "
                        "--max-iters / the recipe) so that training ends in time")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="multi-process runs (torchrun, srun): how long a process waits for the others "
                        "before the run stops with 'lost contact' (default: $RAYDN_DIST_TIMEOUT or 600)")
    p.add_argument("--no-ray-dn", action="store_true", help="switch ray denoising off (baseline)")
    p.add_argument("--stem-cache", choices=["auto", "on", "off"], default="auto",
                   help="compute the frozen backbone stem once per frame (auto: when the preset's "
                        "training transform is deterministic, e.g. demo_*)")
    p.add_argument("--query-groups", type=int, default=None, metavar="G",
                   help="Group-DETR training groups of queries (not official; default: the preset's)")


def _recorded_preset(args) -> str | None:
    """The preset name recorded in the run folder that ``--resume`` continues (its ``config.json``:
    ``--out`` for ``--resume auto``, the checkpoint's folder for ``--resume PATH``), or None."""
    if not args.resume:
        return None
    folder = Path(args.out) if args.resume == "auto" else Path(args.resume).parent
    try:
        return json.loads((folder / "config.json").read_text())["preset"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _config_from_run_folder(args) -> None:
    """``--resume`` without ``--preset`` / ``--config``: continue with the configuration the run
    folder recorded (its ``config.yaml``: ``--out`` for ``auto``, the checkpoint's folder otherwise)."""
    if not args.resume or args.preset or args.config:
        return
    folder = Path(args.out) if args.resume == "auto" else Path(args.resume).parent
    if (folder / "config.yaml").is_file():
        args.config = str(folder / "config.yaml")
        print(f"configuration: {args.config} (the run folder's)", flush=True)


def require_preset(args) -> None:
    """``raydn train`` trains what it is told: ``--preset``, ``--config`` (a preset plus overrides)
    or ``--resume`` of a run folder that records its preset (then ``args.preset`` is set from it).
    Raises :class:`raydn.errors.RaydnError` otherwise -- never the toy model by default."""
    from raydn.presets import list_presets
    if args.preset or getattr(args, "config", None):
        return
    recorded = _recorded_preset(args)
    if recorded:
        args.preset = recorded
        return
    where = (f"; --resume {args.resume}: no run folder with a config.yaml or config.json to take it from"
             if args.resume else "")
    raise RaydnError(f"give --preset NAME or --config FILE{where} (presets: {', '.join(list_presets())})")


def run(args) -> int:
    from raydn.engine.train import TrainOptions, train
    _config_from_run_folder(args)
    require_preset(args)
    if args.keep_last is not None and args.keep_last < 1:
        raise RaydnError(f"--keep-last must be >= 1 (got {args.keep_last})")
    if args.query_groups is not None and args.query_groups < 1:
        raise RaydnError(f"--query-groups must be >= 1 (got {args.query_groups})")
    from raydn import run_config
    # explicit flags win over --set and --config (raydn.run_config: the precedence)
    flags = {"train.lr": args.lr, "train.epochs": args.epochs, "run.seed": args.seed,
             "run.batch_per_gpu": args.batch_per_gpu, "run.max_iters": args.max_iters,
             "run.amp": args.amp, "head.query_groups": args.query_groups,
             "head.denoising.ray.enabled": False if args.no_ray_dn else None,
             "run.pretrained": args.pretrained, "run.load_from": args.load_from,
             "run.from_scratch": True if args.from_scratch else None}
    config, provenance = run_config.resolve(args.preset, args.config, args.set, flags)
    opts = TrainOptions(
        **run_config.train_options_kwargs(config), config_provenance=provenance,
        data=args.data, dataroot=args.dataroot, out_dir=args.out,
        workers=args.workers, ckpt_interval=args.ckpt_interval,
        log_interval=args.log_interval, resume=args.resume,
        device=resolve_device(args.device), trust_checkpoint=args.trust_checkpoint,
        progress=not args.no_progress, keep_last=args.keep_last,
        stem_cache=args.stem_cache, dist_timeout_s=args.dist_timeout,
        time_budget_s=None if args.time_budget is None else 60.0 * args.time_budget)
    if args.dry_run:
        from raydn.engine.dry_run import dry_run
        dry_run(opts)
        return 0
    out = train(opts)
    if out.get("is_main", True):  # one line per run, not one per process
        print(f"finished at iteration {out['iteration']}; checkpoint: {out['checkpoint']}")
    return 0
