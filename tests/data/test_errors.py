"""Bad input data -> clear DataError naming the file / sample / field."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from infos_helper import CAMERA_NAMES, make_record, write_jpeg
from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.infos import load_info_file, loads_infos
from raydn.data.transforms import aug_config_r50
from raydn.errors import DataError, RaydnError


@pytest.fixture()
def good_jpeg(tmp_path):
    return write_jpeg(tmp_path / "samples" / "ok.jpg", Image.new("RGB", (1600, 900), (10, 20, 30)))


def _rec(paths, **kw):
    boxes = np.array([[1.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.1]])
    return make_record("tokA", "sceneA", 1_000_000, True, paths, boxes, ["car"], **kw)


def _paths(good, cam=None, other=None):
    return {c: (other if c == cam else good) for c in CAMERA_NAMES}


def test_corrupt_jpeg(tmp_path, good_jpeg):
    bad = tmp_path / "samples" / "CAM_BACK" / "bad.jpg"
    bad.parent.mkdir(parents=True)
    data = open(good_jpeg, "rb").read()
    bad.write_bytes(data[: len(data) // 3] + b"\x00garbage" * 10)  # truncated stream
    ds = NuScenesStreamingDataset([_rec(_paths(good_jpeg, "CAM_BACK", str(bad)))], aug_config_r50(False))
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode camera image"):
        ds[0]
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"bad\.jpg: cannot decode"):
        ds[0]


def test_missing_image(tmp_path, good_jpeg):
    missing = str(tmp_path / "samples" / "CAM_FRONT" / "nope.jpg")
    ds = NuScenesStreamingDataset([_rec(_paths(good_jpeg, "CAM_FRONT", missing))], aug_config_r50(True))
    with pytest.raises(DataError, match=r"nope\.jpg: camera image not found"):
        ds[0]


def test_wrong_image_size(tmp_path, good_jpeg):
    small = write_jpeg(tmp_path / "small.jpg", Image.new("RGB", (800, 450)))
    ds = NuScenesStreamingDataset([_rec(_paths(good_jpeg, "CAM_FRONT_LEFT", small))], aug_config_r50(False))
    with pytest.raises(DataError, match=r"small\.jpg: image is 800x450, expected 1600x900"):
        ds[0]


def test_nan_box(good_jpeg):
    rec = _rec(_paths(good_jpeg))
    rec["gt_boxes"][0, 3] = np.nan
    with pytest.raises(DataError, match=r"sample tokA: field 'gt_boxes' has NaN/inf values in boxes \[0\]"):
        NuScenesStreamingDataset([rec], aug_config_r50(True))
    # NaN velocity is legal (official: set to 0)
    rec = _rec(_paths(good_jpeg), velocity=np.array([[np.nan, np.nan]]))
    s = NuScenesStreamingDataset([rec], aug_config_r50(False))[0]
    assert s.gt_boxes[0, 7:].abs().sum() == 0


@pytest.mark.parametrize("field, value, msg", [
    ("cam_intrinsic", np.eye(4), r"cams\.CAM_FRONT_RIGHT: field 'cam_intrinsic' has shape \(4, 4\), expected 3x3"),
    ("sensor2lidar_rotation", np.eye(3)[:2], r"cams\.CAM_FRONT_RIGHT: field 'sensor2lidar_rotation' has shape \(2, 3\), expected 3x3"),
    ("sensor2lidar_translation", np.zeros(4), r"cams\.CAM_FRONT_RIGHT: field 'sensor2lidar_translation' has shape \(4,\), expected 3"),
    ("cam_intrinsic", np.full((3, 3), np.nan), r"cams\.CAM_FRONT_RIGHT: field 'cam_intrinsic' contains NaN"),
])
def test_wrong_calibration(good_jpeg, field, value, msg):
    rec = _rec(_paths(good_jpeg))
    rec["cams"]["CAM_FRONT_RIGHT"][field] = value
    with pytest.raises(DataError, match=r"<infos>: sample tokA: " + msg):
        NuScenesStreamingDataset([rec], aug_config_r50(False))


def test_missing_camera_and_fields(good_jpeg):
    rec = _rec(_paths(good_jpeg))
    del rec["cams"]["CAM_BACK_LEFT"]
    with pytest.raises(DataError, match=r"sample tokA: field 'cams' lacks cameras \['CAM_BACK_LEFT'\]"):
        NuScenesStreamingDataset([rec], aug_config_r50(False))
    rec = _rec(_paths(good_jpeg))
    rec["ego2global_rotation"] = [1.0, 0.0, 0.0]
    with pytest.raises(DataError, match=r"field 'ego2global_rotation' has shape \(3,\), expected 4"):
        NuScenesStreamingDataset([rec], aug_config_r50(False))
    rec = _rec(_paths(good_jpeg))
    rec["gt_names"] = np.array(["car", "bus"])
    with pytest.raises(DataError, match=r"field 'gt_names' has 2 entries, expected 1"):
        NuScenesStreamingDataset([rec], aug_config_r50(False))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_info_pickle_is_restricted(tmp_path, good_jpeg):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"infos": [_Evil()], "metadata": {}}))
    with pytest.raises(DataError, match=r"evil\.pkl: refusing to unpickle global '(posix|os|nt)\.system'"):
        load_info_file(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"evil\.pkl: not a readable info pickle"):
        load_info_file(path)
    with pytest.raises(DataError, match=r"info file not found"):
        load_info_file(tmp_path / "absent.pkl")
    with pytest.raises(DataError, match=r"expected a dict with keys 'infos'"):
        loads_infos(pickle.dumps([1, 2]), "x.pkl")
    # numpy arrays, numpy scalars, str arrays and protocol-2 bytes load fine
    rec = _rec(_paths(good_jpeg))
    rec["extra"] = (np.float64(1.5), np.int64(3), b"bytes", {1, 2})
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        obj = loads_infos(pickle.dumps({"infos": [rec], "metadata": {"version": "v"}}, protocol=proto))
        assert obj["infos"][0]["gt_names"].tolist() == ["car"]
        assert obj["infos"][0]["extra"][2] == b"bytes"
    assert issubclass(DataError, RaydnError)
