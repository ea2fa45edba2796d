"""Query ids that persist across frames: which memory row a detection came from.

The streaming head (spec §5.4) decodes Q learnable queries followed by P queries propagated from
the first P rows of its memory (M rows, most recent first). After each frame the top-K queries by
``max_class sigmoid(logit)`` of the last decoder layer are prepended to the memory and the memory
is cut to M rows (:func:`raydn.models.temporal.post_update`).

:class:`QueryIdTracker` mirrors that bookkeeping with integer ids, one per memory row:

* a learnable query (or a propagated query whose memory row is empty, e.g. right after a reset)
  that produces a detection or is written into the memory gets a **new** id (a counter, in
  (batch slot, query) order: deterministic);
* a propagated query carries the id of its memory row, i.e. **the id it had when it was first
  inserted**; re-inserting it keeps that id, so an object followed by the memory keeps one id
  from frame to frame;
* a memory reset (``prev_exists == 0``) empties every row of that slot.

So ids identify memory tracks, not ground-truth objects: the head may also start a new track for
an object it already follows (two ids on one object), as its duplicate removal is learned.

The tracker needs only the last layer's class logits of the non-denoising queries and the head
settings; it reproduces the selections of :func:`raydn.models.decode.decode` and of the memory
update with the same tensor operations, and checks the detections it is given against them
(``RuntimeError`` if they are out of step, instead of wrong ids). Detections and memory rows are
then tied to their queries by the values they copy exactly (box centre, velocity), so a backend
that orders tied scores differently (onnxruntime's top-k; sigmoid scores saturate at 1.0 for
confident detections) still gets every id on the right box.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["QueryIdTracker"]


class QueryIdTracker:
    """Ids of the memory rows of ``batch_size`` streaming slots.

    Args:
        num_query: Q learnable queries; num_propagated: P; memory_len: M; topk: K rows written per
            frame; max_num: decoded detections per sample; post_center_range: the decoder's range
            (6 floats, metres, inclusive) or None; nms_radius: the decoder's per-class BEV NMS
            radii (``HeadConfig.nms_radius``) or None.
    """

    def __init__(self, batch_size: int, *, num_query: int, num_propagated: int, memory_len: int,
                 topk: int, max_num: int, post_center_range=None, nms_radius=None):
        self.B, self.Q, self.P, self.M, self.K = (int(batch_size), int(num_query), int(num_propagated),
                                                  int(memory_len), int(topk))
        self.max_num = int(max_num)
        self.post_center_range = None if post_center_range is None else tuple(float(v) for v in post_center_range)
        self.nms_radius = None if nms_radius is None else tuple(float(v) for v in nms_radius)
        #: (B, M) int64 id of every memory row, -1 = empty
        self.memory_ids = torch.full((self.B, self.M), -1, dtype=torch.long)
        self.next_id = 0
        #: (B, K) query indices written into the memory by the last :meth:`step` (introspection)
        self.last_topk: Tensor | None = None

    @classmethod
    def for_head(cls, cfg, batch_size: int = 1) -> "QueryIdTracker":
        """From a :class:`raydn.config.HeadConfig`."""
        return cls(batch_size, num_query=cfg.num_query, num_propagated=cfg.num_propagated,
                   memory_len=cfg.memory_len, topk=cfg.topk_proposals, max_num=cfg.max_num,
                   post_center_range=cfg.post_center_range, nms_radius=cfg.nms_radius)

    def decoded_queries(self, cls_last: Tensor, bbox_last: Tensor, with_scores: bool = False):
        """Query index (k_b,) int64 of every detection :func:`raydn.models.decode.decode` returns
        for ``cls_last`` (B, Q+P, classes) logits and ``bbox_last`` (B, Q+P, 10) (same top-k over
        the query-major flattened scores, same centre-range filter; the centre is copied unchanged
        by ``denormalize_bbox``, so the filter is exact). ``with_scores``: also the (k_b,) scores."""
        from raydn.models.decode import bev_nms_keep
        B, QP, C = cls_last.shape
        scores, idx = cls_last.sigmoid().reshape(B, QP * C).topk(min(self.max_num, QP * C), dim=1)
        query = torch.div(idx, C, rounding_mode="floor")
        keep = torch.ones_like(query, dtype=torch.bool)
        centre = torch.gather(bbox_last[..., :3], 1, query.unsqueeze(-1).expand(-1, -1, 3))
        if self.post_center_range is not None:
            r = torch.tensor(self.post_center_range, dtype=centre.dtype, device=centre.device)
            keep = (centre >= r[:3]).all(-1) & (centre <= r[3:]).all(-1)
        qs, ss = [query[b][keep[b]].cpu() for b in range(B)], [scores[b][keep[b]].cpu() for b in range(B)]
        if self.nms_radius is not None:  # the decoder's NMS, on the same kept rows (per slot: ragged)
            for b in range(B):
                k = bev_nms_keep(centre[b][keep[b]].cpu(), (idx[b][keep[b]] % C).cpu(), self.nms_radius)
                qs[b], ss[b] = qs[b][k], ss[b][k]
        return (qs, ss) if with_scores else qs

    @staticmethod
    def _resolve(candidate: Tensor, key: Tensor, keys: Tensor) -> Tensor:
        """candidate (k,) query per item; key (k, d) values the item copied exactly from its
        query's row of keys (Q+P, d). Where the candidate's row differs (tied scores ordered
        differently by another top-k implementation, e.g. onnxruntime), take the first query whose
        row equals the item's; the candidate is kept where it matches or nothing does."""
        ok = (keys[candidate] == key).all(-1)
        if bool(ok.all()):
            return candidate
        eq = (key[:, None] == keys[None]).all(-1)                       # (k, Q+P)
        found = eq.any(1)
        return torch.where(ok | ~found, candidate, eq.to(torch.uint8).argmax(1))

    def step(self, prev_exists: Tensor, cls_last: Tensor, bbox_last: Tensor,
             detections: list[dict] | None = None, memory_velo: Tensor | None = None) -> list[Tensor]:
        """Advance one frame; returns the id (k_b,) int64 of every detection of every slot.

        ``prev_exists`` (B,) 0/1; ``cls_last`` / ``bbox_last`` the last decoder layer's
        non-denoising outputs of this frame (B, Q+P, .); ``detections`` (optional) the dicts the
        model returned: checked against the tracker's own selection (count and scores), and each
        detection is tied to the query whose centre it carries (exact copy); ``memory_velo``
        (optional) the first K rows of the new state's ``velo`` (exact copies of the inserted
        queries' velocities): ties the memory rows to their queries the same way. Both make the
        ids independent of how a backend orders tied scores."""
        B, QP = cls_last.shape[:2]
        if B != self.B or QP != self.Q + self.P:
            raise ValueError(f"QueryIdTracker: expected (B={self.B}, Q+P={self.Q + self.P}) queries, "
                             f"got {tuple(cls_last.shape[:2])}")
        cls_last = cls_last.detach().float().cpu()
        bbox_last = bbox_last.detach().float().cpu()
        reset = prev_exists.detach().cpu().reshape(B) == 0
        mem = torch.where(reset[:, None], torch.full_like(self.memory_ids, -1), self.memory_ids)
        ids = torch.cat([torch.full((B, self.Q), -1, dtype=torch.long), mem[:, :self.P]], 1)  # (B, Q+P)

        det_q, det_s = self.decoded_queries(cls_last, bbox_last, with_scores=True)
        if detections is not None:
            for b, (s, d) in enumerate(zip(det_s, detections)):  # per slot: ragged
                got = d["scores"].detach().float().cpu()
                if got.shape != s.shape or not torch.allclose(got, s, rtol=1e-5, atol=1e-6):
                    raise RuntimeError(f"QueryIdTracker: slot {b}: the {len(got)} detections do not match "
                                       f"the {len(s)} decoded queries (decode settings out of step)")
                det_q[b] = self._resolve(det_q[b], d["boxes"][:, :3].detach().float().cpu(), bbox_last[b, :, :3])
        topk = torch.topk(cls_last.sigmoid().amax(dim=-1), self.K, dim=1).indices     # (B, K)
        if memory_velo is not None:
            mv = memory_velo.detach().float().cpu()
            topk = torch.stack([self._resolve(topk[b], mv[b], bbox_last[b, :, -2:]) for b in range(B)])

        need = torch.zeros(B, QP, dtype=torch.bool)
        need.scatter_(1, topk, True)
        for b, q in enumerate(det_q):  # per slot: ragged index lists
            need[b, q] = True
        need &= ids < 0
        n = int(need.sum())
        ids[need] = self.next_id + torch.arange(n, dtype=torch.long)   # row-major: slot, query
        self.next_id += n

        self.memory_ids = torch.cat([torch.gather(ids, 1, topk), mem], 1)[:, :self.M]
        self.last_topk = topk
        return [ids[b, q] for b, q in enumerate(det_q)]
