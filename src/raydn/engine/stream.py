"""``raydn infer``: streaming inference of a trained model over a nuScenes dataroot (real or
synthetic) or over your own cameras, written as JSON lines, pictures and an MP4 video.

Frames come as :class:`~raydn.data.frames.FrameInputs` from
:class:`~raydn.data.dataset.NuScenesStreamingDataset` (test transform, scenes in time order,
memory reset at every scene start) or :class:`~raydn.data.own_cameras.CameraRigFrames` (memory reset
at the first frame), one frame per step (batch 1), through the same :func:`collate_frames`.

Output, one JSON object per line and frame (``--out``, written to a temporary file and renamed at
the end: an interrupted or failed run leaves no partial file)::

    {"frame": 0, "index": 0, "timestamp": 1533151603.547, "new_sequence": true,
     "scene": "scene-0103", "sample_token": "...",                 # nuScenes input only
     "detections": [{"id": 17, "label": 0, "name": "car", "score": 0.81,
                     "box": [x, y, z, l, w, h, yaw, vx, vy],        # vehicle (model) frame
                     "box_global": [x, y, z, l, w, h, yaw, vx, vy]}]}

``box``: gravity-centre box in the vehicle-fixed frame the model works in (nuScenes: the LIDAR_TOP
frame of the sample; own cameras: the calibration file's vehicle frame), metres, radians, m/s.
``box_global``: the same box in the world frame (``ego_pose`` of the frame, float64; own cameras:
the calibration file's world frame). ``id``: the track id of the chosen tracker
(``tracker='memory'``, default: the memory query's id, which a detection made by a query
propagated from the memory keeps from the frame it was first inserted; ``'velocity'``:
CenterPoint's greedy tracker; see :mod:`raydn.engine.tracking`); ``null`` for a detection that is
not part of a track, or where a backend cannot report the model's selection (an export made before
the ``query`` / ``memory_index`` outputs).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from raydn.core.frames import boxes_to_global
from raydn.core.outputs import Selection
from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.frames import collate_frames
from raydn.data.infos import load_info_file
from raydn.data.prepare import build_info, check_dataroot
from raydn.deploy import OnnxDetector
from raydn.engine.tracking import TrackFrame, build_tracker
from raydn.errors import DataError, RaydnError
from raydn.geometry import CAMERA_NAMES, CLASS_NAMES
from raydn.interop.convert import load_model
from raydn.io import atomic_path
from raydn.viz.render import (
    TrackPaths,
    denormalize_images,
    render_frame,
    save_image_atomic,
)
from raydn.viz.video import VideoWriter

__all__ = ["TorchBackend", "OnnxBackend", "open_backend", "frame_record",
           "select_nuscenes_records", "nuscenes_stream", "run_stream", "StreamOptions", "StreamReport",
           "check_camera_count"]


# ---------------------------------------------------------------------------------- backends

class TorchBackend:
    """A :class:`~raydn.models.detector.RayDNDetector` in eval mode. ``step`` returns the model's
    own ``predict`` output and the :class:`~raydn.models.decode.Selection` it made (for the ids)."""

    name = "torch"

    def __init__(self, model, device=None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        head = model.cfg.head
        self.num_cams = int(head.num_cams)
        self.class_names = tuple(CLASS_NAMES[:head.num_classes])
        self.preset = getattr(model, "preset", None)
        self.head_sizes = {k: int(getattr(head, k)) for k in ("num_query", "num_propagated", "memory_len")}

    def init_state(self, batch_size: int = 1):
        return self.model.init_state(batch_size, self.device)

    @torch.no_grad()
    def step(self, batch, state):
        """-> (detections (list of dicts, CPU), state, :class:`~raydn.models.decode.Selection`)."""
        dets, state, sel = self.model.predict(batch.to(self.device), state, with_selection=True)
        return [{k: v.detach().cpu() for k, v in d.items()} for d in dets], state, sel


class OnnxBackend:
    """A `raydn export` output run by onnxruntime (:class:`raydn.deploy.OnnxDetector`)."""

    name = "onnxruntime"

    def __init__(self, onnx_dir):
        self.det = OnnxDetector(onnx_dir)  # raises ExportError naming onnxruntime when it is missing
        meta = self.det.metadata
        self.num_cams = int(self.det.num_cams)
        self.class_names = tuple(self.det.class_names)
        self.preset = self.det.preset
        self._meta = meta
        need = ("num_query", "num_propagated", "memory_len")
        self.head_sizes = {k: int(meta[k]) for k in need} if all(k in meta for k in need) else None

    def init_state(self, batch_size: int = 1):
        return self.det.init_state(batch_size)

    def step(self, batch, state):
        """-> (detections, state, :class:`~raydn.models.decode.Selection` or None: an export
        without the ``query`` / ``memory_index`` outputs)."""
        outs, state = self.det.step(batch, state)
        dets = self.det.detections(outs)
        sel = None
        if "memory_index" in outs and all("query" in d for d in dets):
            sel = Selection.of(dets, torch.from_numpy(outs["memory_index"]))
        return dets, state, sel


def open_backend(backend: str, *, checkpoint=None, onnx_dir=None, device=None, model=None):
    """``'torch'`` (``model`` or ``checkpoint`` via :func:`raydn.interop.convert.load_model`) or
    ``'onnxruntime'`` (``onnx_dir``)."""
    if backend == "torch":
        if model is None:
            if checkpoint is None:
                raise RaydnError("--backend torch needs --checkpoint")
            model = load_model(checkpoint)
        return TorchBackend(model, device)
    if backend == "onnxruntime":
        if onnx_dir is None:
            raise RaydnError("--backend onnxruntime needs --onnx DIR (a `raydn export` output)")
        return OnnxBackend(onnx_dir)
    raise RaydnError(f"unknown backend {backend!r}; expected 'torch' or 'onnxruntime'")


def check_camera_count(model_cams: int, data_cams: int, what: str) -> None:
    if int(model_cams) != int(data_cams):
        raise DataError(f"{what} has {data_cams} camera(s) but the model was built for {model_cams}: "
                        f"the presets are trained for {model_cams} cameras (a model for another "
                        "camera count needs its own training)")


# ---------------------------------------------------------------------------------- records

def frame_record(frame: int, meta: dict, timestamp: float, new_sequence: bool, det: dict,
                 ids: Tensor | None, pose: Tensor, class_names: Sequence[str],
                 score_thr: float, scene: str | None = None) -> dict:
    """The JSON object of one frame (see the module docstring); detections with
    ``score >= score_thr``, in the model's order (descending score). Boxes rounded to 0.1 mm /
    1e-4 rad, scores to 1e-6."""
    keep = det["scores"] >= score_thr
    boxes = det["boxes"][keep]
    g = boxes_to_global(boxes, pose)
    rec = {"frame": int(frame), "index": int(meta.get("index", frame)), "timestamp": float(timestamp),
           "new_sequence": bool(new_sequence)}
    if "sample_token" in meta:
        rec.update(scene=scene, sample_token=meta["sample_token"])
    labels = det["labels"][keep].tolist()
    scores = np.round(det["scores"][keep].double().numpy(), 6).tolist()
    ids_l = ([None if i < 0 else i for i in torch.as_tensor(ids)[keep].tolist()] if ids is not None
             else [None] * len(labels))
    b = np.round(boxes.double().numpy(), 4).tolist()
    gl = np.round(g.numpy(), 4).tolist()
    rec["detections"] = [  # serialisation is per detection by nature
        {"id": i, "label": int(lab), "name": class_names[int(lab)], "score": s, "box": bb, "box_global": gg}
        for i, lab, s, bb, gg in zip(ids_l, labels, scores, b, gl)]
    return rec


# ---------------------------------------------------------------------------------- nuScenes input

def _default_split(version: str) -> str:
    return {"v1.0-mini": "mini_val", "v1.0-trainval": "val", "v1.0-test": "test"}.get(version, "val")


def detect_version(dataroot) -> str:
    root = Path(dataroot)
    if not root.is_dir():
        raise DataError(f"nuScenes dataroot {root} does not exist or is not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v1.0-"))
    if len(found) != 1:
        raise DataError(f"{root}: {'no' if not found else 'several'} nuScenes version folders "
                        f"({', '.join(found) or 'none'}); pass --version")
    return found[0]


def select_nuscenes_records(dataroot, *, version: str | None = None, infos=None,
                            scenes: Sequence[str] | None = None, split: str | None = None
                            ) -> tuple[list[dict], dict[str, str], str]:
    """Info records of the chosen scenes -> ``(records, {scene_token: scene_name}, version)``.

    ``scenes``: scene names (e.g. ``scene-0103``); else every scene of ``split`` (default: the
    version's validation split: ``mini_val`` / ``val`` / ``test``) present in the dataroot.
    ``infos``: an info pickle from ``raydn prepare`` (else the records are built from the tables
    in memory, which needs nuscenes-devkit)."""
    version = version or detect_version(dataroot)
    vdir = check_dataroot(dataroot, version)
    table = json.loads((vdir / "scene.json").read_text())
    name_of = {s["token"]: s["name"] for s in table}
    by_name = {v: k for k, v in name_of.items()}
    if scenes:
        unknown = [s for s in scenes if s not in by_name]
        if unknown:
            have = sorted(by_name)
            raise DataError(f"{dataroot} ({version}) has no scene {', '.join(unknown)}; it has "
                            f"{len(have)}: {', '.join(have[:12])}{' ...' if len(have) > 12 else ''}")
        wanted = [by_name[s] for s in scenes]
    else:
        split = split or _default_split(version)
        try:
            from nuscenes.utils.splits import (
                create_splits_scenes,  # optional: raydn[nuscenes]
            )
        except ImportError:
            raise DataError("choosing scenes by split needs nuscenes-devkit (pip install 'raydn[nuscenes]'); "
                            "or pass --scene NAME") from None
        splits = create_splits_scenes()
        if split not in splits:
            raise DataError(f"unknown nuScenes split {split!r}; expected one of {', '.join(sorted(splits))}")
        wanted = [by_name[n] for n in splits[split] if n in by_name]
        if not wanted:
            raise DataError(f"{dataroot} ({version}) has none of the scenes of split {split!r}")
    wanted_set = set(wanted)
    if infos is not None:
        records = [r for r in load_info_file(infos)["infos"] if r["scene_token"] in wanted_set]
        if not records:
            raise DataError(f"{infos}: no frames of the chosen scene(s) "
                            f"({', '.join(name_of[t] for t in wanted[:5])}) in this info file")
    else:
        records = _build_records(dataroot, version, wanted)
    return records, {t: name_of[t] for t in wanted}, version


def _build_records(dataroot, version: str, scene_tokens: Sequence[str]) -> list[dict]:
    """Info records (no annotations) of the given scenes straight from the tables."""
    try:
        from nuscenes.nuscenes import NuScenes  # optional: raydn[nuscenes]
    except ImportError:
        raise DataError("reading a dataroot without --data needs nuscenes-devkit "
                        "(pip install 'raydn[nuscenes]'); or pass --data INFOS from `raydn prepare`") from None
    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    records = []
    for st in scene_tokens:  # per scene, per sample: table walks
        tok = nusc.get("scene", st)["first_sample_token"]
        idx = 0
        while tok:
            sample = nusc.get("sample", tok)
            records.append(build_info(nusc, sample, str(dataroot), True, idx))
            tok, idx = sample["next"], idx + 1
    return records


def nuscenes_stream(records: list[dict], aug, *, data_root=None):
    """The test-mode dataset of ``records`` (time order, memory reset at each scene start)."""
    return NuScenesStreamingDataset(records, replace(aug, training=False), data_root=data_root,
                                    test_mode=True, load_annotations=False, validate=True)


# ---------------------------------------------------------------------------------- the loop

@dataclass
class StreamReport:
    frames: int
    detections: int
    seconds: float
    out: Path | None
    render_dir: Path | None = None
    video: Path | None = None
    video_frames: int = 0
    ids: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)


def _video_fps(frames_dataset, default: float = 2.0) -> float:
    """Frame rate from the median time step of a camera rig (1..60 Hz); ``default`` otherwise."""
    rig = getattr(frames_dataset, "rig", None)
    if rig is None or len(rig.frames) < 2:
        return default
    dt = float(np.median(np.diff([f.timestamp for f in rig.frames])))
    return float(min(60.0, max(1.0, round(1.0 / dt)))) if dt > 0 else default


class _LoadFailure:
    """A :class:`RaydnError` raised while a frame was loaded (in a DataLoader worker process, too),
    carried to the main process as a value (its class and one-line message: picklable) and raised
    there as itself -- not as a worker traceback."""

    def __init__(self, error: RaydnError):
        self.cls, self.message = type(error), str(error)

    def error(self) -> RaydnError:
        try:
            return self.cls(self.message)
        except Exception:  # a subclass with another constructor
            return RaydnError(self.message)


class _CatchLoadErrors(torch.utils.data.Dataset):
    """``frames`` whose items are :class:`_LoadFailure` instead of raising a :class:`RaydnError`."""

    def __init__(self, frames):
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i):
        try:
            return self.frames[i]
        except RaydnError as e:
            return _LoadFailure(e)


def _collate_or_failure(items):
    failed = [it for it in items if isinstance(it, _LoadFailure)]
    return failed[0] if failed else collate_frames(items)


@dataclass(frozen=True)
class StreamOptions:
    """What :func:`run_stream` writes and how it runs.

    Attributes:
        out: JSON-lines path (atomic), or None.
        render_dir: folder for one PNG per frame (each atomic), or None.
        video: MP4 path (atomic), or None; ``fps``: its frame rate (default: the rig's frame rate,
            2 Hz for nuScenes keyframes).
        score_thr: detections kept in the JSON and drawn (score >= this).
        aug: the :class:`AugConfig` (the image mean/std when rendering; default ``frames.aug``).
        scene_names: scene token -> name, for the records' ``scene``.
        num_workers: image-loading worker processes.
        limit: stop after this many frames.
        progress: a progress bar.
        tracker: ``'memory'`` or ``'velocity'`` (the ``id`` of every detection,
            :mod:`raydn.engine.tracking`); ``birth_score`` / ``keep_score``: its thresholds.
    """
    out: str | os.PathLike | None = None
    render_dir: str | os.PathLike | None = None
    video: str | os.PathLike | None = None
    fps: float | None = None
    score_thr: float = 0.3
    aug: object = None
    scene_names: dict | None = None
    num_workers: int = 0
    limit: int | None = None
    progress: bool = True
    tracker: str = "memory"
    birth_score: float = 0.0
    keep_score: float = 0.0


def run_stream(backend, frames, options: StreamOptions | None = None, *,
               on_frame: Callable[[int, dict], None] | None = None, **fields) -> StreamReport:
    """Run ``backend`` over the dataset ``frames`` (items :class:`FrameInputs`, in stream order)
    one frame at a time and write the outputs :class:`StreamOptions` asks for (``options``, or its
    fields as keywords: ``run_stream(backend, frames, out="d.jsonl", score_thr=0.0)``).
    ``on_frame(n, record)``: called after every frame (memory probes). Nothing is kept per frame
    (flat memory on long streams; the drawn track paths keep a few recent positions of the live
    tracks).

    A frame that cannot be loaded (in the main process or a loader worker) raises its own
    :class:`RaydnError` (one line naming the file), and a failed or interrupted run leaves no output:
    the JSON lines and the video are written through temporary files, and the pictures this run
    wrote under ``render_dir`` are removed again (with the folder, if the run created it)."""

    if options is not None and fields:
        raise TypeError("run_stream: give StreamOptions or its fields as keywords, not both")
    opts = options if options is not None else StreamOptions(**fields)
    n_total = len(frames) if opts.limit is None else min(int(opts.limit), len(frames))
    if n_total == 0:
        raise DataError("no frames to run")
    aug = opts.aug if opts.aug is not None else getattr(frames, "aug", None)
    if (opts.render_dir is not None or opts.video is not None) and aug is None:
        raise ValueError("run_stream: rendering needs aug (image mean/std)")
    loader = DataLoader(_CatchLoadErrors(frames), batch_size=1, shuffle=False,
                        collate_fn=_collate_or_failure, num_workers=opts.num_workers)
    trk = _stream_tracker(backend, opts)
    scene_names = opts.scene_names or {}
    t0 = time.time()
    have_ids = trk is not None
    with contextlib.ExitStack() as stack:
        sink = _FrameSink.open(stack, opts, aug, _video_fps(frames) if opts.video is not None else None,
                               n_total, backend.name)
        state = backend.init_state(1)
        n = -1
        for n, batch in enumerate(loader):
            if n >= n_total:
                break
            if isinstance(batch, _LoadFailure):
                raise batch.error()
            dets, state, sel = backend.step(batch, state)
            meta = batch.meta[0]
            pose = _frame_pose(batch)
            ids = _track_ids(trk, batch, dets[0], sel, pose)
            have_ids = have_ids and ids is not None
            rec = frame_record(n, meta, float(batch.timestamp[0]), bool(batch.prev_exists[0] == 0),
                               dets[0], ids, pose, backend.class_names, opts.score_thr,
                               scene=scene_names.get(meta.get("scene_token")))
            sink.write(n, batch, dets[0], rec, pose)
            if on_frame is not None:
                on_frame(n, rec)
            del batch, dets, sel, rec
            sink.advance()
        sink.finish()
    return StreamReport(min(n + 1, n_total), sink.detections, time.time() - t0,
                        Path(opts.out) if opts.out else None, sink.render_dir,
                        Path(opts.video) if opts.video else None, sink.video_frames, have_ids)


def _stream_tracker(backend, opts: StreamOptions):
    """The tracker giving the ``id`` of every detection, or None (the memory tracker needs a
    backend that reports the model's head sizes and selection)."""
    sizes = getattr(backend, "head_sizes", None)
    if opts.tracker == "velocity" or sizes is not None:
        return build_tracker(opts.tracker, head=sizes, class_names=backend.class_names,
                             birth_score=opts.birth_score, keep_score=opts.keep_score)
    return None


def _frame_pose(batch) -> Tensor:
    """(4, 4) float64 vehicle -> world pose of the batch's frame (own cameras: plus the
    calibration file's world origin)."""
    meta = batch.meta[0]
    pose = batch.ego_pose[0].double()
    if "world_origin" in meta:
        pose[:3, 3] += torch.as_tensor(meta["world_origin"], dtype=torch.float64)
    return pose


def _track_ids(trk, batch, det: dict, sel, pose: Tensor) -> Tensor | None:
    """Track ids (k,) of the frame's detections, or None where there is no tracker or the memory
    tracker has no selection from the backend."""
    if trk is None or (sel is None and trk.name != "velocity"):
        return None
    g = boxes_to_global(det["boxes"], pose).numpy()
    return torch.from_numpy(trk.step(TrackFrame(
        bool(batch.prev_exists[0] == 0), float(batch.timestamp[0]), det["labels"],
        det["scores"], g[:, :2], g[:, 7:9],
        None if sel is None else sel.decode_index[0],
        None if sel is None else sel.memory_index[0])))


class _FrameSink:
    """Where :func:`run_stream` writes each frame: the JSON lines (through a temporary file), the
    pictures (removed again if the run fails), the video, the progress bar; entered on the run's
    ``ExitStack`` (closed or rolled back with it)."""

    def __init__(self, opts: StreamOptions, aug, fh, vw, bar, render_dir: Path | None, paths):
        self.score_thr, self.aug = opts.score_thr, aug
        self.fh, self.vw, self.bar = fh, vw, bar
        self.render_dir, self.paths = render_dir, paths
        self.pictures: list[Path] = []   # written by this run: removed again if it fails
        self.detections = 0
        self.video_frames = 0

    @classmethod
    def open(cls, stack: contextlib.ExitStack, opts: StreamOptions, aug, rig_fps: float | None,
             n_total: int, backend_name: str) -> "_FrameSink":
        paths = None
        if opts.render_dir is not None or opts.video is not None:
            paths = TrackPaths()
        render_dir = created = None
        if opts.render_dir is not None:
            render_dir = Path(opts.render_dir)
            created = not render_dir.exists()
            render_dir.mkdir(parents=True, exist_ok=True)
        bar = None
        if opts.progress:
            bar = tqdm(total=n_total, desc=f"raydn infer ({backend_name})", unit="frame", dynamic_ncols=True)
        sink = cls(opts, aug, None, None, bar, render_dir, paths)
        if render_dir is not None:
            stack.push(lambda exc_type, exc, tb: _remove_pictures(exc_type, sink.pictures, render_dir, created))
        if bar is not None:
            stack.callback(bar.close)
        if opts.out is not None:
            tmp = stack.enter_context(atomic_path(opts.out))
            sink.fh = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        if opts.video is not None:
            sink.vw = stack.enter_context(VideoWriter(opts.video, fps=opts.fps or rig_fps))
        return sink

    def write(self, n: int, batch, det: dict, rec: dict, pose: Tensor) -> None:
        """Frame ``n``: its JSON line, picture and video frame."""
        self.detections += len(rec["detections"])
        if self.fh is not None:
            self.fh.write(json.dumps(rec) + "\n")
        if self.render_dir is not None or self.vw is not None:
            pic = _render(batch, det, self.score_thr, self.aug, rec, self.paths, pose)
            if self.render_dir is not None:
                self.pictures.append(save_image_atomic(pic, self.render_dir / f"{n:06d}.png"))
            if self.vw is not None:
                self.vw.append(np.asarray(pic))
                self.video_frames += 1

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finish(self) -> None:
        """Every frame written: the JSON lines reach the disk before the file is renamed."""
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())


def _remove_pictures(exc_type, pictures: list[Path], render_dir: Path, created: bool) -> bool:
    """ExitStack callback: on an error, remove the pictures this run wrote (and the folder if the
    run created it and it is empty now); never swallows the error."""
    if exc_type is not None:
        for p in pictures:  # per file: this run's pictures only
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if created:
            with contextlib.suppress(OSError):
                render_dir.rmdir()
    return False


def _render(batch, det: dict, score_thr: float, aug, rec: dict, paths=None, pose=None):
    meta = batch.meta[0]
    imgs = denormalize_images(batch.images[0], aug.img_mean, aug.img_std)
    N = imgs.shape[0]
    cams = meta.get("camera_names") or (CAMERA_NAMES if N == len(CAMERA_NAMES) else [f"cam{i}" for i in range(N)])
    title = f"{rec.get('scene') or 'frame'} #{rec['frame']}  t={rec['timestamp']:.2f}s  " \
            f"{len(rec['detections'])} >= {score_thr:g}"
    ids = [d["id"] for d in rec["detections"]]
    tracks = None
    if paths is not None and any(i is not None for i in ids):
        paths.update(rec["new_sequence"], ids, [d["box_global"][:2] for d in rec["detections"]])
        tracks = paths.in_frame(ids, torch.linalg.inv(pose))
    return render_frame(imgs, batch.lidar2img[0], det, score_threshold=score_thr, title=title,
                        camera_names=tuple(cams), tracks=tracks)
