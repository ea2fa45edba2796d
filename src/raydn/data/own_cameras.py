"""Your own cameras: a folder of frames + a calibration/odometry file -> :class:`FrameInputs`.

The calibration file (JSON, or YAML with PyYAML installed) describes N >= 1 cameras and the frames
in time order (the README has a complete example)::

    cameras:                                  # any number N >= 1, any image size
      - name: front                           # unique; default "cam<i>"
        intrinsics: [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]   # pixels of the original image
        cam_to_vehicle: [[...], [...], [...], [0, 0, 0, 1]] # 4x4 camera -> vehicle, or instead
        # rotation: [w, x, y, z]              #   unit quaternion camera -> vehicle
        # translation: [x, y, z]              #   metres
        image_size: [1600, 900]               # optional [width, height]; default: the first frame's
    frames:
      - timestamp: 1533151603.5               # seconds, strictly increasing
        vehicle_to_world: [[...], ..., [0, 0, 0, 1]]  # 4x4 vehicle -> world, or rotation + translation
        images: {front: frames/000000_front.jpg}      # every camera; or a list in camera order

Frames: the vehicle frame is x forward, y left, z up (the model's "LiDAR frame"), metres; camera
axes are OpenCV's (x right, y down, z forward). Image paths are relative to ``frames_dir``
(default: the calibration file's folder) unless absolute.

Every image goes through the dataset's test-time transform (:func:`raydn.data.frames.eval_transform_params`:
resize by ``max(fH / H, fW / W)``, centred crop in width, bottom-aligned in height) with the
intrinsics updated the same way (``K' = ida @ K``), per camera (cameras may differ in size).

World coordinates: the model keeps its memory in float32 world coordinates, which lose
centimetres beyond ~100 km (UTM-scale poses). :class:`CameraRigFrames` therefore feeds the model
poses relative to ``world_origin`` (the first frame's position, float64) and keeps the origin in
``meta`` so that outputs can be returned in the file's world frame exactly.

Errors are :class:`CalibrationError` and name the file, the field, the camera and the frame.

Values that parse but cannot be what they claim are refused (bounds no real camera violates):

* a key given twice in one mapping (JSON or YAML; the message names the key, and the line in YAML);
  a file nested too deeply to parse; a file larger than
  :data:`raydn.limits.MAX_CALIBRATION_FILE_BYTES`;
* timestamps that are not seconds: a value above :data:`MAX_EPOCH_SECONDS` (1e11 s, the year 5138:
  milliseconds, microseconds -- nuScenes' raw unit -- and nanoseconds since 1970 are all above), or
  a step between frames outside [:data:`MIN_FRAME_STEP_S`, :data:`MAX_FRAME_STEP_S`] = [1 ms, 10 s]
  (the message names the likely unit from the median step);
* intrinsics that belong to another image: a principal point outside the image, or ``fx``/``fy``
  outside [:data:`MIN_FOCAL_FRACTION`, :data:`MAX_FOCAL_FRACTION`] = [0.05, 50] x the image width
  (horizontal fields of view of ~169 deg .. ~1.1 deg);
* images that do not decode to 8-bit RGB: see :func:`raydn.data.images.load_image` (16-bit
  greyscale is scaled, alpha must be opaque, CMYK / float / 1-bit are refused).
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image, UnidentifiedImageError

from raydn import (
    limits,  # the limit is read at each call (a module setting tests lower)
)
from raydn.core.frames import camera_matrices, invert_rigid, pose_matrix
from raydn.data.frames import FrameInputs, eval_transform_params, load_camera_images
from raydn.data.images import load_image, resolve_image_path
from raydn.data.transforms import AugConfig, ida_matrix
from raydn.errors import DataError
from raydn.geometry import CAMERA_NAMES
from raydn.io import atomic_write_bytes

__all__ = ["CalibrationError", "CameraCalib", "RigFrame", "CameraRig", "load_camera_rig",
           "CameraRigFrames", "rig_dict_from_infos", "write_rig_file", "check_timestamp_unit",
           "check_intrinsics"]

RIGID_TOL = 1e-3       # |R R^T - I| and |det R - 1| of rotations given as matrices
QUAT_TOL = 1e-3        # |‖q‖ - 1| of quaternions
MAX_EPOCH_SECONDS = 1e11   # seconds since 1970 beyond the year 5000: the timestamps are not seconds
MIN_FRAME_STEP_S = 1e-3    # frames closer than 1 ms (> 1000 Hz): not a camera stream in seconds
MAX_FRAME_STEP_S = 10.0    # frames more than 10 s apart: another unit, or two recordings in one file
MIN_FOCAL_FRACTION = 0.05  # fx, fy >= 0.05 x image width (a pinhole field of view of ~169 deg)
MAX_FOCAL_FRACTION = 50.0  # fx, fy <= 50 x image width (~1.1 deg: beyond any telephoto lens)


class CalibrationError(DataError):
    """A calibration/odometry file or one of its images is wrong (the message names the field,
    the camera and the frame)."""


@dataclass(frozen=True)
class CameraCalib:
    """One camera: ``intrinsics`` (3, 3) K in pixels of its original images, ``cam_to_vehicle``
    (4, 4) float64, ``image_size`` (W, H) or None (taken from the first frame)."""
    name: str
    intrinsics: np.ndarray
    cam_to_vehicle: np.ndarray
    image_size: tuple[int, int] | None


@dataclass(frozen=True)
class RigFrame:
    """One frame: ``timestamp`` float64 seconds, ``vehicle_to_world`` (4, 4) float64, one image
    path per camera (camera order)."""
    index: int
    timestamp: float
    vehicle_to_world: np.ndarray
    images: tuple[Path, ...]


@dataclass(frozen=True)
class CameraRig:
    source: str
    cameras: tuple[CameraCalib, ...]
    frames: tuple[RigFrame, ...]

    @property
    def num_cams(self) -> int:
        return len(self.cameras)

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)


# ------------------------------------------------------------------------------------ parsing

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 4, 60, 60


def _short(value: Any, n: int = 60) -> str:
    s = _REPR.repr(value)  # bounded: a YAML alias bomb or a huge list is never repr'd whole
    return s if len(s) <= n else s[:n] + "..."


def _count_numbers(value: Any, limit: int) -> int:
    """Leaves of nested lists/tuples ``value``, counting stops past ``limit`` (so that a huge list, or
    a YAML alias bomb, is refused before numpy converts it)."""
    if not isinstance(value, (list, tuple)):
        return 1
    n = 0
    for v in value:  # per item: stops early
        n += _count_numbers(v, limit - n)
        if n > limit:
            break
    return n


def _matrix(value: Any, shape: tuple, where: str) -> np.ndarray:
    if _count_numbers(value, 4 * int(np.prod(shape))) > 4 * int(np.prod(shape)):
        raise CalibrationError(f"{where}: expected a {'x'.join(map(str, shape))} array of numbers, "
                               f"got {_short(value)}")
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CalibrationError(f"{where}: expected a {'x'.join(map(str, shape))} array of numbers, "
                               f"got {_short(value)}") from None
    if a.shape != shape:
        raise CalibrationError(f"{where}: expected shape {'x'.join(map(str, shape))}, "
                               f"got {'x'.join(map(str, a.shape)) or 'a scalar'} ({_short(value)})")
    if not np.isfinite(a).all():
        raise CalibrationError(f"{where}: contains NaN or infinite values")
    return a


def _rigid(d: dict, matrix_key: str, where: str) -> np.ndarray:
    """A rigid transform given as ``matrix_key`` (4x4) or as ``rotation`` (wxyz) + ``translation``."""
    if matrix_key in d:
        if "rotation" in d or "translation" in d:
            raise CalibrationError(f"{where}: give either '{matrix_key}' or 'rotation' + 'translation', not both")
        m = _matrix(d[matrix_key], (4, 4), f"{where}: field '{matrix_key}'")
        r = m[:3, :3]
        err = max(float(np.abs(r @ r.T - np.eye(3)).max()), abs(float(np.linalg.det(r)) - 1.0))
        if err > RIGID_TOL:
            raise CalibrationError(f"{where}: field '{matrix_key}': the top-left 3x3 block is not a "
                                   f"rotation (|R R^T - I| or |det R - 1| = {err:.2g} > {RIGID_TOL})")
        if np.abs(m[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > 1e-9:
            raise CalibrationError(f"{where}: field '{matrix_key}': the last row must be [0, 0, 0, 1], "
                                   f"got {m[3].tolist()}")
        return m
    missing = [k for k in ("rotation", "translation") if k not in d]
    if missing:
        raise CalibrationError(f"{where}: missing field '{matrix_key}' (4x4) or "
                               f"{' + '.join(repr(k) for k in missing)}")
    q = _matrix(d["rotation"], (4,), f"{where}: field 'rotation' (quaternion w, x, y, z)")
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > QUAT_TOL:
        raise CalibrationError(f"{where}: field 'rotation': quaternion norm {norm:.6g} is not 1 "
                               "(expected a unit quaternion in w, x, y, z order)")
    t = _matrix(d["translation"], (3,), f"{where}: field 'translation'")
    return pose_matrix(q / norm, t)


def _no_duplicate_keys(src: str):
    """``object_pairs_hook`` for :func:`json.loads` that refuses a key given twice in one object."""
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise CalibrationError(f"{src}: key {k!r} is given twice in one object (in the object "
                                       f"with keys {_short([p[0] for p in pairs], 120)}); give it once")
            seen.add(k)
        return dict(pairs)
    return hook


def _yaml_loader(src: str):
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (naming the line)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict = {}
                for key_node, _ in node.value:  # per key: merge keys ('<<') may override
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        first = seen.setdefault(key, key_node.start_mark.line + 1)
                    except TypeError:  # unhashable: SafeLoader's own message
                        continue
                    if first != key_node.start_mark.line + 1:
                        raise CalibrationError(f"{src}: line {key_node.start_mark.line + 1}: key {key!r} is "
                                               f"given twice in one mapping (first at line {first}); give it once")
            return super().construct_mapping(node, deep=deep)
    return UniqueKeyLoader


def _read_mapping(path: Path) -> dict:
    limits.check_file_size(path, limits.MAX_CALIBRATION_FILE_BYTES, "calibration file", CalibrationError)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the calibration file ({e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_yaml_loader(str(path)))  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            raise CalibrationError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except RecursionError:
            raise CalibrationError(f"{path}: nested too deeply to read (a calibration file is a few "
                                   "levels deep: cameras, frames, matrices)") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys(str(path)))
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}: not valid JSON: {e}") from None
        except RecursionError:
            raise CalibrationError(f"{path}: nested too deeply to read (a calibration file is a few "
                                   "levels deep: cameras, frames, matrices)") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a mapping with 'cameras' and 'frames' at the top, "
                               f"got {type(data).__name__}")
    return data


def _camera(c: Any, i: int, src: str, names: set) -> CameraCalib:
    if not isinstance(c, dict):
        raise CalibrationError(f"{src}: cameras[{i}]: expected a mapping, got {_short(c)}")
    name = c.get("name", f"cam{i}")
    if not isinstance(name, str) or not name:
        raise CalibrationError(f"{src}: cameras[{i}]: field 'name' must be a non-empty string, got {_short(name)}")
    if name in names:
        raise CalibrationError(f"{src}: cameras[{i}]: duplicate camera name {name!r}")
    where = f"{src}: cameras[{i}] ({name})"
    if "intrinsics" not in c:
        raise CalibrationError(f"{where}: missing field 'intrinsics' (3x3)")
    K = _matrix(c["intrinsics"], (3, 3), f"{where}: field 'intrinsics'")
    if np.abs(K[2] - np.array([0.0, 0.0, 1.0])).max() > 1e-9 or K[1, 0] != 0:
        raise CalibrationError(f"{where}: field 'intrinsics' must be a pinhole matrix "
                               f"[[fx, s, cx], [0, fy, cy], [0, 0, 1]], got {K.tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CalibrationError(f"{where}: field 'intrinsics': fx and fy must be > 0, got {K[0, 0]}, {K[1, 1]}")
    extr = _rigid(c, "cam_to_vehicle", where)
    size = c.get("image_size")
    if size is not None:
        s = _matrix(size, (2,), f"{where}: field 'image_size' ([width, height])")
        if (s <= 0).any() or (s != np.round(s)).any():
            raise CalibrationError(f"{where}: field 'image_size' must be two positive integers, got {size}")
        size = (int(s[0]), int(s[1]))
    return CameraCalib(name, K, extr, size)


def _frame(f: Any, j: int, src: str, cams: tuple, root: Path, prev_t: float | None) -> RigFrame:
    if not isinstance(f, dict):
        raise CalibrationError(f"{src}: frames[{j}]: expected a mapping, got {_short(f)}")
    if "timestamp" not in f:
        raise CalibrationError(f"{src}: frames[{j}]: missing field 'timestamp' (seconds)")
    t = f["timestamp"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(float(t)):
        raise CalibrationError(f"{src}: frames[{j}]: field 'timestamp' must be a finite number of "
                               f"seconds, got {_short(t)}")
    t = float(t)
    if prev_t is not None and not t > prev_t:
        raise CalibrationError(f"{src}: frames[{j}]: field 'timestamp' {t!r} is not greater than "
                               f"frames[{j - 1}]'s {prev_t!r} (frames must be in strictly increasing time)")
    where = f"{src}: frames[{j}] (t={t!r})"
    pose = _rigid(f, "vehicle_to_world", where)
    if "images" not in f:
        raise CalibrationError(f"{where}: missing field 'images' (one file per camera)")
    imgs = f["images"]
    names = [c.name for c in cams]
    if isinstance(imgs, dict):
        unknown = sorted(set(map(str, imgs)) - set(names))
        if unknown:
            raise CalibrationError(f"{where}: field 'images': unknown camera(s) {unknown}; cameras are {names}")
        missing = [n for n in names if n not in imgs]
        if missing:
            raise CalibrationError(f"{where}: field 'images': no image for camera(s) {missing}")
        files = [imgs[n] for n in names]
    elif isinstance(imgs, list):
        if len(imgs) != len(cams):
            raise CalibrationError(f"{where}: field 'images' lists {len(imgs)} files for {len(cams)} cameras {names}")
        files = imgs
    else:
        raise CalibrationError(f"{where}: field 'images' must map camera names to files (or list them "
                               f"in camera order), got {_short(imgs)}")
    paths = []
    for n, p in zip(names, files):  # per camera: validation of user strings
        if not isinstance(p, str) or not p:
            raise CalibrationError(f"{where}: camera '{n}': image path must be a non-empty string, got {_short(p)}")
        paths.append(Path(p) if os.path.isabs(p) else root / p)
    return RigFrame(j, t, pose, tuple(paths))


def load_camera_rig(path: str | os.PathLike, frames_dir: str | os.PathLike | None = None) -> CameraRig:
    """Parse and validate a calibration/odometry file (JSON or ``.yaml``/``.yml``) -> :class:`CameraRig`.

    Checks every field (shapes, finiteness, rotations, pinhole form, strictly increasing
    timestamps, one image per camera per frame); image files are checked by
    :meth:`CameraRigFrames.check_images` / when loaded."""
    path = Path(path)
    src = str(path)
    data = _read_mapping(path)
    for key in ("cameras", "frames"):
        if key not in data:
            raise CalibrationError(f"{src}: missing top-level field '{key}'")
        if not isinstance(data[key], list) or not data[key]:
            raise CalibrationError(f"{src}: field '{key}' must be a non-empty list, got {_short(data[key])}")
    names: set = set()
    cams = []
    for i, c in enumerate(data["cameras"]):  # per camera: parsing
        cams.append(_camera(c, i, src, names))
        names.add(cams[-1].name)
    cams = tuple(cams)
    root = Path(frames_dir) if frames_dir is not None else path.parent
    frames, prev = [], None
    for j, f in enumerate(data["frames"]):  # per frame: parsing
        frames.append(_frame(f, j, src, cams, root, prev))
        prev = frames[-1].timestamp
    check_timestamp_unit([f.timestamp for f in frames], src)
    return CameraRig(src, cams, tuple(frames))


def _unit_of(value: float, absolute: bool) -> tuple[str, float]:
    """(likely unit, its divisor to seconds) of a timestamp (``absolute``: since 1970, now ~1.7e9 s)
    or of a step between frames (typically 0.01 .. 1 s) that is too large to be seconds."""
    scale = 1e10 if absolute else 1.0
    if value >= 1e7 * scale:
        return "nanoseconds", 1e9
    if value >= 1e4 * scale:
        return "microseconds", 1e6
    return "milliseconds", 1e3


def check_timestamp_unit(timestamps, src: str) -> None:
    """Raise :class:`CalibrationError` when the (strictly increasing) frame timestamps cannot be
    seconds: a value above :data:`MAX_EPOCH_SECONDS`, or a step between frames outside
    [:data:`MIN_FRAME_STEP_S`, :data:`MAX_FRAME_STEP_S`]; the message names the likely unit."""
    t = np.asarray(timestamps, dtype=np.float64)
    hint = "; nuScenes raw timestamps are microseconds: divide them by 1e6"
    big = np.nonzero(np.abs(t) > MAX_EPOCH_SECONDS)[0]
    if big.size:
        j = int(big[0])
        unit, factor = _unit_of(abs(float(t[j])), True)
        raise CalibrationError(f"{src}: frames[{j}]: field 'timestamp' {float(t[j])!r} is not in seconds "
                               f"(it would be after the year 5000); it looks like {unit} since 1970: "
                               f"divide by {factor:g}{hint}")
    if t.size < 2:
        return
    dt = np.diff(t)
    med = float(np.median(dt))
    if med > MAX_FRAME_STEP_S:
        unit, factor = _unit_of(med, False)
        raise CalibrationError(f"{src}: field 'timestamp': frames are {med:g} apart (median step), more than "
                               f"{MAX_FRAME_STEP_S:g} s: the timestamps look like {unit}, not seconds: "
                               f"divide by {factor:g}{hint}")
    if med < MIN_FRAME_STEP_S:
        raise CalibrationError(f"{src}: field 'timestamp': frames are {med:.3g} s apart (median step), less than "
                               f"{MIN_FRAME_STEP_S * 1e3:g} ms (over 1000 frames per second): the timestamps "
                               "look like another unit than seconds (expected seconds, e.g. 0.05 .. 0.5 s "
                               "between camera frames)")
    j = int(np.argmax((dt > MAX_FRAME_STEP_S) | (dt < MIN_FRAME_STEP_S)))
    if dt[j] > MAX_FRAME_STEP_S or dt[j] < MIN_FRAME_STEP_S:
        raise CalibrationError(f"{src}: frames[{j + 1}]: field 'timestamp' is {float(dt[j]):.6g} s after "
                               f"frames[{j}]'s (the median step is {med:.3g} s); expected "
                               f"{MIN_FRAME_STEP_S * 1e3:g} ms .. {MAX_FRAME_STEP_S:g} s between frames "
                               "of one continuous recording (give one file per recording)")


def check_intrinsics(K: np.ndarray, width: int, height: int, where: str) -> None:
    """Raise :class:`CalibrationError` when the pinhole ``K`` (3, 3) cannot belong to a
    ``width`` x ``height`` image: principal point outside the image, or ``fx``/``fy`` outside
    [:data:`MIN_FOCAL_FRACTION`, :data:`MAX_FOCAL_FRACTION`] x ``width``."""
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    if not (0.0 <= cx <= width and 0.0 <= cy <= height):
        raise CalibrationError(f"{where}: field 'intrinsics': principal point (cx, cy) = ({cx:g}, {cy:g}) is "
                               f"outside the {width}x{height} image; are the intrinsics for another image size?")
    lo, hi = MIN_FOCAL_FRACTION * width, MAX_FOCAL_FRACTION * width
    for name, f in (("fx", fx), ("fy", fy)):  # per focal length
        if not lo <= f <= hi:
            raise CalibrationError(f"{where}: field 'intrinsics': {name} = {f:g} pixels is outside "
                                   f"[{lo:g}, {hi:g}] ({MIN_FOCAL_FRACTION:g}x .. {MAX_FOCAL_FRACTION:g}x the "
                                   f"image width {width}); no camera has such a focal length: is it in "
                                   "pixels, for this image size?")


# ------------------------------------------------------------------------------------ frames

def _open_size(path: Path, where: str) -> tuple[int, int]:
    """(W, H) from the image header (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise CalibrationError(f"{where}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CalibrationError(f"{where}: cannot read image {path} ({type(e).__name__}: {e})") from None


class CameraRigFrames(torch.utils.data.Dataset):
    """The frames of a :class:`CameraRig` as :class:`FrameInputs` for a model of input size
    ``aug.final_dim`` (test-time transform; ``aug.training`` is ignored).

    Item ``j``: ``images`` (N, 3, fH, fW), ``lidar2img`` etc. in the vehicle frame, ``ego_pose``
    vehicle -> world **relative to** :attr:`world_origin` (float32), ``prev_exists`` 0 at frame 0
    (fresh memory), ``meta``: ``index``, ``frame``, ``timestamp``, ``camera_names``,
    ``image_paths``, ``world_origin`` (3,) float64 metres."""

    def __init__(self, rig: CameraRig, aug: AugConfig, *, relative_world: bool = True):
        self.rig = rig
        self.aug = aug
        self.world_origin = (rig.frames[0].vehicle_to_world[:3, 3].copy() if relative_world
                             else np.zeros(3))
        sizes = []
        for i, c in enumerate(rig.cameras):  # per camera: image size from the file or the first frame
            wh = c.image_size or _open_size(rig.frames[0].images[len(sizes)],
                                            f"{rig.source}: frames[0] camera '{c.name}'")
            check_intrinsics(c.intrinsics, int(wh[0]), int(wh[1]), f"{rig.source}: cameras[{i}] ({c.name})")
            sizes.append((int(wh[1]), int(wh[0])))                        # (H, W)
        self.src_sizes = tuple(sizes)
        self.params = tuple(eval_transform_params(aug, s) for s in sizes)
        ida = np.stack([ida_matrix(p) for p in self.params])               # (N, 3, 3)
        K = np.stack([c.intrinsics for c in rig.cameras])
        self.vehicle2cam = invert_rigid(np.stack([c.cam_to_vehicle for c in rig.cameras]))
        self.intrinsics, self.lidar2img = camera_matrices(K, self.vehicle2cam, ida)

    def __len__(self) -> int:
        return len(self.rig.frames)

    def check_images(self) -> None:
        """Every image of every frame exists, is an image and has its camera's size (headers
        only: fast); raises :class:`CalibrationError` naming the frame and the camera."""
        for f in self.rig.frames:  # per file: a header read each
            for c, p, (H, W) in zip(self.rig.cameras, f.images, self.src_sizes):
                where = f"{self.rig.source}: frames[{f.index}] (t={f.timestamp!r}) camera '{c.name}'"
                wh = _open_size(p, where)
                if wh != (W, H):
                    raise CalibrationError(f"{where}: image {p} is {wh[0]}x{wh[1]}, expected {W}x{H} "
                                           "(the camera's image_size / its first frame)")

    def __getitem__(self, j: int) -> FrameInputs:
        f = self.rig.frames[int(j)]

        def loader(path, src_size, draft):
            cam = f.images.index(path)
            where = (f"{self.rig.source}: frames[{f.index}] (t={f.timestamp!r}) "
                     f"camera '{self.rig.cameras[cam].name}'")
            try:
                return load_image(path, src_size, draft)
            except CalibrationError:
                raise
            except DataError as e:
                raise CalibrationError(f"{where}: {e}") from None

        images = load_camera_images(f.images, self.aug, self.params, self.src_sizes, loader=loader)
        pose = f.vehicle_to_world.copy()
        pose[:3, 3] -= self.world_origin
        return FrameInputs.from_arrays(
            images=images, intrinsics=self.intrinsics, extrinsics=self.vehicle2cam,
            lidar2img=self.lidar2img, ego_pose=pose, ego_pose_inv=invert_rigid(pose),
            timestamp=f.timestamp, prev_exists=0.0 if f.index == 0 else 1.0,
            meta={"index": f.index, "frame": f.index, "timestamp": f.timestamp,
                  "camera_names": list(self.rig.camera_names),
                  "image_paths": [str(p) for p in f.images],
                  "world_origin": self.world_origin.copy()})


# ------------------------------------------------------------------------------------ conversion

def rig_dict_from_infos(records: list[dict], *, cameras=None, num_frames: int | None = None,
                        dt: float | None = None, data_root=None) -> dict:
    """A calibration/odometry mapping (JSON/YAML-ready) for the frames of nuScenes info records
    (e.g. one scene of a ``raydn synth`` world): the vehicle frame is the records' LiDAR frame,
    ``cam_to_vehicle`` = ``sensor2lidar`` of the first record, ``vehicle_to_world`` =
    ``ego2global @ lidar2ego`` per frame, absolute image paths.

    ``cameras``: the channel names to keep (default all six); ``num_frames``: cycle through the
    records to make a longer stream (timestamps keep increasing by ``dt``, default the records'
    median step; poses repeat). Records are used in timestamp order."""
    recs = sorted(records, key=lambda r: r["timestamp"])
    if not recs:
        raise DataError("rig_dict_from_infos: no records")
    cameras = list(cameras or CAMERA_NAMES)
    first = recs[0]["cams"]
    cams = [{"name": c,
             "intrinsics": np.asarray(first[c]["cam_intrinsic"], np.float64).tolist(),
             "cam_to_vehicle": pose_matrix(np.asarray(first[c]["sensor2lidar_rotation"], np.float64),
                                           np.asarray(first[c]["sensor2lidar_translation"], np.float64).reshape(3)).tolist()}
            for c in cameras]
    ts = np.array([r["timestamp"] for r in recs], dtype=np.float64) / 1e6
    step = float(dt) if dt is not None else (float(np.median(np.diff(ts))) if len(ts) > 1 else 0.5)
    n = len(recs) if num_frames is None else int(num_frames)
    frames = []
    for k in range(n):  # per frame: building a file
        r = recs[k % len(recs)]
        pose = pose_matrix(r["ego2global_rotation"], r["ego2global_translation"]) @ \
            pose_matrix(r["lidar2ego_rotation"], r["lidar2ego_translation"])
        t = ts[k] if k < len(recs) else ts[0] + k * step
        frames.append({"timestamp": float(t), "vehicle_to_world": pose.tolist(),
                       "images": {c: str(resolve_image_path(r["cams"][c]["data_path"], data_root).resolve())
                                  for c in cameras}})
    return {"cameras": cams, "frames": frames}


def write_rig_file(rig: dict, path: str | os.PathLike) -> Path:
    """Write a calibration mapping as JSON, or YAML for a ``.yaml``/``.yml`` path (atomic)."""
    path = Path(path)
    # plain Python types (numpy scalars/arrays -> floats/lists), the same for both formats
    rig = json.loads(json.dumps(rig, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_dump(rig, sort_keys=False).encode()
    else:
        data = json.dumps(rig, indent=1).encode()
    return atomic_write_bytes(path, data)
