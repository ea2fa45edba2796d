"""``raydn train --dry-run``: everything a run would do, checked and printed, without training.

:func:`dry_run` constructs the real :class:`raydn.engine.train.Trainer` (``dry_run=True``): the
model is built and initialised (the initialisation report), the info file read into the dataset,
the streaming sampler and the optimizer built, the schedule derived -- the very objects the run
would use, so this summary cannot drift from it. It runs no training step, reads no image (only
their presence is checked, as the run does), fills no stem cache, creates no run folder and writes
nothing. Under torchrun every process builds its part; rank 0 prints.

The summary (:func:`summarise`, a JSON-able dict; :func:`format_summary` prints it): world size,
per-GPU and total batch, iterations, epochs and warm-up; the lr of each optimizer parameter group
at the warm-up start, the peak and the last iteration (:meth:`Trainer.lr_factor_at`, the function
the run sets its lr with), with the group's parameter count and weight decay; AMP dtype, loss
scaling, gradient clipping and checkpointing; the initialisation; the training samples, scenes,
sub-sequences and streaming slots; the parameter counts (total / trainable / frozen).
"""
from __future__ import annotations

import torch

from raydn.engine.distributed import cleanup_distributed, setup_distributed
from raydn.engine.initialisation import format_init
from raydn.engine.train import Trainer
from raydn.models.stem_cache import stem_cache_blocker


def _group_name(params, names: dict) -> str:
    """``'img_backbone'`` / ``'img_neck, img_roi_head, pts_bbox_head'``: the top-level modules of
    a parameter group's tensors (in model order)."""
    tops = []
    for p in params:
        top = names.get(id(p), "?").split(".", 1)[0]
        if top not in tops:
            tops.append(top)
    return ", ".join(tops)


def summarise(trainer) -> dict:
    """The dry-run summary of a constructed :class:`raydn.engine.train.Trainer`."""
    sched, recipe, model = trainer.schedule, trainer.preset.train, trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    last = max(0, sched.max_iters - 1)
    # the peak: the warm-up ramp times the cosine, highest at (or just before) the warm-up's end;
    # the curve only falls after it
    peak_it = max(range(min(sched.warmup_iters, last) + 1), key=trainer.lr_factor_at)
    groups = []
    for g in trainer.optimizer.param_groups:
        groups.append({
            "name": _group_name(g["params"], names), "tensors": len(g["params"]),
            "params": int(sum(p.numel() for p in g["params"])), "weight_decay": g["weight_decay"],
            "base_lr": g["base_lr"],
            "lr_start": g["base_lr"] * trainer.lr_factor_at(0),
            "lr_peak": g["base_lr"] * trainer.lr_factor_at(peak_it),
            "lr_end": g["base_lr"] * trainer.lr_factor_at(last)})
    ds, sampler = trainer.dataset, trainer.sampler
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    amp = model.encoder_autocast
    why = stem_cache_blocker(model, recipe.aug)
    stem = ("off" if trainer.opts.stem_cache == "off" else
            f"on (would cache the frozen stem of {len(ds)} frames)" if why is None else f"off ({why})")
    return {
        "preset": trainer.preset.name, "description": trainer.preset.description,
        "device": str(trainer.dist.device), "world_size": sched.world_size,
        "batch_per_gpu": sched.batch_per_gpu, "total_batch": sched.total_batch_size,
        "recipe_total_batch": sched.reference_total_batch, "reference_lr": sched.reference_lr,
        "iterations": sched.max_iters, "iters_per_epoch": sched.iters_per_epoch,
        "epochs": sched.max_iters / sched.iters_per_epoch, "warmup_iters": sched.warmup_iters,
        "warmup_ratio": recipe.warmup_ratio, "min_lr_ratio": recipe.min_lr_ratio, "peak_iteration": peak_it,
        "param_groups": groups,
        "amp": {torch.float16: "fp16", torch.bfloat16: "bf16", None: "none"}.get(amp, str(amp)),
        "loss_scaling": bool(trainer.scaler.is_enabled()), "grad_clip": recipe.grad_clip,
        "grad_checkpoint": trainer.grad_checkpoint, "stem_cache": stem,
        "samples": len(ds), "scenes": int(len(set(ds.scene_ids.tolist()))),
        "seq_split_num": ds.seq_split_num, "sub_sequences": len(sampler.groups),
        "slots": sampler.num_slots,
        "params_total": int(n_all), "params_trainable": int(n_train),
        "initialisation": {"plan": trainer.init_plan.describe(),
                           "files": [r.as_dict() for r in trainer.init_reports]},
        "checkpoints": {"out_dir": str(trainer.out_dir), "interval": trainer.opts.ckpt_interval,
                        "keep_last": trainer.opts.keep_last},
        "time_budget_s": trainer.opts.time_budget_s,
        "start_iteration": trainer.iteration,
    }


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else str(n)


def format_summary(s: dict, init_text: str = "") -> str:
    """The printed dry-run summary of :func:`summarise` (``init_text``: the initialisation
    report as :func:`raydn.engine.initialisation.format_init` prints it)."""
    lines = [f"dry run: {s['preset']} -- {s['description']}",
             f"  processes   {s['world_size']} on {s['device']} x {s['batch_per_gpu']} per process = total "
             f"batch {s['total_batch']} (recipe {s['recipe_total_batch']} @ lr {s['reference_lr']:g})",
             f"  data        {s['samples']} training samples in {s['scenes']} scenes -> {s['sub_sequences']} "
             f"sub-sequences (seq_split_num {s['seq_split_num']}) walked by {s['slots']} streaming slots",
             f"  schedule    {s['iterations']} iterations = {s['epochs']:.2f} epochs of {s['iters_per_epoch']} "
             f"it; linear warm-up {s['warmup_iters']} it from x{s['warmup_ratio']:.3g}, cosine to "
             f"x{s['min_lr_ratio']:g}" + (f"; starts at iteration {s['start_iteration']} (resumed)"
                                          if s["start_iteration"] else ""),
             "  lr groups   " + "name".ljust(40) + "params   wd        start     "
             + f"peak@{s['peak_iteration']}".ljust(10) + "end"]
    for g in s["param_groups"]:
        lines.append(f"              {g['name'][:39].ljust(40)}{_m(g['params']).ljust(9)}"
                     f"{g['weight_decay']:<10g}{g['lr_start']:<10.3g}{g['lr_peak']:<10.3g}{g['lr_end']:.3g}")
    lines += [f"  precision   encoder autocast {s['amp']}, loss scaling {'on' if s['loss_scaling'] else 'off'}, "
              f"grad clip {s['grad_clip']:g} (L2), gradient checkpointing {'on' if s['grad_checkpoint'] else 'off'}, "
              f"stem cache {s['stem_cache']}",
              f"  parameters  {_m(s['params_total'])} total, {_m(s['params_trainable'])} trainable, "
              f"{_m(s['params_total'] - s['params_trainable'])} frozen",
              f"  output      {s['checkpoints']['out_dir']}: a checkpoint every {s['checkpoints']['interval']} it"
              + (f", the newest {s['checkpoints']['keep_last']} kept" if s['checkpoints']['keep_last'] else "")
              + (f"; time budget {s['time_budget_s'] / 60:g} min" if s["time_budget_s"] else "")]
    if init_text:
        lines += ["  " + line for line in init_text.splitlines()]
    lines.append("dry run: no step run, nothing written")
    return "\n".join(lines)


def dry_run(opts) -> dict:
    """Construct the run of ``opts`` (:class:`raydn.engine.train.TrainOptions`) without training;
    rank 0 prints the summary. Returns the :func:`summarise` dict (every rank)."""
    dist_info = setup_distributed(opts.device, timeout_s=getattr(opts, 'dist_timeout_s', None))
    clean = False
    try:
        trainer = Trainer(opts, dist_info, dry_run=True)
        try:
            summary = summarise(trainer)
            if dist_info.is_main:
                print(format_summary(summary, format_init(trainer.init_plan, trainer.init_reports)), flush=True)
        finally:
            trainer.close()
        clean = True
        return summary
    finally:
        cleanup_distributed(clean)


__all__ = ["dry_run", "format_summary", "summarise"]
