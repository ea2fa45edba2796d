"""3D multi-object tracking on the streaming detector's output: two trackers, one interface.

Both trackers see one stream (one camera rig, batch 1) frame by frame as :class:`TrackFrame` and
return one track id per detection (``-1``: the detection is not part of a track this frame).
Choose with ``--tracker memory|velocity`` wherever tracks are produced (``raydn infer``,
``raydn eval --tracking``); :func:`build_tracker` makes either.

``memory`` (default, :class:`MemoryTracker`) -- **a track is a memory query.** The head
(spec §5.4) decodes Q learnable queries followed by P queries propagated from the first P rows of
its memory (M rows, most recent first); after each frame the top-K queries are prepended to the
memory, which is cut to M rows. The model returns both selections it made
(:class:`raydn.models.decode.Selection`: the query of every decoded detection, the K queries
written into the memory), and the ids follow them -- no second implementation of either:

* every memory row carries an id; a learnable query (or a propagated query whose row is empty,
  e.g. after a reset) that produces a detection or is written into the memory gets a **new** id
  (a counter, in query order: deterministic);
* a propagated query carries its row's id, and re-inserting it keeps that id: an object the
  memory follows keeps one id from frame to frame (**survival**);
* **birth**: a memory id becomes a track (is reported) at its first detection with
  ``score >= birth_score``; **keeping**: once born, its detections with ``score >= keep_score``
  are reported with the id (below: not reported this frame, the track lives on in the memory, an
  occlusion gap); **death**: the id leaves the memory (not re-inserted, cut at M rows) or the
  memory is reset (new sequence). Defaults 0.0 / 0.0: every detection carries its query's id.

  Ids identify memory queries, not objects: the head may start a second query on an object it
  already follows (its duplicate removal is learned), and one query decoded in two classes gives
  two detections with one id (never two in one class).

``velocity`` (:class:`VelocityTracker`) -- CenterPoint's greedy tracker (T. Yin et al., CVPR 2021,
``tools/nusc_tracking/pub_tracker.py``), the baseline StreamPETR users run on detection files:
each detection is moved back by its predicted velocity (``centre - v * dt``, global frame) and
matched greedily, in descending score order, to the nearest live track of the same class within
the class's distance gate (:data:`CENTERPOINT_MAX_DIST`, metres, CenterPoint's nuScenes values);
unmatched detections start tracks; an unmatched track coasts (moved by its velocity) and is kept
while it has missed fewer than ``max_age`` frames (default 3, CenterPoint's ``pub_test.py``).
Only the seven nuScenes tracking classes are tracked (others: -1).
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from raydn.errors import DataError, RaydnError
from raydn.eval.constants import DETECTION_NAMES, SUBMISSION_META
from raydn.eval.submission import as_numpy, detections_to_global, write_results_json
from raydn.eval.tracking import build_tracking_submission, stream_flags
from raydn.geometry import CLASS_NAMES

__all__ = ["TRACKERS", "CENTERPOINT_MAX_DIST", "TrackFrame", "MemoryTracker",
           "VelocityTracker", "build_tracker", "greedy_assignment", "track_detections",
           "write_tracking_submission"]

#: ``--tracker`` choices (the first is the default).
TRACKERS = ("memory", "velocity")

#: CenterPoint's class-aware distance gates, metres (``NUSCENE_CLS_VELOCITY_ERROR`` of
#: tianweiy/CenterPoint ``tools/nusc_tracking/pub_tracker.py``: the 99.9th percentile of the velocity
#: error per class over 0.5 s).
CENTERPOINT_MAX_DIST = {"car": 4.0, "truck": 4.0, "bus": 5.5, "trailer": 3.0, "pedestrian": 1.0,
                        "motorcycle": 13.0, "bicycle": 3.0}


@dataclass
class TrackFrame:
    """One frame of one stream, as the trackers see it (k detections, descending score).

    ``new_sequence``: the memory was reset (first frame of a scene / stream); ``timestamp``
    seconds; ``labels`` (k,) int64 into ``class_names``; ``scores`` (k,); ``centres`` (k, 2) and
    ``velocity`` (k, 2) in the global (world) frame, metres and m/s; ``decode_index`` (k,) /
    ``memory_index`` (K,) int64: the model's :class:`~raydn.models.decode.Selection` of this frame
    (needed by the memory tracker only)."""
    new_sequence: bool
    timestamp: float
    labels: np.ndarray
    scores: np.ndarray
    centres: np.ndarray | None = None
    velocity: np.ndarray | None = None
    decode_index: np.ndarray | None = None
    memory_index: np.ndarray | None = None


class MemoryTracker:
    """Tracks = memory queries (see the module docstring). One stream.

    Args: num_query Q, num_propagated P, memory_len M (:class:`raydn.config.HeadConfig`);
    birth_score / keep_score: score thresholds for starting / keeping reporting a track."""

    name = "memory"

    def __init__(self, *, num_query: int, num_propagated: int, memory_len: int,
                 birth_score: float = 0.0, keep_score: float = 0.0):
        self.Q, self.P, self.M = int(num_query), int(num_propagated), int(memory_len)
        self.birth_score, self.keep_score = float(birth_score), float(keep_score)
        #: (M,) int64 id of every memory row (-1: empty) and whether that id is a born track
        self.memory_ids = np.full(self.M, -1, dtype=np.int64)
        self.memory_born = np.zeros(self.M, dtype=bool)
        self.next_id = 0

    @classmethod
    def for_head(cls, head, **kwargs) -> "MemoryTracker":
        """From a :class:`raydn.config.HeadConfig` (or a mapping with its sizes, e.g. an export's
        metadata)."""
        get = head.get if isinstance(head, Mapping) else lambda k: getattr(head, k)
        return cls(num_query=get("num_query"), num_propagated=get("num_propagated"),
                   memory_len=get("memory_len"), **kwargs)

    def step(self, frame: TrackFrame) -> np.ndarray:
        """Advance one frame -> (k,) int64 track id of every detection (-1: not reported)."""
        if frame.decode_index is None or frame.memory_index is None:
            raise ValueError("MemoryTracker: the frame has no model selection (decode_index / memory_index); "
                             "this backend cannot report memory tracks (use the velocity tracker)")
        dq = as_numpy(frame.decode_index, np.int64).reshape(-1)
        mq = as_numpy(frame.memory_index, np.int64).reshape(-1)
        QP = self.Q + self.P
        if (dq.size and (dq.min() < 0 or dq.max() >= QP)) or (mq.size and (mq.min() < 0 or mq.max() >= QP)):
            raise ValueError(f"MemoryTracker: query index outside 0..{QP - 1} (head sizes out of step)")
        mem_ids, mem_born = self.memory_ids, self.memory_born
        if frame.new_sequence:
            mem_ids, mem_born = np.full_like(mem_ids, -1), np.zeros_like(mem_born)
        ids = np.concatenate([np.full(self.Q, -1, np.int64), mem_ids[:self.P]])     # (Q+P,)
        born = np.concatenate([np.zeros(self.Q, bool), mem_born[:self.P]])
        need = np.zeros(QP, dtype=bool)
        need[mq] = True
        need[dq] = True
        need &= ids < 0
        new = np.flatnonzero(need)                                                   # query order
        ids[new] = self.next_id + np.arange(len(new), dtype=np.int64)
        self.next_id += len(new)
        s = as_numpy(frame.scores, np.float64).reshape(-1)
        report = (s >= self.birth_score) | (born[dq] & (s >= self.keep_score))
        out = np.where(report, ids[dq], -1)
        born[dq[report]] = True
        self.memory_ids = np.concatenate([ids[mq], mem_ids])[:self.M]
        self.memory_born = np.concatenate([born[mq], mem_born])[:self.M]
        return out


def greedy_assignment(dist: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """CenterPoint's greedy matching: rows (detections) in order, each takes its nearest still
    free valid column (track). dist/valid (N, M) -> (N,) int64 matched column, -1 = none."""
    N, M = dist.shape
    match = np.full(N, -1, dtype=np.int64)
    if M == 0:
        return match
    d = np.where(valid, dist, np.inf)
    for i in range(N):  # greedy over the distance matrix: one argmin per detection
        j = int(np.argmin(d[i]))
        if np.isfinite(d[i, j]):
            match[i] = j
            d[:, j] = np.inf
    return match


class VelocityTracker:
    """CenterPoint-style greedy tracker by predicted position (see the module docstring). One stream.

    ``class_names``: the model's classes (labels index them); ``max_dist``: gate per tracking class,
    metres (classes without one are not tracked); ``max_age``: frames a lost track is kept
    (CenterPoint's semantics: after ``max_age`` consecutive misses it is dropped, so an object seen
    again after up to ``max_age - 1`` missed frames keeps its id); ``min_score``: detections below it
    are not tracked."""

    name = "velocity"

    def __init__(self, class_names: Sequence[str] = CLASS_NAMES, *,
                 max_dist: Mapping[str, float] = CENTERPOINT_MAX_DIST, max_age: int = 3,
                 min_score: float = 0.0):
        self.class_names = tuple(class_names)
        self.gate = np.array([float(max_dist.get(c, np.nan)) for c in self.class_names])
        self.max_age, self.min_score = int(max_age), float(min_score)
        self.next_id = 0
        self.reset()

    def reset(self) -> None:
        """Forget every track (new sequence)."""
        self.ct = np.zeros((0, 2))
        self.vel = np.zeros((0, 2))
        self.label = np.zeros(0, np.int64)
        self.ids = np.zeros(0, np.int64)
        self.age = np.zeros(0, np.int64)
        self.last_time: float | None = None

    def step(self, frame: TrackFrame) -> np.ndarray:
        """Advance one frame -> (k,) int64 track id of every detection (-1: not tracked)."""
        if frame.new_sequence:
            self.reset()
        lab = as_numpy(frame.labels, np.int64).reshape(-1)
        s = as_numpy(frame.scores, np.float64).reshape(-1)
        k = lab.shape[0]
        c = as_numpy(frame.centres, np.float64).reshape(k, 2)
        v = np.nan_to_num(as_numpy(frame.velocity, np.float64).reshape(k, 2))
        dt = 0.0 if self.last_time is None else float(frame.timestamp) - self.last_time
        self.last_time = float(frame.timestamp)
        gate = self.gate[lab] if k else np.zeros(0)
        cand = np.flatnonzero(np.isfinite(gate) & (s >= self.min_score))
        cand = cand[np.argsort(-s[cand], kind="stable")]       # greedy in descending score order
        back = c[cand] - v[cand] * dt                         # where each detection was at the last frame
        dist = np.linalg.norm(back[:, None, :] - self.ct[None, :, :], axis=-1)       # (n, tracks)
        valid = (dist <= gate[cand][:, None]) & (lab[cand][:, None] == self.label[None, :])
        match = greedy_assignment(dist, valid)
        out = np.full(k, -1, dtype=np.int64)
        hit = match >= 0
        out[cand[hit]] = self.ids[match[hit]]
        fresh = cand[~hit]
        out[fresh] = self.next_id + np.arange(len(fresh), dtype=np.int64)
        self.next_id += len(fresh)
        # lost tracks coast with their velocity while younger than max_age
        lost = np.ones(len(self.ids), dtype=bool)
        lost[match[hit]] = False
        lost &= self.age < self.max_age
        self.ct = np.concatenate([c[cand], self.ct[lost] + self.vel[lost] * dt])
        self.vel = np.concatenate([v[cand], self.vel[lost]])
        self.label = np.concatenate([lab[cand], self.label[lost]])
        self.ids = np.concatenate([out[cand], self.ids[lost]])
        self.age = np.concatenate([np.ones(len(cand), np.int64), self.age[lost] + 1])
        return out


def build_tracker(kind: str, *, head=None, class_names: Sequence[str] = CLASS_NAMES,
                  birth_score: float = 0.0, keep_score: float = 0.0, max_age: int = 3):
    """``'memory'`` (needs ``head``: a HeadConfig or a mapping with num_query / num_propagated /
    memory_len) or ``'velocity'``."""
    if kind == "memory":
        if head is None:
            raise ValueError("build_tracker('memory') needs the head's sizes")
        return MemoryTracker.for_head(head, birth_score=birth_score, keep_score=keep_score)
    if kind == "velocity":
        return VelocityTracker(class_names, max_age=max_age, min_score=keep_score)
    raise RaydnError(f"unknown tracker {kind!r}; expected one of {', '.join(TRACKERS)}")


# ------------------------------------------------ trackers over a detection file (nuScenes samples)

#: no class-range filter: the devkit's tracking evaluation applies the class ranges to the tracks itself
_NO_RANGE = {c: math.inf for c in DETECTION_NAMES}


def track_detections(detections: Sequence[Mapping], infos: Sequence[Mapping], *, tracker: str,
                     timestamps: Sequence[float], new_sequence: Sequence[bool], head=None,
                     birth_score: float = 0.0, keep_score: float = 0.0, max_age: int = 3):
    """Run ``tracker`` (``'memory'`` / ``'velocity'``) over the frames of one or more streams.

    ``detections[i]`` / ``infos[i]``: frame i in time order (as for
    :func:`raydn.eval.submission.detections_to_global`); the memory tracker also needs each frame's
    ``query`` (k,) and ``memory_index`` (K,) (``stream_inference(..., with_selection=True)``) and
    ``head`` (HeadConfig or its sizes); ``timestamps`` seconds; ``new_sequence[i]``: the memory was
    reset at frame i (a scene start). Returns ``(global_detections, ids)``: the
    :class:`~raydn.eval.submission.GlobalDetections` of every detection (no range filter, input
    order) and their (N,) int64 track ids (-1: not reported)."""
    if not (len(detections) == len(infos) == len(timestamps) == len(new_sequence)):
        raise DataError(f"track_detections: {len(detections)} detection sets, {len(infos)} infos, "
                        f"{len(timestamps)} timestamps, {len(new_sequence)} sequence flags")
    g = detections_to_global(detections, infos, class_range=_NO_RANGE)
    trk = build_tracker(tracker, head=head, birth_score=birth_score, keep_score=keep_score, max_age=max_age)
    ids = np.full(len(g.sample_idx), -1, dtype=np.int64)
    bounds = np.searchsorted(g.sample_idx, np.arange(len(infos) + 1))
    lut = np.array([CLASS_NAMES.index(n) for n in DETECTION_NAMES])   # devkit order -> model labels
    for i, det in enumerate(detections):  # per frame, in time order: a tracker is sequential
        a, b = bounds[i], bounds[i + 1]
        ids[a:b] = trk.step(TrackFrame(
            bool(new_sequence[i]), float(timestamps[i]), lut[g.label[a:b]], g.score[a:b],
            g.translation[a:b, :2], g.velocity[a:b],
            det.get("query"), det.get("memory_index")))
    return g, ids


def track_stream(detections: Sequence[Mapping], infos: Sequence[Mapping], *, tracker: str, head=None,
                 **kwargs):
    """:func:`track_detections` with the frame times and sequence starts of the stream
    (:func:`raydn.eval.tracking.stream_flags`) -> ``(global_detections, ids)``."""
    ts, new = stream_flags(detections, infos)
    return track_detections(detections, infos, tracker=tracker, timestamps=ts, new_sequence=new,
                            head=head, **kwargs)


def save_tracking_submission(g, ids: np.ndarray, path) -> Path:
    """Write the tracking submission JSON of :func:`track_detections`'s output (atomic). Returns the path."""
    write_results_json(path, build_tracking_submission(g, ids), dict(SUBMISSION_META))
    return Path(path)


def write_tracking_submission(detections: Sequence[Mapping], infos: Sequence[Mapping], path, *,
                              tracker: str, head=None, **kwargs) -> Path:
    """Track (:func:`track_stream`) and write the tracking submission JSON (atomic). Returns the path."""
    g, ids = track_stream(detections, infos, tracker=tracker, head=head, **kwargs)
    return save_tracking_submission(g, ids, path)
