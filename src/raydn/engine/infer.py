"""Streaming inference in scene order and evaluation with the nuScenes metric (``raydn eval``;
``raydn infer`` -- detections as JSON lines, pictures, video, own cameras -- is
:mod:`raydn.engine.stream`).

The official test loop (spec §2.6, §3.3): batch 1, every scene in time order, the temporal memory
reset at each new scene (``prev_exists`` = 0; here also at the first frame of a rank's chunk under
DDP), NMS-free decoding, LiDAR -> ego -> global conversion with the class-range filter and the
official attribute rules, then the devkit's ``detection_cvpr_2019`` evaluation (or our fast
evaluator, equal to the devkit to float rounding).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from raydn.data.loader import build_eval_loader
from raydn.engine.distributed import is_dist
from raydn.errors import DataError
from raydn.eval.devkit import fast_eval_results_file, run_devkit_eval
from raydn.eval.fast_eval import format_summary
from raydn.eval.submission import build_submission, write_results_json


@torch.no_grad()
def stream_inference(model, dataset, *, device=None, rank: int = 0, world_size: int = 1,
                     num_workers: int = 2, progress: bool = True, limit: int | None = None,
                     keep_batches: set | None = None, nms: bool = True,
                     with_selection: bool = False) -> tuple[list[dict | None], dict]:
    """Run ``model.predict`` over ``dataset`` in scene order (``nms=False``: without the preset's
    BEV NMS, see :meth:`raydn.models.detector.RayDNDetector.predict`).

    Returns ``(detections, batches)``: ``detections[i]`` for dataset index ``i`` (dict with CPU
    tensors ``boxes`` (k, 9) LiDAR frame gravity centre, ``scores``, ``labels``) — gathered from
    every rank onto every rank under DDP — and the CPU ``FrameBatch`` of the indices in
    ``keep_batches`` (for rendering). ``limit`` stops after that many frames (per rank).
    ``with_selection``: each dict also has ``query`` (k,) (always there), ``memory_index`` (K,)
    (the model's :class:`~raydn.models.decode.Selection`) and ``new_sequence`` (a bool: the memory
    was reset at this frame, a scene or rank-chunk start) -- what the memory tracker follows."""

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    loader = build_eval_loader(dataset, num_workers=num_workers, rank=rank, world_size=world_size)
    state = model.init_state(1, device)
    mine: list[tuple[int, dict]] = []
    batches = {}
    bar = None
    if progress and rank == 0:
        bar = tqdm(total=len(loader) if limit is None else min(limit, len(loader)), desc="inference",
                   dynamic_ncols=True)
    for n, batch in enumerate(loader):
        if limit is not None and n >= limit:
            break
        idx = int(batch.meta[0]["index"])
        if with_selection:
            dets, state, sel = model.predict(batch.to(device), state, nms=nms, with_selection=True)
            dets[0].update(memory_index=sel.memory_index[0], new_sequence=bool(batch.prev_exists[0] == 0))
        else:
            dets, state = model.predict(batch.to(device), state, nms=nms)
        mine.append((idx, {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in dets[0].items()}))
        if keep_batches and idx in keep_batches:
            batches[idx] = batch
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    results: list[dict | None] = [None] * len(dataset)
    if world_size > 1 and is_dist():
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, mine)
        pairs = [p for part in gathered for p in part]
    else:
        pairs = mine
    for idx, det in pairs:  # padded duplicates (repeated last frame) give equal results
        results[idx] = det
    return results, batches


def default_eval_set(version: str) -> str:
    return {"v1.0-mini": "mini_val", "v1.0-trainval": "val", "v1.0-test": "test"}.get(version, "val")


@dataclass
class EvalReport:
    result_path: Path
    metrics: dict | None
    fast_metrics: dict | None
    seconds: dict


def write_submission(detections, infos, path) -> Path:
    """Detections (aligned with ``infos``) -> nuScenes submission JSON (atomic)."""
    missing = [i for i, d in enumerate(detections) if d is None]
    if missing:
        raise DataError(f"no detections for {len(missing)} samples (first: index {missing[0]})")
    results = build_submission(detections, infos)
    meta = dict(use_camera=True, use_lidar=False, use_radar=False, use_map=False, use_external=True)
    write_results_json(path, results, meta)
    return Path(path)


def evaluate_submission(result_path, *, dataroot, version: str, eval_set: str | None, out_dir,
                        evaluator: str = "devkit", plots: bool = True, quiet: bool = False) -> EvalReport:
    """Score a submission with the devkit (``evaluator='devkit'``), our fast evaluator
    (``'fast'``) or both (``'both'``; the fast numbers are then checked against the devkit's)."""
    eval_set = eval_set or default_eval_set(version)
    out_dir = Path(out_dir)
    seconds: dict = {}
    metrics = fast = None
    nusc = None
    if evaluator in ("devkit", "both", "fast"):
        from nuscenes import NuScenes  # optional: raydn[nuscenes]
        t = time.time()
        nusc = NuScenes(version=version, dataroot=os.fspath(dataroot), verbose=False)
        seconds["load_tables"] = time.time() - t
    if evaluator in ("devkit", "both"):
        t = time.time()
        metrics = run_devkit_eval(result_path, dataroot, version, eval_set, out_dir, plots=plots,
                                  nusc=nusc, quiet=quiet)
        seconds["devkit"] = time.time() - t
    if evaluator in ("fast", "both"):
        t = time.time()
        res = fast_eval_results_file(result_path, dataroot, version, eval_set, nusc=nusc)
        seconds["fast"] = time.time() - t
        fast = res.summary if hasattr(res, "summary") else dict(res)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fast_metrics_summary.json").write_text(json.dumps(fast, indent=2))
        if not quiet and metrics is None:
            print(format_summary(fast))
    return EvalReport(Path(result_path), metrics, fast, seconds)
