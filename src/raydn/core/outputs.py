"""The model's typed outputs shared by the engine, the trackers and the deployment runtime.

The head's per-frame output dict (``all_cls_scores``, ``all_bbox_preds``, ``memory_index``, ...) stays a
dict (the parity tests read it as the official code's); what leaves the model as a value is typed here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Selection"]


@dataclass(frozen=True)
class Selection:
    """The queries one frame of the head selected, as indices into its Q + P non-denoising
    queries (learnable queries first, then the P propagated memory rows): the single record of
    both selections, which the query ids and the ``memory`` tracker follow
    (:mod:`raydn.engine.tracking`).

    ``decode_index``: one (k_b,) int64 tensor per sample, the query of every decoded detection
    (the ``query`` entry of :func:`raydn.models.decode.decode_single`'s dict, same order as the detections);
    ``memory_index``: (B, K) int64, the queries written into the memory, in the order of the new
    state's first K rows (:func:`raydn.models.temporal.post_update_selected`)."""
    decode_index: tuple
    memory_index: Tensor

    @classmethod
    def of(cls, detections: list[dict], memory_index: Tensor) -> "Selection":
        """From :func:`raydn.models.decode.decode`'s per-sample dicts and the head's ``memory_index`` output."""
        return cls(tuple(d["query"].detach().cpu().long() for d in detections),
                   memory_index.detach().cpu().long())
