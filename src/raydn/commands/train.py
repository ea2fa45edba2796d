"""``raydn train``: streaming training on one process or many (``torchrun``)."""
from __future__ import annotations

HELP = "train a preset on prepared info records (one process, or many through torchrun)"


def add_arguments(p):
    p.add_argument("--preset", default="tiny_raydn", help="model preset (see `raydn presets`)")
    p.add_argument("--data", required=True, help="train info pickle (from `raydn prepare`)")
    p.add_argument("--dataroot", default=None, help="root for relative image paths in the infos")
    p.add_argument("--out", default="work_dirs/run", help="output folder (checkpoints, logs, config)")
    p.add_argument("--batch-per-gpu", type=int, default=None,
                   help="samples per process (default: the preset's total batch / processes)")
    p.add_argument("--max-iters", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=None, help="reference lr at the preset's total batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--ckpt-interval", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="keep only the newest N iter_*.pt checkpoints (latest.pt always; default: all)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto'")
    p.add_argument("--amp", choices=["fp16", "bf16", "none"], default=None,
                   help="autocast of the image encoder (default: preset on GPU, none on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall-clock budget of the training loop: the speed measured after 20 and 160 "
                        "iterations sets the schedule length (cosine end included, never above "
                        "--max-iters / the recipe) so that training ends in time")
    p.add_argument("--no-ray-dn", action="store_true", help="switch ray denoising off (baseline)")
    p.add_argument("--stem-cache", choices=["auto", "on", "off"], default="auto",
                   help="compute the frozen backbone stem once per frame (auto: when the preset's "
                        "training transform is deterministic, e.g. demo_*)")
    p.add_argument("--query-groups", type=int, default=None, metavar="G",
                   help="Group-DETR training groups of queries (not official; default: the preset's)")


def run(args) -> int:
    from dataclasses import replace

    from raydn.engine.train import TrainOptions, train
    from raydn.errors import RaydnError
    if args.keep_last is not None and args.keep_last < 1:
        raise RaydnError(f"--keep-last must be >= 1 (got {args.keep_last})")
    from raydn.presets import get_preset
    overrides = {}
    if args.no_ray_dn:
        head = get_preset(args.preset).model.head
        overrides["head"] = replace(head, denoising=replace(
            head.denoising, ray=replace(head.denoising.ray, enabled=False)))
    if args.query_groups is not None:
        if args.query_groups < 1:
            raise RaydnError(f"--query-groups must be >= 1 (got {args.query_groups})")
        head = overrides.get("head", get_preset(args.preset).model.head)
        overrides["head"] = replace(head, query_groups=args.query_groups)
    out = train(TrainOptions(
        preset=args.preset, data=args.data, dataroot=args.dataroot, out_dir=args.out,
        batch_per_gpu=args.batch_per_gpu, max_iters=args.max_iters, epochs=args.epochs, lr=args.lr,
        seed=args.seed, workers=args.workers, ckpt_interval=args.ckpt_interval,
        log_interval=args.log_interval, resume=args.resume, amp=args.amp, device=args.device,
        progress=not args.no_progress, model_overrides=overrides, keep_last=args.keep_last,
        stem_cache=args.stem_cache,
        time_budget_s=None if args.time_budget is None else 60.0 * args.time_budget))
    print(f"finished at iteration {out['iteration']}; checkpoint: {out['checkpoint']}")
    return 0
