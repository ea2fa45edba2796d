"""The official metric: nuscenes-devkit's ``DetectionEval`` on a result file (the oracle).

Needs the optional dependency ``nuscenes-devkit`` (``pip install raydn[nuscenes]``).
"""
from __future__ import annotations

import os
from typing import Any

from raydn.errors import DataError
from raydn.eval.fast_eval import evaluate, format_summary
from raydn.eval.gt import gt_from_nusc
from raydn.eval.submission import load_results_arrays
from raydn.io import atomic_write_json


def _atomic_json(path: str, obj: Any) -> None:
    atomic_write_json(path, obj, indent=2)


def run_devkit_eval(result_path: str | os.PathLike, dataroot: str | os.PathLike, version: str,
                    eval_set: str, out_dir: str | os.PathLike, plots: bool = True, *,
                    nusc=None, config_name: str = "detection_cvpr_2019", verbose: bool = False,
                    quiet: bool = False) -> dict:
    """Evaluate a nuScenes submission with the official devkit.

    ``result_path``: submission JSON (``meta`` + ``results``, every sample of ``eval_set``);
    ``dataroot`` / ``version`` (e.g. ``v1.0-trainval``) of the dataset, ``eval_set`` a split
    (``val``, ``mini_val``, ...). Writes ``metrics_summary.json`` and ``metrics_details.json``
    (atomically) and, with ``plots``, the devkit's PR/TP curves under ``out_dir/plots``.
    Prints mAP, the five TP errors, NDS and the per-class table (unless ``quiet``).
    ``nusc``: an already loaded ``NuScenes`` to reuse.
    Returns the devkit's metrics summary dict (``nd_score``, ``mean_ap``, ``tp_errors``,
    ``label_aps``, ``label_tp_errors``, ``mean_dist_aps``, ``tp_scores``, ``eval_time``, ``cfg``,
    ``meta``).
    """
    try:
        from nuscenes import NuScenes  # optional: raydn[nuscenes]
        from nuscenes.eval.common.config import config_factory  # optional: raydn[nuscenes]
        from nuscenes.eval.detection.evaluate import DetectionEval  # optional: raydn[nuscenes]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError(f"the official metric needs nuscenes-devkit ({e}); install raydn[nuscenes]") from None

    result_path, out_dir = os.fspath(result_path), os.fspath(out_dir)
    if not os.path.isfile(result_path):
        raise DataError(f"{result_path}: result file not found")
    if nusc is None:
        table_dir = os.path.join(os.fspath(dataroot), version)
        if not os.path.isdir(table_dir):
            raise DataError(f"{table_dir}: nuScenes tables not found (dataroot {dataroot!r}, version {version!r})")
        nusc = NuScenes(version=version, dataroot=os.fspath(dataroot), verbose=verbose)
    os.makedirs(out_dir, exist_ok=True)
    plot_dir = os.path.join(out_dir, "plots")
    had_plots = os.path.isdir(plot_dir)
    try:
        ev = DetectionEval(nusc, config=config_factory(config_name), result_path=result_path,
                           eval_set=eval_set, output_dir=out_dir, verbose=verbose)
    except (AssertionError, KeyError, ValueError) as e:
        if not had_plots and os.path.isdir(plot_dir) and not os.listdir(plot_dir):
            os.rmdir(plot_dir)  # DetectionEval creates it before reading the file: no empty folder left
        raise DataError(f"{result_path}: rejected by the nuScenes devkit: {e}") from None
    metrics, md_list = ev.evaluate()
    if plots:
        ev.render(metrics, md_list)
    elif not had_plots and os.path.isdir(plot_dir) and not os.listdir(plot_dir):
        os.rmdir(plot_dir)
    summary = metrics.serialize()
    summary["meta"] = dict(ev.meta)
    _atomic_json(os.path.join(out_dir, "metrics_summary.json"), summary)
    _atomic_json(os.path.join(out_dir, "metrics_details.json"), md_list.serialize())
    if not quiet:
        print(format_summary(summary))
    return summary


def fast_eval_results_file(result_path: str | os.PathLike, dataroot: str | os.PathLike, version: str,
                           eval_set: str, *, nusc=None):
    """Our vectorised metric on a submission JSON + dataroot: GT loaded once through the devkit
    (``load_gt``, ``add_center_dist`` poses, bike racks), predictions parsed straight into arrays.
    Returns a :class:`~raydn.eval.fast_eval.DetectionResult` equal to :func:`run_devkit_eval`'s
    numbers to float rounding."""
    try:
        from nuscenes import NuScenes  # optional: raydn[nuscenes]
    except ImportError as e:  # pragma: no cover
        raise DataError(f"loading GT from a dataroot needs nuscenes-devkit ({e})") from None
    if nusc is None:
        nusc = NuScenes(version=version, dataroot=os.fspath(dataroot), verbose=False)
    gt, racks, ego = gt_from_nusc(nusc, eval_set)
    return evaluate(gt, load_results_arrays(result_path, ego), racks=racks)
