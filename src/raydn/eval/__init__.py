"""Evaluation: decoded detections -> nuScenes submission (:mod:`~raydn.eval.submission`), the
official devkit metric (:mod:`~raydn.eval.devkit`, needs nuscenes-devkit) and a vectorised
re-implementation of it that agrees to float rounding (:mod:`~raydn.eval.fast_eval`, GT adapters
in :mod:`~raydn.eval.gt`)."""
from raydn.eval.fast_eval import BikeRacks, DetectionResult, EvalArrays, MetricConfig, evaluate, format_summary
from raydn.eval.gt import gt_from_infos, gt_from_nusc
from raydn.eval.submission import build_submission, detections_to_global, load_results_arrays, write_results_json

__all__ = ["BikeRacks", "DetectionResult", "EvalArrays", "MetricConfig", "build_submission",
           "detections_to_global", "evaluate", "format_summary", "gt_from_infos", "gt_from_nusc",
           "load_results_arrays", "write_results_json"]
