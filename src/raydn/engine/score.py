"""Scoring an existing submission file (``raydn eval --submission FILE --data INFOS --dataroot DIR``).

The info file gives the evaluated samples and the nuScenes version; the submission is checked first
(:func:`raydn.eval.validate_submission.validate_submission`), so that a bad file is refused with a
message naming the sample/record/field and nothing is written; then the devkit and/or the fast
evaluator score it (:func:`raydn.engine.infer.evaluate_submission`).
"""
from __future__ import annotations

import os
from pathlib import Path

from raydn.data.infos import load_info_file
from raydn.engine.infer import evaluate_submission
from raydn.errors import DataError
from raydn.eval.validate_submission import validate_submission


def refuse_without_ground_truth(version: str, eval_set: str | None, infos_path) -> None:
    """The nuScenes test split has no annotations: scoring it is impossible, say what to do instead."""
    if version.endswith("-test") or eval_set == "test":
        raise DataError(f"{infos_path}: {version} (split {eval_set or 'test'}) has no ground-truth annotations, "
                        f"so there is nothing to score; write the submission with --format-only and submit "
                        f"it to the nuScenes evaluation server")


def score_submission_file(submission, *, infos_path, dataroot, version: str | None = None,
                          eval_set: str | None = None, out_dir=None, evaluator: str = "devkit",
                          plots: bool = True):
    """Validate ``submission`` against the samples of ``infos_path`` and score it. Metrics go to
    ``out_dir`` (default: the submission's folder). Returns the :class:`EvalReport`."""
    info = load_info_file(infos_path)
    version = version or info.get("metadata", {}).get("version", "v1.0-trainval")
    refuse_without_ground_truth(version, eval_set, infos_path)
    if not os.path.isdir(os.path.join(os.fspath(dataroot), version)):
        raise DataError(f"{Path(dataroot) / version}: nuScenes tables not found (--dataroot {dataroot}, "
                        f"version {version})")
    validate_submission(submission, [rec["token"] for rec in info["infos"]],
                        ego_translation={rec["token"]: rec["ego2global_translation"] for rec in info["infos"]})
    out = Path(out_dir) if out_dir else Path(submission).resolve().parent
    return evaluate_submission(submission, dataroot=dataroot, version=version, eval_set=eval_set,
                               out_dir=out, evaluator=evaluator, plots=plots)


__all__ = ["refuse_without_ground_truth", "score_submission_file"]
