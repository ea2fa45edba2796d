"""``NuScenesStreamingDataset``: one frame (six cameras) per item, official pipeline (spec §2.2-§2.4).

Index ``i`` is the position in the **timestamp-sorted** info list. Sequence structure:

* scenes start where ``len(sweeps) == 0`` (official marker) or, for robustness, where
  ``scene_token`` changes;
* training splits each scene of n frames into ``seq_split_num`` sub-sequences of ``ceil(n / k)``
  frames (official ``_set_sequence_group_flag``); ``group_ids[i]`` is the sub-sequence id, used by
  :class:`raydn.data.sampler.StreamingGroupSampler`;
* ``prev_exists`` is 0 at every sub-sequence start in training and at every scene start in test
  mode (where the official detector derives it from ``scene_token`` changes, §3.3).

Item: a :class:`raydn.data.frames.FrameInputs` (:func:`raydn.data.frames.collate_frames` turns a list
into a ``FrameBatch``):

* ``images`` (6, 3, H, W) float32 normalised RGB (H, W = padded ``final_dim``);
* ``intrinsics`` (6, 4, 4) viewpad with the augmented K; ``extrinsics`` (6, 4, 4) LiDAR -> camera
  (never augmented); ``lidar2img`` (6, 4, 4) LiDAR(augmented) -> pixel·depth; all float32;
* ``ego_pose`` (4, 4) float32 LiDAR(augmented) -> global; ``ego_pose_inv`` its inverse;
* ``timestamp`` float (seconds, float64); ``prev_exists`` float 0/1;
* ``gt_boxes`` (n, 9) float32 gravity-centre ``[x, y, z_c, l, w, h, yaw, vx, vy]`` and ``gt_labels``
  (n,) int64 (``None`` without annotations); per camera lists ``gt_boxes_2d`` (k, 4),
  ``gt_labels_2d`` (k,), ``centers_2d`` (k, 2), ``depths_2d`` (k,) (training only, else ``None``);
* ``points`` (P, 3) float32 LiDAR points of the record's ``lidar_path`` in the augmented LiDAR
  frame (only with ``load_points=True``, for depth supervision; else ``None``);
* ``meta`` dict: ``sample_token``, ``scene_token``, ``index``, ``img_timestamp`` (6 floats),
  ``img_shape`` / ``pad_shape`` (H, W), ``image_paths``, ``aug`` (the random draw).
"""
from __future__ import annotations

import copy

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from raydn.core.frames import camera_matrices, invert_rigid, pose_matrix
from raydn.data.infos import has_annotations, load_info_file, validate_infos
from raydn.data.frames import FrameInputs, load_camera_images
from raydn.data.images import resolve_image_path
from raydn.data.transforms import (
    AugConfig, ImageAugParams, apply_global_rot_scale, filter_boxes_range, filter_invisible,
    global_rot_scale_matrix, ida_matrix, limit_yaw, sample_global_aug, sample_image_aug, transform_boxes_2d,
)
from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES, CLASS_NAMES, PC_RANGE

__all__ = ["NuScenesStreamingDataset", "load_lidar_points",
           "sequence_groups", "scene_ids"]


#: float32 columns per point of a nuScenes ``.pcd.bin`` LiDAR file: x, y, z, intensity, ring
LIDAR_COLUMNS = 5
#: a LiDAR file larger than this is refused before it is read (a nuScenes sweep is ~0.7 MB)
MAX_LIDAR_FILE_BYTES = 256 << 20


def load_lidar_points(path: Path) -> np.ndarray:
    """Read a nuScenes-format LiDAR file (float32, :data:`LIDAR_COLUMNS` per point; the synthetic
    worlds write the same) -> (P, 3) float64 x, y, z in the sensor (LIDAR_TOP) frame, metres. A
    missing, oversized or truncated file or non-finite coordinates raise :class:`DataError`
    naming the file."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"{path}: LiDAR point file not found or unreadable ({type(exc).__name__})") from exc
    if size > MAX_LIDAR_FILE_BYTES:
        raise DataError(f"{path}: LiDAR point file is {size} bytes, more than the "
                        f"{MAX_LIDAR_FILE_BYTES} bytes of any real scan")
    if size % (4 * LIDAR_COLUMNS):
        raise DataError(f"{path}: LiDAR point file of {size} bytes is not a whole number of points "
                        f"({LIDAR_COLUMNS} float32 each): truncated?")
    pts = np.fromfile(path, dtype=np.float32).reshape(-1, LIDAR_COLUMNS)[:, :3].astype(np.float64)
    if not np.isfinite(pts).all():
        raise DataError(f"{path}: LiDAR point file holds NaN/inf coordinates")
    return pts


def scene_ids(infos: Sequence[dict]) -> np.ndarray:
    """(n,) int64 scene index per sorted record: a new scene starts at i > 0 where
    ``len(sweeps) == 0`` (official marker) or where ``scene_token`` changes (robustness)."""
    n = len(infos)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    no_sweeps = np.array([len(r["sweeps"]) == 0 for r in infos], dtype=bool)
    tokens = np.array([str(r["scene_token"]) for r in infos])
    start = no_sweeps.copy()
    start[1:] |= tokens[1:] != tokens[:-1]
    start[0] = False
    return np.cumsum(start).astype(np.int64)


def sequence_groups(scene: np.ndarray, seq_split_num: int) -> np.ndarray:
    """Official sub-sequence ids: a scene of n frames is cut at ``range(0, n, ceil(n / k))``; every
    piece gets a new consecutive id. ``scene`` (n,) non-decreasing int ids -> (n,) int64."""
    if seq_split_num < 1:
        raise ValueError(f"seq_split_num must be >= 1, got {seq_split_num}")
    if len(scene) == 0:
        return np.zeros(0, dtype=np.int64)
    _, starts, counts = np.unique(scene, return_index=True, return_counts=True)
    order = np.argsort(starts)
    starts, counts = starts[order], counts[order]
    chunk = np.ceil(counts / seq_split_num).astype(np.int64)
    pos = np.arange(len(scene)) - np.repeat(starts, counts)          # position inside the scene
    sub = pos // np.repeat(chunk, counts)                               # piece inside the scene
    n_pieces = np.ceil(counts / chunk).astype(np.int64)
    first_id = np.concatenate([[0], np.cumsum(n_pieces)[:-1]])
    return (np.repeat(first_id, counts) + sub).astype(np.int64)


def _starts(ids: np.ndarray) -> np.ndarray:
    s = np.ones(len(ids), dtype=bool)
    s[1:] = ids[1:] != ids[:-1]
    return s


class NuScenesStreamingDataset(torch.utils.data.Dataset):
    """Streaming nuScenes frames with the official augmentation.

    Args:
        infos: path of an official info pickle, or the loaded ``{'infos': ...}`` dict / record list.
        aug: :class:`AugConfig` (``training`` selects the train or test transform).
        data_root: optional root for image paths (see :func:`resolve_image_path`).
        seq_split_num: sub-sequences per scene for training (official 2).
        test_mode: prev_exists from scene changes, no 2D labels; default ``not aug.training``.
        load_annotations: return 3D GT; default: when the records carry ``gt_boxes``.
        with_2d / filter_invisible: the 2D-label branch of the train transform (official True).
        class_names, pc_range: 3D class order and ObjectRangeFilter range (official defaults).
        seed: base seed of the augmentation generator (see :meth:`reseed`).
        load_images: decode the camera images (False: items carry ``images=None`` and the model
            gets its features elsewhere, e.g. a frozen-stem cache; see :meth:`without_images`).
        load_points: give each item the LiDAR points of its record's ``lidar_path``
            (:func:`load_lidar_points`), in the augmented LiDAR frame (for depth supervision,
            :mod:`raydn.models.depth_head`); off by default.
    """

    def __init__(self, infos, aug: AugConfig, *, data_root: str | os.PathLike | None = None,
                 seq_split_num: int = 2, test_mode: bool | None = None,
                 load_annotations: bool | None = None, with_2d: bool = True,
                 filter_invisible: bool = True, class_names: Sequence[str] = CLASS_NAMES,
                 pc_range: Sequence[float] = PC_RANGE, seed: int = 0, validate: bool = True,
                 load_images: bool = True, load_points: bool = False):
        if isinstance(infos, (str, os.PathLike)):
            self.source = str(infos)
            records = load_info_file(infos, validate=validate)["infos"]
        else:
            self.source = "<infos>"
            records = infos["infos"] if isinstance(infos, dict) else list(infos)
            if validate:
                validate_infos(records, self.source)
        ts = np.array([float(r["timestamp"]) for r in records], dtype=np.float64)
        order = np.argsort(ts, kind="stable")
        self.infos = [records[i] for i in order]
        self.aug = aug
        self.data_root = data_root
        self.test_mode = (not aug.training) if test_mode is None else bool(test_mode)
        self.load_annotations = (bool(self.infos) and has_annotations(self.infos[0])) \
            if load_annotations is None else bool(load_annotations)
        self.with_2d = with_2d
        self.filter_invisible = filter_invisible
        self.class_names = tuple(class_names)
        self.pc_range = tuple(float(v) for v in pc_range)
        self.seq_split_num = int(seq_split_num)
        self.scene_ids = scene_ids(self.infos)
        self.group_ids = sequence_groups(self.scene_ids, self.seq_split_num)
        starts = _starts(self.scene_ids) if self.test_mode else _starts(self.group_ids)
        self.prev_exists = (~starts).astype(np.float32)
        #: decode the camera images (False: items carry ``images=None``, for a feature cache)
        self.load_images = bool(load_images)
        #: give items the LiDAR points (``FrameInputs.points``) for depth supervision
        self.load_points = bool(load_points)
        self.reseed(seed)

    def without_images(self) -> "NuScenesStreamingDataset":
        """The same frames (records, transform, sequences, seed) with ``load_images=False``: a new
        dataset sharing the records, for a model fed from a feature cache; this one is unchanged."""
        twin = copy.copy(self)
        twin.load_images = False
        return twin

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return len(self.infos)

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.max()) + 1 if len(self.group_ids) else 0

    def group_indices(self) -> list[list[int]]:
        """Dataset indices of every sub-sequence, each in time order."""
        bounds = np.flatnonzero(_starts(self.group_ids)).tolist() + [len(self)]
        return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def scene_starts(self) -> np.ndarray:
        """Indices where a scene starts (sorted)."""
        return np.flatnonzero(_starts(self.scene_ids)) if len(self) else np.zeros(0, np.int64)

    def reseed(self, seed: int, rank: int = 0, worker_id: int = 0) -> None:
        """(Re)create the augmentation generator from ``(seed, rank, worker_id)``; called by the
        DataLoader ``worker_init_fn`` in every worker (see :mod:`raydn.data.loader`)."""
        self.seed = int(seed)
        self.rng = np.random.default_rng([int(seed), int(rank), int(worker_id)])

    # ------------------------------------------------------------------ item
    def __getitem__(self, index) -> FrameInputs:
        """``index``: a frame index, or ``(index, key)`` from a keyed sampler: the augmentation is
        then drawn from ``default_rng([seed, *key])``, a function of the stream position only."""
        rng = self.rng
        if isinstance(index, (tuple, list)):
            index, key = index
            rng = np.random.default_rng([self.seed, *(int(k) for k in key)])
        index = int(index)
        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        rec = self.infos[index]
        cfg = self.aug
        training = cfg.training
        iap = sample_image_aug(cfg, rng if training else None)

        # -- calibration (float64): lidar2cam, viewpad, augmented K
        cams = [rec["cams"][c] for c in CAMERA_NAMES]
        cam2lidar = pose_matrix(np.stack([np.asarray(c["sensor2lidar_rotation"], np.float64) for c in cams]),
                                np.stack([np.asarray(c["sensor2lidar_translation"], np.float64).reshape(3)
                                          for c in cams]))
        extr = invert_rigid(cam2lidar)
        intr, lidar2img = camera_matrices(np.stack([np.asarray(c["cam_intrinsic"], np.float64) for c in cams]),
                                          extr, ida_matrix(iap)[None])
        ego_pose = pose_matrix(rec["ego2global_rotation"], rec["ego2global_translation"]) @ \
            pose_matrix(rec["lidar2ego_rotation"], rec["lidar2ego_translation"])
        ego_pose_inv = invert_rigid(ego_pose)

        # -- images
        paths = [resolve_image_path(c["data_path"], self.data_root) for c in cams]
        if self.load_images:
            images = load_camera_images(paths, cfg, [iap] * len(paths), [cfg.src_size] * len(paths))
            pad_shape = tuple(images.shape[-2:])
        else:  # features come from a cache (raydn.models.stem_cache): no decoding
            images = None
            d = int(cfg.size_divisor or 1)
            pad_shape = tuple(int(-(-v // d) * d) for v in cfg.final_dim)  # as pad_images

        # -- annotations
        gt_boxes = gt_labels = None
        g2d = None
        if self.load_annotations:
            gt_boxes, gt_labels = self._boxes_3d(rec, index)
            if training and not self.test_mode and self.with_2d and "bboxes2d" in rec:
                g2d = self._labels_2d(rec, iap)
        gap = sample_global_aug(cfg, rng if training else None)
        if training:
            lidar2img, ego_pose, ego_pose_inv, boxes9 = apply_global_rot_scale(
                gap, lidar2img, ego_pose, ego_pose_inv,
                gt_boxes if gt_boxes is not None else np.zeros((0, 9)))
            if gt_boxes is not None:
                gt_boxes = boxes9

        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        points = None
        if self.load_points:  # the BEV augmentation M moves the points as it moves the boxes
            points = f32(self._lidar_points(rec) @ global_rot_scale_matrix(gap)[:3, :3].T)
        fH, fW = cfg.final_dim
        item = FrameInputs.from_arrays(
            images=images, intrinsics=intr, extrinsics=extr, lidar2img=lidar2img,
            ego_pose=ego_pose, ego_pose_inv=ego_pose_inv, pad_shape=pad_shape,
            timestamp=float(rec["timestamp"]) / 1e6, prev_exists=float(self.prev_exists[index]),
            gt_boxes=None if gt_boxes is None else f32(gt_boxes.reshape(-1, 9)),
            gt_labels=None if gt_labels is None else torch.from_numpy(gt_labels.astype(np.int64)),
            meta={
                "sample_token": rec["token"], "scene_token": rec["scene_token"], "index": index,
                "img_timestamp": [float(c["timestamp"]) / 1e6 for c in cams],
                "img_shape": (fH, fW), "pad_shape": pad_shape,
                "image_paths": [str(p) for p in paths],
                "aug": {"resize": iap.resize, "crop": iap.crop, "flip": iap.flip,
                        "rot": gap.rot, "scale": gap.scale},
            },
            points=points,
            **(g2d or {}))
        return item

    def _lidar_points(self, rec: dict) -> np.ndarray:
        """(P, 3) float64 LiDAR points of ``rec`` (its ``lidar_path``, re-rooted like the images)."""
        if not rec.get("lidar_path"):
            raise DataError(f"{self.source}: sample {rec['token']}: field 'lidar_path' is missing; "
                            "depth supervision needs the LIDAR_TOP file of every sample "
                            "(infos written by 'raydn prepare' carry it)")
        return load_lidar_points(resolve_image_path(rec["lidar_path"], self.data_root))

    def _boxes_3d(self, rec: dict, index: int):
        """get_ann_info + ObjectRangeFilter + limit_yaw + ObjectNameFilter -> ((n, 9) f64, (n,) i64)."""
        boxes = np.asarray(rec["gt_boxes"], dtype=np.float64).reshape(-1, 7)
        n = len(boxes)
        if "valid_flag" in rec:
            mask = np.asarray(rec["valid_flag"], dtype=bool).reshape(n)
        elif "num_lidar_pts" in rec:
            mask = np.asarray(rec["num_lidar_pts"]).reshape(n) > 0
        else:
            mask = np.ones(n, dtype=bool)
        if not np.isfinite(boxes[mask]).all():
            raise DataError(f"{self.source}: sample {rec['token']}: field 'gt_boxes' contains NaN/inf")
        vel = np.asarray(rec.get("gt_velocity", np.zeros((n, 2))), dtype=np.float64).reshape(n, 2).copy()
        vel[np.isnan(vel[:, 0])] = 0.0
        vel[~np.isfinite(vel)] = 0.0
        names = np.asarray(rec["gt_names"]).reshape(n)[mask]
        names = names.astype(str)
        labels = np.full(len(names), -1, dtype=np.int64)
        for ci, cname in enumerate(self.class_names):  # loop over the 10 classes, not over boxes
            labels[names == cname] = ci
        boxes = np.concatenate([boxes[mask], vel[mask]], axis=1)
        keep = filter_boxes_range(boxes, self.pc_range)
        boxes, labels = boxes[keep], labels[keep]
        boxes[:, 6] = limit_yaw(boxes[:, 6])
        keep = labels >= 0
        return boxes[keep], labels[keep]

    def _labels_2d(self, rec: dict, iap: ImageAugParams) -> dict:
        """Per-camera 2D labels through ``_bboxes_transform`` and ``_filter_invisible``."""
        fd = self.aug.final_dim
        out = {"gt_boxes_2d": [], "gt_labels_2d": [], "centers_2d": [], "depths_2d": []}
        for i in range(len(CAMERA_NAMES)):  # 6 cameras, per-camera variable-size label sets
            b = np.asarray(rec["bboxes2d"][i], dtype=np.float64).reshape(-1, 4)
            c = np.asarray(rec["centers2d"][i], dtype=np.float64).reshape(-1, 2)
            lab = np.asarray(rec["labels2d"][i]).reshape(-1).astype(np.int64)
            d = np.asarray(rec["depths"][i], dtype=np.float64).reshape(-1)
            if not (len(b) == len(c) == len(lab) == len(d)):
                raise DataError(f"{self.source}: sample {rec['token']}: 2D labels of camera "
                                f"{CAMERA_NAMES[i]} have inconsistent lengths (bboxes2d {len(b)}, "
                                f"centers2d {len(c)}, labels2d {len(lab)}, depths {len(d)})")
            if len(b):
                b, c, lab, d = transform_boxes_2d(b, c, lab, d, iap, fd)
            if len(b) and self.filter_invisible:
                b, c, lab, d = filter_invisible(b, c, lab, d, fd)
            out["gt_boxes_2d"].append(torch.from_numpy(b.astype(np.float32).reshape(-1, 4)))
            out["gt_labels_2d"].append(torch.from_numpy(lab.astype(np.int64).reshape(-1)))
            out["centers_2d"].append(torch.from_numpy(c.astype(np.float32).reshape(-1, 2)))
            out["depths_2d"].append(torch.from_numpy(d.astype(np.float32).reshape(-1)))
        return out
