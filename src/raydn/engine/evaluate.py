"""Evaluate a checkpoint on a split of info records: the sequence ``raydn eval`` and ``raydn demo``
share (one home), in named steps::

    checkpoint -> model (the preset's test transform) -> streaming inference in scene order
      -> nuScenes submission JSON (+ tracking submission) -> the metric (devkit / fast / both)
      -> duplicates along camera rays (+ the tracking metric)

:func:`evaluate_checkpoint` runs them all; its ``say`` callback prints the lines ``raydn eval``
shows (``None``: silent, the demo prints its own report). The pieces (:func:`stream_inference`,
:func:`write_submission`, :func:`evaluate_submission`) live in :mod:`raydn.engine.infer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.infos import load_info_file
from raydn.engine.infer import (
    EvalReport,
    default_eval_set,
    evaluate_submission,
    stream_inference,
    write_submission,
)
from raydn.engine.score import refuse_without_ground_truth
from raydn.engine.tracking import write_tracking_submission
from raydn.eval.ray_duplicates import format_ray_duplicates, ray_duplicates
from raydn.eval.tracking import run_tracking_eval
from raydn.interop.convert import load_model
from raydn.io import atomic_write_json
from raydn.models.decode import apply_bev_nms
from raydn.presets import get_preset

__all__ = ["EvalOptions", "CheckpointEvaluation", "evaluate_checkpoint", "evaluation_dataset"]


@dataclass(frozen=True)
class EvalOptions:
    """What :func:`evaluate_checkpoint` does.

    Attributes:
        dataroot: nuScenes dataroot (the metric's ground truth).
        version: nuScenes version; None = the info file's metadata (else ``v1.0-trainval``).
        eval_set: split to score; None = the version's (``mini_val`` / ``val``).
        evaluator: ``'devkit'``, ``'fast'`` or ``'both'`` (cross-checked).
        plots: the devkit's metric plots.
        nms: decode with the preset's class-wise BEV NMS (when the preset has one).
        score_without_nms: infer NMS-free, apply the preset's NMS on top, and also score the
            NMS-free output (fast evaluator, ``<out>/no_nms``); ray duplicates then count the
            NMS-free output (what ray denoising trains).
        format_only: write the submission(s) only (a split without ground truth).
        tracker: also write ``tracking_results_nusc.json`` with this tracker (``'memory'`` /
            ``'velocity'``) and score it with the tracking metric; None: no tracking.
        birth_score / keep_score: the tracker's thresholds.
        keep_frames: keep the :class:`FrameBatch` of this many evenly spaced frames (pictures).
        num_workers / progress: the inference loader's workers, the progress bar.
        trust_checkpoint: read the checkpoint with full unpickling (files you trust only).
    """
    dataroot: str | Path
    version: str | None = None
    eval_set: str | None = None
    evaluator: str = "devkit"
    plots: bool = True
    nms: bool = True
    score_without_nms: bool = False
    format_only: bool = False
    tracker: str | None = None
    birth_score: float = 0.0
    keep_score: float = 0.0
    keep_frames: int = 0
    num_workers: int = 2
    progress: bool = True
    trust_checkpoint: bool = False


@dataclass
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` produced (rank 0).

    ``detections``: per dataset index, as scored (LiDAR frame, CPU tensors); ``raw_detections``:
    the NMS-free output when it was scored too (``score_without_nms``), else None; ``batches``: the
    kept frames' CPU :class:`FrameBatch` by index; ``report``: the metric (None with
    ``format_only``); ``raw_metrics``: the fast evaluator's summary of the NMS-free output;
    ``ray_duplicates``: :func:`raydn.eval.ray_duplicates.ray_duplicates` (None without GT)."""
    dataset: NuScenesStreamingDataset
    version: str
    detections: list
    raw_detections: list | None
    batches: dict
    submission: Path
    tracking_submission: Path | None = None
    report: EvalReport | None = None
    raw_metrics: dict | None = None
    ray_duplicates: dict | None = None


def _silent(_line: str) -> None:
    pass


def evaluation_dataset(model, info: dict) -> NuScenesStreamingDataset:
    """The loaded info records ``info`` in scene order under the test transform of ``model``'s
    preset (no augmentation, memory reset at every scene start)."""
    aug = get_preset(model.preset).test_transform() if model.preset else None
    return NuScenesStreamingDataset(info, aug, test_mode=True, validate=False)


def evaluate_checkpoint(checkpoint, infos, out_dir, options: EvalOptions, *, device=None,
                        rank: int = 0, world_size: int = 1,
                        say: Callable[[str], None] | None = None) -> CheckpointEvaluation | None:
    """Evaluate ``checkpoint`` (training checkpoint or ``raydn convert`` output) on the info pickle
    ``infos``; outputs under ``out_dir`` (``results_nusc.json``, the metric's files,
    ``ray_duplicates.json``, ...). Under DDP every rank infers its chunk and rank 0 writes and
    scores: other ranks return None. ``say``: where the progress lines go (None: nowhere).
    A test split (no ground truth) without ``format_only`` is refused before any inference."""
    say = say or _silent
    model = load_model(checkpoint, trust=options.trust_checkpoint)
    model = model.to(device if device is not None else "cpu").eval()
    info = load_info_file(infos)
    version = options.version or info.get("metadata", {}).get("version", "v1.0-trainval")
    if not options.format_only:  # the test split has no GT: refuse before inference or any output
        refuse_without_ground_truth(version, options.eval_set, infos)
    dataset = evaluation_dataset(model, info)
    dets, raw, batches = _infer(model, dataset, options, rank=rank, world_size=world_size, say=say)
    if rank != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = CheckpointEvaluation(dataset, version, dets, raw, batches,
                                  write_submission(dets, dataset.infos, out / "results_nusc.json"))
    say(f"submission: {result.submission} ({len(dataset)} samples)")
    if options.tracker is not None:
        result.tracking_submission = _write_tracks(dets, dataset, model, out, options)
        say(f"tracking submission: {result.tracking_submission} (tracker {options.tracker})")
    if options.format_only:
        return result
    _score(result, out, options, say)
    return result


def _infer(model, dataset, options: EvalOptions, *, rank: int, world_size: int, say):
    """Streaming inference -> ``(detections as scored, NMS-free detections or None, kept batches)``."""
    radius = model.cfg.head.nms_radius
    nms = radius is not None and options.nms
    if rank == 0:
        say("decoding: " + ("class-wise BEV NMS (preset setting; --no-nms to skip)" if nms else "NMS-free"))
    keep = None
    if options.keep_frames > 0:
        keep = set(range(0, len(dataset), max(1, len(dataset) // options.keep_frames)))
    if not options.score_without_nms:
        dets, batches = stream_inference(model, dataset, rank=rank, world_size=world_size,
                                         num_workers=options.num_workers, progress=options.progress,
                                         keep_batches=keep, nms=nms,
                                         with_selection=options.tracker == "memory")
        return dets, None, batches
    # NMS-free (the model's own output), then the preset's NMS on top: both are scored
    raw, batches = stream_inference(model, dataset, rank=rank, world_size=world_size,
                                    num_workers=options.num_workers, progress=options.progress,
                                    keep_batches=keep, nms=False)
    dets = [apply_bev_nms(d, radius) for d in raw] if nms else raw
    return dets, raw, batches


def _write_tracks(dets, dataset, model, out: Path, options: EvalOptions) -> Path:
    return write_tracking_submission(dets, dataset.infos, out / "tracking_results_nusc.json",
                                     tracker=options.tracker, head=model.cfg.head,
                                     birth_score=options.birth_score, keep_score=options.keep_score)


def _score(result: CheckpointEvaluation, out: Path, options: EvalOptions, say) -> None:
    """The metric of the submission (and of the NMS-free output), ray duplicates, tracking metric."""
    rep = evaluate_submission(result.submission, dataroot=options.dataroot, version=result.version,
                              eval_set=options.eval_set, out_dir=out, evaluator=options.evaluator,
                              plots=options.plots)
    result.report = rep
    if rep.metrics is not None and rep.fast_metrics is not None:
        d = abs(rep.metrics["nd_score"] - rep.fast_metrics["nd_score"])
        say(f"fast evaluator vs devkit: |dNDS| = {d:.2e} "
            f"(devkit {rep.seconds['devkit']:.1f}s, fast {rep.seconds['fast']:.2f}s)")
    if result.raw_detections is not None and result.raw_detections is not result.detections:
        # the NMS-free output, with the fast evaluator (= the devkit to 1e-6)
        raw_sub = write_submission(result.raw_detections, result.dataset.infos,
                                   out / "no_nms" / "results_nusc.json")
        result.raw_metrics = evaluate_submission(
            raw_sub, dataroot=options.dataroot, version=result.version, eval_set=options.eval_set,
            out_dir=out / "no_nms", evaluator="fast", plots=False, quiet=True).fast_metrics
    if result.dataset.load_annotations:  # duplicates along camera rays (raydn.eval.ray_duplicates)
        scored = result.raw_detections if result.raw_detections is not None else result.detections
        result.ray_duplicates = ray_duplicates(scored, result.dataset.infos)
        say(format_ray_duplicates(result.ray_duplicates))
        atomic_write_json(out / "ray_duplicates.json", result.ray_duplicates, indent=2)
    if result.tracking_submission is not None:
        run_tracking_eval(result.tracking_submission, options.dataroot, result.version,
                          options.eval_set or default_eval_set(result.version), out)
