"""Own cameras: the calibration/odometry file, its validation, and frames equal to the dataset's."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from raydn.data.dataset import NuScenesStreamingDataset
from raydn.data.frames import collate_frames, eval_transform_params
from raydn.data.infos import load_info_file
from raydn.data.own_cameras import (CalibrationError, CameraRigFrames, load_camera_rig,
                                    rig_dict_from_infos, write_rig_file)
from raydn.data.transforms import ida_matrix
from raydn.presets import get_preset

AUG = replace(get_preset("tiny_raydn").train.aug, training=False)
THREE = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_BACK"]


@pytest.fixture(scope="module")
def val_records(synth_infos):
    return load_info_file(synth_infos[1]["val"])["infos"]


def _write(tmp_path, rig, name="rig.json"):
    return write_rig_file(rig, tmp_path / name)


def test_six_camera_rig_gives_the_dataset_frames_exactly(val_records, tmp_path):
    """The same scene through the calibration file and through the nuScenes dataset: identical
    images, intrinsics, extrinsics and projections; poses equal up to the world origin shift."""
    path = _write(tmp_path, rig_dict_from_infos(val_records), "rig.yaml")
    frames = CameraRigFrames(load_camera_rig(path), AUG)
    frames.check_images()
    ds = NuScenesStreamingDataset(val_records, AUG, test_mode=True)
    assert len(frames) == len(ds) == 6
    for j in (0, 3):
        a, b = frames[j], ds[j]
        for k in ("images", "intrinsics", "extrinsics", "lidar2img"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        assert a.timestamp == b.timestamp and a.prev_exists == b.prev_exists == (0.0 if j == 0 else 1.0)
        origin = a.meta["world_origin"]
        want = b.ego_pose.double().clone()
        want[:3, 3] -= torch.as_tensor(origin)
        torch.testing.assert_close(a.ego_pose.double(), want, atol=2e-4, rtol=0)
        torch.testing.assert_close(a.ego_pose.double() @ a.ego_pose_inv.double(), torch.eye(4, dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def test_any_camera_count_and_image_size(val_records, tmp_path):
    """3 cameras, one with half-size images (K halved) and one cropped to 1200x900: each camera gets
    its own test-time resize/crop and K' = ida @ K; the half-size camera projects like the original."""
    rig = rig_dict_from_infos(val_records, cameras=THREE)
    for f in rig["frames"]:  # make the files: camera 1 at half size, camera 2 cropped in width
        for cam, op in ((THREE[1], "half"), (THREE[2], "crop")):
            src = f["images"][cam]
            im = Image.open(src)
            im = im.resize((800, 450), Image.BICUBIC) if op == "half" else im.crop((200, 0, 1400, 900))
            dst = tmp_path / f"{op}_{len(list(tmp_path.glob(op + '*')))}.jpg"
            im.save(dst, quality=95)
            f["images"][cam] = dst.name                                   # relative to the file
    K1 = np.asarray(rig["cameras"][1]["intrinsics"])
    rig["cameras"][1]["intrinsics"] = (np.diag([0.5, 0.5, 1.0]) @ K1).tolist()
    K2 = np.asarray(rig["cameras"][2]["intrinsics"])
    K2[0, 2] -= 200
    rig["cameras"][2]["intrinsics"] = K2.tolist()
    frames = CameraRigFrames(load_camera_rig(_write(tmp_path, rig)), AUG)
    frames.check_images()
    assert frames.src_sizes == ((900, 1600), (450, 800), (900, 1200))
    item = frames[1]
    assert item.images.shape == (3, 3, *AUG.final_dim) and item.num_cams == 3
    ref = CameraRigFrames(load_camera_rig(_write(tmp_path, rig_dict_from_infos(val_records, cameras=THREE), "r.json")), AUG)[1]
    torch.testing.assert_close(item.lidar2img[1], ref.lidar2img[1], rtol=1e-5, atol=1e-3)
    p = eval_transform_params(AUG, (900, 1200))
    assert p.resize == max(128 / 900, 352 / 1200) and p.crop[0] == (int(1200 * p.resize) - 352) // 2
    np.testing.assert_allclose(item.intrinsics[2, :3, :3].double().numpy(), ida_matrix(p) @ K2, rtol=1e-6)
    batch = collate_frames([frames[0], frames[1]])
    assert batch.images.shape == (2, 3, 3, *AUG.final_dim) and batch.timestamp.dtype == torch.float64


def test_quaternion_form_equals_matrix_form(val_records, tmp_path):
    from scipy.spatial.transform import Rotation
    rig = rig_dict_from_infos(val_records[:2], cameras=THREE)
    q_rig = copy.deepcopy(rig)
    for c in q_rig["cameras"]:
        m = np.asarray(c.pop("cam_to_vehicle"))
        x, y, z, w = Rotation.from_matrix(m[:3, :3]).as_quat()
        c["rotation"], c["translation"] = [w, x, y, z], m[:3, 3].tolist()
    a = CameraRigFrames(load_camera_rig(_write(tmp_path, rig, "m.json")), AUG)
    b = CameraRigFrames(load_camera_rig(_write(tmp_path, q_rig, "q.yaml")), AUG)
    np.testing.assert_allclose(a.lidar2img, b.lidar2img, rtol=1e-9, atol=1e-6)


# ------------------------------------------------------------------------------ validation

def _bad(rig, where, *, cam=None, frame=None, field=None, value=None, drop=None):
    r = copy.deepcopy(rig)
    d = r["cameras"][cam] if cam is not None else (r["frames"][frame] if frame is not None else r)
    if drop:
        d.pop(drop)
    else:
        d[field] = value
    return r


CASES = [
    # (id, mutation kwargs, substrings the message must contain)
    ("missing intrinsics", dict(cam=1, drop="intrinsics"), ["cameras[1] (CAM_FRONT_LEFT)", "'intrinsics'", "missing"]),
    ("intrinsics shape", dict(cam=2, field="intrinsics", value=[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]),
     ["cameras[2] (CAM_BACK)", "'intrinsics'", "shape 3x3", "3x4"]),
    ("not pinhole", dict(cam=0, field="intrinsics", value=[[1000, 0, 800], [0, 1000, 450], [0, 1, 1]]),
     ["cameras[0] (CAM_FRONT)", "pinhole"]),
    ("extrinsics not rigid", dict(cam=1, field="cam_to_vehicle", value=[[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
     ["cameras[1] (CAM_FRONT_LEFT)", "'cam_to_vehicle'", "rotation"]),
    ("non-finite pose", dict(frame=2, field="vehicle_to_world",
                             value=[[1, 0, 0, float("nan")], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
     ["frames[2]", "'vehicle_to_world'", "NaN"]),
    ("missing pose", dict(frame=1, drop="vehicle_to_world"), ["frames[1]", "'vehicle_to_world'", "'rotation'"]),
    ("timestamp not increasing", dict(frame=3, field="timestamp", value=0.0), ["frames[3]", "'timestamp'", "not greater", "frames[2]"]),
    ("timestamp not a number", dict(frame=0, field="timestamp", value="noon"), ["frames[0]", "'timestamp'", "'noon'"]),
    ("image of a camera missing", dict(frame=4, field="images", value={"CAM_FRONT": "a.jpg", "CAM_BACK": "b.jpg"}),
     ["frames[4]", "CAM_FRONT_LEFT", "no image"]),
    ("unknown camera", dict(frame=1, field="images", value={"CAM_FRONT": "a", "CAM_FRONT_LEFT": "b", "CAM_BACK": "c", "CAM_X": "d"}),
     ["frames[1]", "CAM_X", "unknown camera"]),
]


@pytest.mark.parametrize("mutation,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_calibration_errors_name_field_camera_and_frame(val_records, tmp_path, mutation, needles):
    rig = rig_dict_from_infos(val_records, cameras=THREE)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_bad(rig, None, **mutation)))
    with pytest.raises(CalibrationError) as e:
        load_camera_rig(path)
    msg = str(e.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_quaternion_must_be_unit(val_records, tmp_path):
    rig = rig_dict_from_infos(val_records, cameras=THREE)
    rig["frames"][2].pop("vehicle_to_world")
    rig["frames"][2].update(rotation=[1.0, 0.0, 0.0, 0.5], translation=[0, 0, 0])
    with pytest.raises(CalibrationError, match=r"frames\[2\].*'rotation'.*norm"):
        load_camera_rig(_write(tmp_path, rig))


def test_top_level_errors(tmp_path):
    p = tmp_path / "c.json"
    with pytest.raises(CalibrationError, match="not found"):
        load_camera_rig(p)
    p.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_camera_rig(p)
    p.write_text(json.dumps({"cameras": []}))
    with pytest.raises(CalibrationError, match="'cameras' must be a non-empty list"):
        load_camera_rig(p)
    y = tmp_path / "c.yaml"
    y.write_text("cameras: [a: b\n")
    with pytest.raises(CalibrationError, match="not valid YAML"):
        load_camera_rig(y)


def test_image_file_errors_name_frame_and_camera(val_records, tmp_path):
    rig = rig_dict_from_infos(val_records, cameras=THREE)
    good = rig["frames"][0]["images"]["CAM_BACK"]
    # frame 2, CAM_FRONT_LEFT: missing file
    rig["frames"][2]["images"]["CAM_FRONT_LEFT"] = "nowhere.jpg"
    frames = CameraRigFrames(load_camera_rig(_write(tmp_path, rig)), AUG)
    with pytest.raises(CalibrationError) as e:
        frames.check_images()
    assert "frames[2]" in str(e.value) and "CAM_FRONT_LEFT" in str(e.value) and "nowhere.jpg" in str(e.value)
    # frame 3, CAM_BACK: not an image
    rig["frames"][2]["images"]["CAM_FRONT_LEFT"] = good
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    rig["frames"][3]["images"]["CAM_BACK"] = "junk.jpg"
    frames = CameraRigFrames(load_camera_rig(_write(tmp_path, rig)), AUG)
    with pytest.raises(CalibrationError, match=r"frames\[3\].*CAM_BACK.*cannot read image"):
        frames.check_images()
    # frame 4, CAM_FRONT: a truncated JPEG (valid header): found when decoded
    data = open(good, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    rig["frames"][3]["images"]["CAM_BACK"] = good
    rig["frames"][4]["images"]["CAM_FRONT"] = "cut.jpg"
    frames = CameraRigFrames(load_camera_rig(_write(tmp_path, rig)), AUG)
    frames.check_images()                       # the header is fine
    frames[3]
    with pytest.raises(CalibrationError, match=r"frames\[4\].*CAM_FRONT.*cut.jpg"):
        frames[4]
    # wrong size for the camera
    Image.open(good).resize((800, 450)).save(tmp_path / "small.jpg")
    rig["frames"][4]["images"]["CAM_FRONT"] = "small.jpg"
    frames = CameraRigFrames(load_camera_rig(_write(tmp_path, rig)), AUG)
    with pytest.raises(CalibrationError, match=r"frames\[4\].*CAM_FRONT.*800x450, expected 1600x900"):
        frames.check_images()


def test_the_readme_example_is_valid(tmp_path):
    """The README's complete calibration example parses and runs (with stand-in images)."""
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"A complete example with two cameras.*?```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "calib.yaml").write_text(block)
    for cam, size in (("front", (1600, 900)), ("left", (1280, 720))):
        (tmp_path / cam).mkdir()
        for j in range(2):
            Image.new("RGB", size, (40 * j, 90, 160)).save(tmp_path / cam / f"{j:06d}.jpg")
    rig = load_camera_rig(tmp_path / "calib.yaml")
    assert rig.camera_names == ("front", "left") and len(rig.frames) == 2
    np.testing.assert_allclose(rig.cameras[1].cam_to_vehicle[:3, :3], [[1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-6)
    assert rig.frames[1].timestamp - rig.frames[0].timestamp == pytest.approx(0.1)
    frames = CameraRigFrames(rig, AUG)
    frames.check_images()
    assert frames.src_sizes == ((900, 1600), (720, 1280))
    item = frames[1]
    assert item.images.shape == (2, 3, *AUG.final_dim) and item.prev_exists == 1.0
    # a point 10 m ahead projects to the middle column of the front camera's network input
    p = item.lidar2img[0].double() @ torch.tensor([11.7, 0.0, 1.5, 1.0], dtype=torch.float64)
    u = p[0] / p[2]
    assert abs(u - (816.3 * frames.params[0].resize - frames.params[0].crop[0])) < 1e-3
