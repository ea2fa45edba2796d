"""Overfit check: can the detector memorise a handful of frames?

A correct detector with exact calibration must fit a few frames of one scene almost perfectly:
train it on ``frames`` consecutive frames of one scene (the real training loop, streaming memory
included) until the loss flattens, then score **those same frames** with the nuScenes metric
(:func:`raydn.eval.fast_eval.evaluate`, equal to the devkit). A failure points at a bug in the
geometry (reference points, positional encodings, ``lidar2img`` of the resized input), the box
encoding or the memory -- not at the learning speed.

``python benchmarks/bench_overfit.py`` runs the full check; ``tests/engine/test_overfit.py`` a
reduced version.
"""
from __future__ import annotations

import pickle
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.infos import load_info_file
from raydn.engine.infer import stream_inference
from raydn.engine.train import TrainOptions, Trainer
from raydn.eval.fast_eval import evaluate, greedy_match
from raydn.eval.gt import gt_from_infos
from raydn.eval.submission import detections_to_global


@dataclass
class OverfitResult:
    mAP: float
    NDS: float
    mATE: float
    median_centre_error: float     # metres, predictions matched to a GT box within 2 m (best score first)
    loss_first: float              # mean training loss of the first / last 10 % of the iterations
    loss_last: float
    iterations: int
    frames: int
    gt_boxes: int
    summary: dict

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("mAP", "NDS", "mATE", "median_centre_error", "loss_first",
                                           "loss_last", "iterations", "frames", "gt_boxes")}
        d["per_class_AP"] = self.summary.get("mean_dist_aps")
        d["tp_errors"] = self.summary.get("tp_errors")
        return d


def select_frames(infos: list[dict], frames: int, scene: int = 0) -> list[dict]:
    """The first ``frames`` records (time order) of the ``scene``-th scene (order of first appearance)."""
    recs = sorted(infos, key=lambda r: float(r["timestamp"]))
    scenes = list(dict.fromkeys(r["scene_token"] for r in recs))
    if not 0 <= scene < len(scenes):
        raise ValueError(f"scene index {scene} out of range: the infos hold {len(scenes)} scenes")
    chosen = [r for r in recs if r["scene_token"] == scenes[scene]][:frames]
    if len(chosen) < frames:
        raise ValueError(f"scene {scene} has only {len(chosen)} frames (asked for {frames})")
    return chosen


def score_frames(model, records: list[dict], aug, *, data_root=None, workers: int = 0) -> dict:
    """Streaming inference over ``records`` (one scene, time order) + the nuScenes metric on them.

    Returns the metric summary plus ``median_centre_error`` (m) of the predictions the 2 m
    threshold matches to a GT box."""

    ds = NuScenesStreamingDataset(records, replace(aug, training=False), data_root=data_root,
                                  test_mode=True)
    dets, _ = stream_inference(model, ds, num_workers=workers, progress=False)
    gt, racks, _ = gt_from_infos(ds.infos)
    pred = detections_to_global(dets, ds.infos).to_eval_arrays()
    res = evaluate(gt, pred, racks=racks)
    summary = dict(res.summary)
    m = greedy_match(gt, pred, [2.0])[:, 0]
    hit = m >= 0
    err = np.linalg.norm(pred.translation[hit, :2] - gt.translation[m[hit], :2], axis=1)
    summary["median_centre_error"] = float(np.median(err)) if err.size else float("nan")
    summary["gt_boxes"] = int(len(gt))
    return summary


def overfit_check(infos_path, *, preset: str = "demo_raydn", frames: int = 6, scene: int = 0,
                  iters: int = 600, lr: float | None = None, seed: int = 0, workers: int = 0,
                  data_root=None, out_dir=None, progress: bool = False,
                  model_overrides: dict | None = None) -> OverfitResult:
    """Train ``preset`` on ``frames`` frames of one scene of ``infos_path`` for ``iters``
    iterations (the normal :class:`~raydn.engine.train.Trainer`, batch 2 = two sub-sequences of
    the frames), then score the same frames. ``out_dir``: where the run folder goes (default a
    temporary folder, removed afterwards)."""

    recs = select_frames(load_info_file(infos_path)["infos"], frames, scene)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        sub = run_dir / "overfit_infos.pkl"
        with open(sub, "wb") as f:
            pickle.dump({"infos": recs, "metadata": {"version": "overfit"}}, f)
        opts = TrainOptions(preset=preset, data=str(sub), out_dir=str(run_dir / "train"),
                            max_iters=iters, lr=lr, seed=seed, workers=workers,
                            ckpt_interval=10 ** 9, log_interval=50, progress=progress, device="cpu",
                            tensorboard=False, dataroot=data_root,
                            model_overrides=dict(model_overrides or {}))
        trainer = Trainer(opts)
        result = trainer.run()
        losses = np.array([h["loss"] for h in result["history"]])
        k = max(1, len(losses) // 10)
        summary = score_frames(trainer.model.eval(), recs, trainer.preset.train.aug,
                               data_root=data_root, workers=workers)
    return OverfitResult(mAP=float(summary["mean_ap"]), NDS=float(summary["nd_score"]),
                         mATE=float(summary["tp_errors"]["trans_err"]),
                         median_centre_error=summary["median_centre_error"],
                         loss_first=float(losses[:k].mean()), loss_last=float(losses[-k:].mean()),
                         iterations=int(result["iteration"]), frames=len(recs),
                         gt_boxes=summary["gt_boxes"], summary=summary)
