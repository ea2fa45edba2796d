"""Streaming training loop (one process or many through torchrun/DDP).

The official recipe (spec §10): AdamW with a backbone lr multiplier, per-iteration cosine with
linear warm-up, gradient clipping at 35 (L2), mixed precision only in the image encoder, the loss the
plain sum of all terms. Each batch slot walks its own sub-sequence frame by frame and carries its
temporal memory from iteration to iteration (reset by ``prev_exists``).

Exact resume: the checkpoint stores model, optimiser, scaler, iteration, sampler position, RNG
states and the temporal memory of every slot; data augmentation is seeded per (seed, sample
index, draw number) rather than per worker, so a resumed run continues bit-exactly on CPU.
"""
from __future__ import annotations

import json
import math
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from raydn import run_config, termination
from raydn.core.state import TemporalState
from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.loader import build_train_loader
from raydn.data.validate import check_dataset_images
from raydn.engine import run_files
from raydn.engine.checkpoint import (
    FORMAT,
    atomic_torch_save,
    capture_rng_state,
    restore_rng_state,
    safe_torch_load,
)
from raydn.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_int,
    cleanup_distributed,
    peer_lost_error,
    setup_distributed,
)
from raydn.engine.initialisation import (
    apply_initialisation,
    format_init,
    init_report_json,
    plan_initialisation,
    will_resume,
)
from raydn.engine.schedule import Schedule, derive_schedule, lr_factor
from raydn.errors import CheckpointError, ConfigError, RaydnError
from raydn.io import atomic_write_json, atomic_write_text
from raydn.models.options import RuntimeOptions
from raydn.models.stem_cache import StemCache, stem_cache_blocker
from raydn.presets import Preset, build_model, get_preset


@dataclass
class TrainOptions:
    preset: str = "tiny_raydn"
    data: str = ""                      # train info pickle
    out_dir: str = "work_dirs/run"
    dataroot: str | None = None         # root for relative image paths in the infos
    batch_per_gpu: int | None = None    # default: recipe total batch / world size
    max_iters: int | None = None        # override the epochs of the recipe
    epochs: float | None = None
    lr: float | None = None             # override the recipe's reference lr
    seed: int = 0
    workers: int = 2
    ckpt_interval: int = 500
    log_interval: int = 10
    resume: str | None = None           # a checkpoint path or "auto" (latest in out_dir)
    # initialisation of a fresh run (raydn.engine.initialisation; not applied when resuming):
    # backbone weights (mmdet / torchvision / official detector file), whole-detector weights loaded
    # non-strictly (mmcv load_from), or random weights on purpose (an official preset needs one)
    pretrained: str | None = None
    load_from: str | None = None
    from_scratch: bool = False
    amp: str | None = None              # 'fp16' | 'bf16' | 'none' (default: recipe on GPU, none on CPU)
    device: str | None = None
    # read checkpoint files given to the run (--pretrained / --load-from) with full unpickling
    # (torch.load weights_only=False); only for files you trust (raydn.safe_load)
    trust_checkpoint: bool = False
    grad_checkpoint: bool | None = None
    progress: bool = True
    tensorboard: bool = True
    stop_after: int | None = None       # stop (with a checkpoint) after this many iterations of this run
    # Wall-clock budget (s) of this run's training loop: the speed measured after ``budget_probe``
    # iterations, and again every 8 probes at the recent speed, sets the schedule's length (cosine
    # end included) so that training ends in time -- never longer than the recipe / ``max_iters``.
    # Off by default (the run length then depends on the machine); a resumed run keeps the length.
    time_budget_s: float | None = None
    budget_probe: int = 20
    budget_min_iters: int | None = None  # the time budget never shortens the schedule below this
    model_overrides: dict = field(default_factory=dict)
    # Cache the frozen backbone stem's outputs once per training frame (raydn.models.stem_cache):
    # 'auto' = when the preset's training transform is deterministic and its stem is frozen (the
    # demo presets), 'on' = required (error if impossible), 'off'. Equal results, faster steps.
    stem_cache: str = "auto"
    # flush float32 denormals to zero on CPU (a converging model's tiny activations/gradients are
    # otherwise up to ~10x slower on x86); no effect on values above 1.2e-38
    flush_denormal: bool = True
    keep_last: int | None = None        # keep only the newest N iter_*.pt checkpoints (None: all)
    # seconds a DDP collective waits for the other processes before the run ends with
    # PeerLostError (None: RAYDN_DIST_TIMEOUT, else raydn.engine.distributed.DEFAULT_TIMEOUT_S)
    dist_timeout_s: float | None = None
    # where the configuration came from (``raydn train``: preset, --config file, --set list, flags);
    # recorded with it in the run folder's config.yaml (raydn.run_config)
    config_provenance: dict = field(default_factory=dict)


_jsonable = run_config.to_plain  # dataclasses -> dicts, tuples -> lists (one home: raydn.run_config)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float
                    ) -> torch.optim.Optimizer:
    """AdamW; parameters under ``img_backbone`` get ``lr * backbone_lr_mult`` (official paramwise cfg)."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (backbone if name.startswith("img_backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": lr, "base_lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "base_lr": lr * backbone_lr_mult})
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


class _TrainStep(nn.Module):
    """``forward`` = the detector's training pass, so DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, state, stem=None):
        return self.model.forward_train(batch, state, stem=stem)


def _autocast_dtype(amp: str | None, device: torch.device, recipe: str) -> torch.dtype | None:
    amp = amp if amp is not None else (recipe if device.type == "cuda" else "none")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp]


class Trainer:
    """Holds everything of one run; :meth:`run` trains to the end (or ``stop_after``)."""

    def __init__(self, opts: TrainOptions, dist_info: DistInfo | None = None, dry_run: bool = False):
        """``dry_run``: build everything (model, initialisation, data, sampler, optimizer) but create
        no run folder, fill no stem cache and write nothing (:mod:`raydn.engine.dry_run`)."""

        self._t_created = time.time()  # the time budget counts set-up (stem cache) too
        self.opts = opts
        self.dist = dist_info or setup_distributed(opts.device)
        self.preset: Preset = get_preset(opts.preset)
        recipe = self.preset.train
        self.out_dir = Path(opts.out_dir)
        self.dry_run = bool(dry_run)
        # the initialisation is checked before any work: an official preset without its weights
        # (or --from-scratch) stops here, before the data is read and the run folder exists
        self.init_plan = plan_initialisation(self.preset, opts, will_resume(self.out_dir, opts.resume),
                                             replace(self.preset.model, **opts.model_overrides))

        torch.manual_seed(opts.seed)
        np.random.seed(opts.seed)

        world = self.dist.world_size
        self.batch_per_gpu = opts.batch_per_gpu or max(1, recipe.total_batch_size // world)
        self.dataset = NuScenesStreamingDataset(
            opts.data, recipe.aug, data_root=opts.dataroot, seq_split_num=recipe.seq_split_num,
            seed=opts.seed, load_points=replace(self.preset.model, **opts.model_overrides).depth.enabled)
        # bad data stops here, before the run folder exists: missing or truncated camera images
        check_dataset_images(self.dataset)
        # the run folder: created, locked against a second run (released when this one ends or dies),
        # leftovers of a killed write removed; a failure below leaves no empty folder behind
        self._folder = None if self.dry_run else run_files.open_run_folder(self.out_dir, self.dist.is_main)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        opts, recipe, world = self.opts, self.preset.train, self.dist.world_size
        self.schedule: Schedule = derive_schedule(
            num_train_frames=len(self.dataset), world_size=world, batch_per_gpu=self.batch_per_gpu,
            reference_total_batch=recipe.total_batch_size,
            reference_lr=opts.lr if opts.lr is not None else recipe.lr,
            epochs=opts.epochs if opts.epochs is not None else recipe.epochs,
            reference_warmup_iters=recipe.warmup_iters, max_iters=opts.max_iters)
        # resume: read the checkpoint first, the loader starts at the consumed iteration
        self._resume_ckpt, self._resume_path = self._find_resume(opts.resume)
        self._check_resume_config()  # before anything is loaded or written
        start = int(self._resume_ckpt["iteration"]) if self._resume_ckpt is not None else 0

        # the encoder's autocast is a construction option of the model (RuntimeOptions)
        amp = _autocast_dtype(opts.amp, self.dist.device, recipe.amp)
        model = build_model(self.preset, options=RuntimeOptions(encoder_autocast=amp), **opts.model_overrides)
        self._initialise(model)
        gc = recipe.grad_checkpoint if opts.grad_checkpoint is None else opts.grad_checkpoint
        self.grad_checkpoint = bool(gc)
        _set_grad_checkpointing(model, gc)
        self.model = model.to(self.dist.device).train()
        #: the frozen stem's maps per sample token (raydn.models.stem_cache), or None
        self.stem_cache = None if self.dry_run else self._fill_stem_cache()
        if self.stem_cache is not None:  # the model is fed from the cache: a dataset that decodes nothing
            self.dataset = self.dataset.without_images()
        self.loader = build_train_loader(
            self.dataset, batch_size=self.batch_per_gpu, rank=self.dist.rank, world_size=world,
            seed=opts.seed, num_workers=opts.workers, start_iteration=start, keyed=True)
        self.sampler = self.loader.batch_sampler
        step = _TrainStep(self.model)
        if self.dist.distributed:
            with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers; 2.11 lacks its successor
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                step = nn.parallel.DistributedDataParallel(
                    step, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                    find_unused_parameters=_may_leave_parameters_unused(self.model, self.dataset),
                    broadcast_buffers=False)
        self.step_fn = step
        self.optimizer = build_optimizer(self.model, self.schedule.lr, recipe.weight_decay,
                                         recipe.backbone_lr_mult)
        use_scaler = model.encoder_autocast == torch.float16 and self.dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.iteration = 0
        self.state: TemporalState = self.model.init_state(self.batch_per_gpu, self.dist.device)
        self.history: list[dict] = []
        if self._resume_ckpt is not None:
            self._resume(self._resume_ckpt, self._resume_path)

    def _initialise(self, model) -> None:
        """Load the planned initialisation into ``model`` (nothing when resuming); print the report
        and write it to ``init_report.json`` in the run folder (rank 0)."""
        if self.init_plan.resuming != (self._resume_ckpt is not None):  # 'auto' found nothing usable
            self.init_plan = plan_initialisation(self.preset, self.opts, self._resume_ckpt is not None,
                                                 model.cfg)
        self.init_reports = apply_initialisation(model, self.init_plan)
        if self.dist.is_main and not self.dry_run:  # a dry run prints it in its summary
            print(format_init(self.init_plan, self.init_reports), flush=True)
            if not self.init_plan.resuming:
                atomic_write_json(self.out_dir / "init_report.json",
                                  init_report_json(self.init_plan, self.init_reports), indent=2)

    def lr_factor_at(self, iteration: int) -> float:
        """Multiplier of every group's base lr at ``iteration`` (0-based) of this run's schedule."""
        rc = self.preset.train
        return lr_factor(iteration, self.schedule.max_iters, self.schedule.warmup_iters,
                         rc.warmup_ratio, rc.min_lr_ratio)

    def _fill_stem_cache(self):
        """The filled frozen-stem cache (a :class:`~raydn.models.stem_cache.StemCache`) when
        ``opts.stem_cache`` allows one, else None; ``'on'`` and impossible: :class:`RaydnError`."""
        mode = self.opts.stem_cache
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"TrainOptions.stem_cache: expected 'auto', 'on' or 'off', got {mode!r}")
        if mode == "off":
            return None
        why = stem_cache_blocker(self.model, self.preset.train.aug)
        if why is not None:
            if mode == "on":
                raise RaydnError(f"--stem-cache on: preset {self.preset.name} cannot cache its stem: {why}")
            return None
        t = time.time()
        cache = StemCache().fill(self.model, self.dataset, progress=self.opts.progress and self.dist.is_main)
        if self.dist.is_main:
            print(f"stem cache: {len(cache)} frames, {cache.nbytes() / 2 ** 20:.0f} MiB, "
                  f"{time.time() - t:.1f} s (images are no longer decoded)", flush=True)
        return cache

    def _cached_stem(self, batch):
        """The cached stem maps of ``batch``'s frames (looked up by sample token), or None without
        a stem cache (the model then encodes the batch's images)."""
        if self.stem_cache is None:
            return None
        return self.stem_cache.lookup([m["sample_token"] for m in batch.meta], device=self.dist.device)

    def close(self) -> None:
        """Release the run folder (its lock); :meth:`run` does it when it ends."""
        folder, self._folder = getattr(self, "_folder", None), None
        if folder is not None:
            folder.close()

    # -------------------------------------------------------------- checkpoints
    def checkpoint_path(self, iteration: int | None = None) -> Path:
        return self.out_dir / (f"iter_{iteration:07d}.pt" if iteration is not None else "latest.pt")

    def _rank_path(self, path: Path) -> Path:
        return path.with_name(path.stem + f".rank{self.dist.rank}.pt")

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_path(self.iteration)
        per_rank = {"rng": capture_rng_state(), "temporal_state": self.state.as_dict(),
                    "iteration": self.iteration}
        barrier()
        previous = self.checkpoint_path() if self.checkpoint_path().exists() else None
        if self.dist.is_main:
            ckpt = {"format": FORMAT, "iteration": self.iteration, "preset": self.preset.name,
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(), "schedule": self.schedule.as_dict(),
                    "world_size": self.dist.world_size, "config": json.dumps(_jsonable(self.preset)),
                    "run_config": run_config.dump_yaml(self.run_config),
                    "options": json.dumps(_jsonable(self.opts)), "history": json.dumps(self.history),
                    **per_rank}
            run_files.save_or_explain(lambda: atomic_torch_save(ckpt, path), path, previous)
            run_files.save_or_explain(lambda: atomic_torch_save(ckpt, self.checkpoint_path()),  # latest.pt
                                      self.checkpoint_path(), previous)
            run_files.prune_checkpoints(self.out_dir, self.opts.keep_last, self.dist.world_size)
        else:
            atomic_torch_save(per_rank, self._rank_path(path))
            atomic_torch_save(per_rank, self._rank_path(self.checkpoint_path()))
        barrier()
        return path

    def _find_resume(self, where: str | None):
        if not where:
            return None, None
        # 'auto': the newest complete checkpoint (a corrupt latest.pt falls back to the newest intact
        # iter_*.pt, with a warning); nothing there: a fresh start
        return run_files.find_resume_checkpoint(
            self.out_dir, where, lambda p: safe_torch_load(p, map_location="cpu"),
            warn=lambda m: print(m, flush=True) if self.dist.is_main else None)

    @property
    def run_config(self) -> "run_config.RunConfig":
        """The configuration this run trains (:mod:`raydn.run_config`; what ``config.yaml`` records)."""
        return run_config.from_train_options(self.opts, self.preset)

    def _check_resume_config(self) -> None:
        """A resume continues the run recorded in the checkpoint (else the folder's ``config.yaml``):
        any difference of configuration stops here with the differing keys (:class:`ConfigError`),
        before weights are loaded or a file is written."""
        if self._resume_ckpt is None:
            return
        text, where = self._resume_ckpt.get("run_config"), str(self._resume_path)
        if text is None and (self.out_dir / "config.yaml").is_file():
            where = str(self.out_dir / "config.yaml")
            text = (self.out_dir / "config.yaml").read_text()
        if text is None:
            if self.dist.is_main:
                print(f"warning: {self._resume_path} records no configuration (an older raydn); "
                      "resuming without checking it", flush=True)
            return
        diffs = run_config.differences(run_config.load_run_config(text, where), self.run_config,
                                       ignore=run_config.RESUME_IGNORED)
        if diffs:
            raise ConfigError(run_config.mismatch_message(diffs, where, self.out_dir / "config.yaml"))

    def _resume(self, ckpt: dict, path: Path) -> None:
        """Continue exactly where ``ckpt`` stopped (the sampler was already positioned at its
        iteration: the stream and the augmentation draws are functions of the position)."""
        if ckpt.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a raydn training checkpoint (format "
                                  f"{ckpt.get('format')!r}, expected {FORMAT!r})")
        if ckpt["world_size"] != self.dist.world_size:
            raise CheckpointError(f"{path} was written by {ckpt['world_size']} process(es); resume "
                                  f"with the same number (got {self.dist.world_size})")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.history = json.loads(ckpt.get("history", "[]"))
        saved = int(ckpt.get("schedule", {}).get("max_iters", self.schedule.max_iters))
        if saved < self.schedule.max_iters:  # a time budget shortened the run that wrote it
            self.schedule = replace(self.schedule, max_iters=saved)
        mine = ckpt if self.dist.is_main else safe_torch_load(self._rank_path(path))
        self.state = TemporalState.from_dict(mine["temporal_state"]).to(self.dist.device)
        restore_rng_state(mine["rng"])

    # -------------------------------------------------------------- loop
    def _record_config(self) -> None:
        """Write ``config.yaml`` (the run's configuration, loadable with ``raydn train --config``,
        with its provenance); a resumed run keeps the one its first start wrote."""
        path = self.out_dir / "config.yaml"
        if self._resume_ckpt is not None and path.is_file():
            return
        opts = self.opts
        provenance = run_config.provenance_now({
            **(opts.config_provenance or {"preset": self.preset.name}), "data": opts.data,
            "dataroot": opts.dataroot, "world_size": self.dist.world_size,
            "schedule": self.schedule.as_dict()})
        atomic_write_text(path, run_config.dump_yaml(self.run_config, provenance))

    def _termination_signal(self) -> int | None:
        """The signal that ends the run after this iteration: the one this process received, or
        under DDP any rank's (all ranks stop at the same iteration, so they can save together)."""
        signum = termination.pending() or 0
        if self.dist.distributed:
            flag = all_reduce_mean(torch.tensor(float(signum > 0), device=self.dist.device))
            if float(flag) > 0:
                signum = signum or int(signal.SIGTERM)
        return signum or None

    def _fit_time_budget(self, elapsed: float, rate: float, cap: int) -> None:
        """Fit the schedule into the time budget: ``elapsed`` s spent so far in this run, ``rate``
        s per iteration; at most ``cap`` iterations. All ranks take rank 0's decision."""
        fit = _fitted_iters(self.iteration, float(self.opts.time_budget_s) - elapsed, rate, cap)
        floor = min(cap, int(self.opts.budget_min_iters or 0))
        if fit < floor:  # a slow machine: keep a useful schedule, say how long it will take
            if self.dist.is_main:
                print(f"time budget: {fit} iterations would fit; keeping {floor} (--min-iters), "
                      f"about {(floor - self.iteration) * rate / 60:.1f} more minutes at {rate:.2f} s/it",
                      flush=True)
            fit = floor
        fit = broadcast_int(fit)
        if fit != self.schedule.max_iters:
            if self.dist.is_main:
                print(f"time budget {self.opts.time_budget_s:.0f} s at {rate:.2f} s/it: schedule "
                      f"{self.schedule.max_iters} -> {fit} iterations", flush=True)
            self.schedule = replace(self.schedule, max_iters=fit)

    def _set_lr(self) -> None:
        f = self.lr_factor_at(self.iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f

    def train_step(self, batch) -> dict[str, float]:
        self._set_lr()
        batch = batch.to(self.dist.device)
        losses, self.state = self.step_fn(batch, self.state, self._cached_stem(batch))
        total = sum(v for k, v in losses.items() if "loss" in k)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.preset.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        logged = {k: float(all_reduce_mean(v.detach()).item()) for k, v in losses.items()}
        logged["loss"] = float(all_reduce_mean(total.detach()).item())
        logged["grad_norm"] = float(grad_norm)
        logged["lr"] = self.optimizer.param_groups[0]["lr"]
        return logged

    def run(self) -> dict:
        """Train to the end (or ``stop_after``); returns ``iteration``, ``history``, ``checkpoint``,
        ``schedule``. A SIGTERM / SIGHUP (:mod:`raydn.termination`, installed by the CLI) ends the run
        after the current iteration with a checkpoint (all ranks at the same iteration), then raises
        :class:`~raydn.errors.Terminated`: ``--resume auto`` continues from there."""
        with termination.deferred():
            return self._run()

    def _run(self) -> dict:
        opts = self.opts
        if self._resume_ckpt is not None and self.iteration >= self.schedule.max_iters:
            return self._already_finished()
        log = self._open_run_log() if self.dist.is_main else None
        end = self.schedule.max_iters
        if opts.stop_after is not None:
            end = min(end, self.iteration + opts.stop_after)
        stop_end = end
        it_loader = iter(self.loader)
        flush = bool(opts.flush_denormal and self.dist.device.type == "cpu" and torch.set_flush_denormal(True))
        t0 = time.time()
        budget = (_BudgetProbes(self.iteration, self.schedule.max_iters, opts.budget_probe, t0)
                  if opts.time_budget_s is not None else None)
        saved_at = None
        try:
            while self.iteration < end:
                logged = self.train_step(next(it_loader))
                if budget is not None and budget.due(self.iteration):
                    now = time.time()
                    rate = budget.measure(self.iteration, now)
                    self._fit_time_budget(now - self._t_created, rate, budget.cap)
                    end = min(stop_end, self.schedule.max_iters)
                    if log is not None:
                        log.set_total(self.schedule.max_iters)
                if not math.isfinite(logged["loss"]):
                    raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {logged}")
                self.history.append({"iter": self.iteration, "loss": logged["loss"]})
                if log is not None:
                    log.step(self.iteration, logged, write=(self.iteration % opts.log_interval == 0
                                                            or self.iteration == end), t0=t0)
                if self.iteration % opts.ckpt_interval == 0 or self.iteration == end:
                    self.save_checkpoint()
                    saved_at = self.iteration
                self._stop_on_signal(saved_at)
        finally:
            if flush:
                torch.set_flush_denormal(False)  # the process default
            if log is not None:
                log.close()
            self.close()
        return {"iteration": self.iteration, "history": self.history,
                "checkpoint": str(self.checkpoint_path()), "schedule": self.schedule.as_dict(),
                "is_main": self.dist.is_main}

    def _already_finished(self) -> dict:
        """A resumed run whose schedule is done: say so (rather than "finish" silently), release
        the folder, and return the usual result with ``already_finished``."""
        sched = self.schedule
        if self.dist.is_main:
            print(f"{self.out_dir}: training already finished (iteration {self.iteration} of "
                  f"{sched.max_iters}, {self._resume_path}); nothing to train. A resumed run keeps "
                  "its schedule: to train longer, start a new run in another --out", flush=True)
        self.close()
        return {"iteration": self.iteration, "history": self.history,
                "checkpoint": str(self.checkpoint_path()), "schedule": sched.as_dict(),
                "already_finished": True, "is_main": self.dist.is_main}

    def _open_run_log(self) -> "_RunLog":
        """Rank 0 at the start of the loop: print the schedule, write ``config.yaml`` /
        ``config.json``, open ``log.txt`` (appended), TensorBoard and the progress bar."""
        opts, sched = self.opts, self.schedule
        print(sched.describe(), flush=True)
        self._record_config()
        atomic_write_text(self.out_dir / "config.json", json.dumps(
            {"preset": _jsonable(self.preset), "options": _jsonable(opts),
             "schedule": sched.as_dict()}, indent=2))
        return _RunLog.open(self.out_dir, sched.describe(), total=sched.max_iters, initial=self.iteration,
                            tensorboard=opts.tensorboard, progress=opts.progress)

    def _stop_on_signal(self, saved_at: int | None) -> None:
        """After an iteration: on a SIGTERM / SIGHUP (any rank's), save a checkpoint (unless this
        iteration's is written), say how to continue and raise :class:`~raydn.errors.Terminated`."""
        signum = self._termination_signal()
        if not signum:
            return
        if saved_at != self.iteration:
            self.save_checkpoint()
        if self.dist.is_main:
            print(f"\n{signal.Signals(signum).name}: stopped at iteration {self.iteration}, checkpoint "
                  f"{self.checkpoint_path()} saved; continue with --resume auto", flush=True)
        termination.raise_pending(signum)


class _BudgetProbes:
    """When the time budget (``TrainOptions.time_budget_s``) measures the speed, and the speed it
    measures. A first probe ``probe`` iterations into the run (start-up included, so cautious), a
    second one 7 probes later at the steady speed, which may give iterations back (up to the
    recipe's length; the lr change this causes is negligible that early in the cosine), and every
    8 probes after that (the speed drifts over a run: a demo measured 0.74 s/it at 160 iterations
    and 0.85 s/it later, ending 100 s over its budget). ``cap``: the schedule's length at the start,
    which no fit exceeds."""

    def __init__(self, start: int, max_iters: int, probe: int, t0: float):
        step = 8 * probe
        self.probes = {start + probe} | set(range(start + step, start + max_iters + 1, step))
        self.cap = max_iters
        self._t, self._it = t0, start

    def due(self, iteration: int) -> bool:
        return iteration in self.probes

    def measure(self, iteration: int, now: float) -> float:
        """Seconds per iteration since the previous probe (``now``: the time, s); starts the next
        interval."""
        rate = (now - self._t) / (iteration - self._it)
        self._t, self._it = now, iteration
        return rate


class _RunLog:
    """Rank 0's outputs of the loop: ``log.txt`` (a JSON line every ``log_interval`` iterations),
    TensorBoard scalars (when installed and wanted) and the progress bar."""

    def __init__(self, log_file, writer, bar):
        self.log_file, self.writer, self.bar = log_file, writer, bar

    @classmethod
    def open(cls, out_dir: Path, header: str, *, total: int, initial: int, tensorboard: bool,
             progress: bool) -> "_RunLog":
        log_file = open(out_dir / "log.txt", "a")
        log_file.write(header + "\n")
        writer = bar = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # optional: raydn[train]
                )
                writer = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # tensorboard not installed: plain log only
                writer = None
        if progress:
            bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, smoothing=0.1)
        return cls(log_file, writer, bar)

    def set_total(self, total: int) -> None:
        """The schedule's length changed (time budget)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def step(self, iteration: int, logged: dict, *, write: bool, t0: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.2e}")
        if write:
            line = json.dumps({"iter": iteration, "time": round(time.time() - t0, 2),
                               **{k: round(v, 5) for k, v in logged.items()}})
            self.log_file.write(line + "\n")
            self.log_file.flush()
            if self.writer is not None:
                for k, v in logged.items():
                    self.writer.add_scalar(f"train/{k}", v, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.log_file.close()

def _fitted_iters(done: int, seconds_left: float, rate: float, cap: int) -> int:
    """Schedule length when ``done`` iterations are behind and ``seconds_left`` remain at ``rate``
    s/it: never more than ``cap``, never fewer than ``done``."""
    return int(max(done, min(cap, done + max(0.0, seconds_left) / max(rate, 1e-9))))


def _set_grad_checkpointing(model, enabled: bool) -> None:
    """Switch per-block checkpointing of the backbone and per-layer checkpointing of the decoder."""
    for m in model.modules():
        if hasattr(m, "with_cp"):
            m.with_cp = enabled
    head = getattr(model, "pts_bbox_head", None)
    if head is not None and hasattr(head, "set_checkpointing"):
        head.set_checkpointing(enabled)


def _may_leave_parameters_unused(model, dataset) -> bool:
    """Whether a training step can leave a trainable parameter without a gradient, which DDP must
    then look for after every backward (``find_unused_parameters``; needless, it costs a graph
    traversal per step and a warning). Every detector parameter takes part in every training frame
    -- with boxes or none, first frame or not, with query groups
    (tests/engine/test_multinode.py::test_every_trainable_parameter_takes_part) -- except the
    auxiliary 2D head, which learns only from batches with 2D labels: the dataset gives them when
    it loads annotations with ``with_2d`` and every record has ``bboxes2d``."""
    aux = getattr(model, "img_roi_head", None)
    if aux is None or not any(p.requires_grad for p in aux.parameters()):
        return False
    gives_2d = (dataset.load_annotations and dataset.with_2d and not dataset.test_mode
                and all("bboxes2d" in rec for rec in dataset.infos))
    return not gives_2d


def train(opts: TrainOptions) -> dict:
    """Train ``opts`` in this process (one of many under torchrun/srun); rank 0's result dict.
    A peer process that dies or stalls past ``opts.dist_timeout_s`` ends the run with one
    :class:`raydn.errors.PeerLostError` (the checkpoints written so far stay intact)."""
    dist_info = setup_distributed(opts.device, timeout_s=opts.dist_timeout_s)
    trainer, clean = None, False
    try:
        trainer = Trainer(opts, dist_info)
        result = trainer.run()
        trainer = None  # release DDP and the loader workers before leaving the process group
        clean = True
        return result
    except Exception as e:
        lost = peer_lost_error(e, dist_info.rank, getattr(trainer, "iteration", None))
        if lost is None:
            raise
        trainer = None
        raise lost from None
    finally:
        cleanup_distributed(clean)
