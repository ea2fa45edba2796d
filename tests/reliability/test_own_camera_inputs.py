"""Own-camera inputs (``raydn infer --cameras CALIB``) that decode to something other than what they
hold are refused (or converted faithfully) at the one place frames are read:

* image modes: 16-bit greyscale is scaled (not clipped at 255), palette and opaque RGBA convert,
  transparent RGBA, CMYK and 32-bit float are refused naming the file and the mode;
* timestamps in microseconds / milliseconds, or frames 20 s / 0.1 ms apart: refused naming the unit;
* intrinsics for another image size (principal point outside the image) or absurd focal lengths;
* a key given twice (JSON, YAML with its line), a calibration file nested 100000 levels deep;
* an undecodable image met in a loader worker: one line naming the file, and no output of the run
  left behind (pictures, JSON lines, video)."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from raydn.cli import main as cli_main
from raydn.data.infos import load_info_file
from raydn.data.own_cameras import CalibrationError, CameraRigFrames, load_camera_rig, rig_dict_from_infos, write_rig_file
from raydn.presets import get_preset
from _deps import require

AUG = replace(get_preset("tiny_raydn").train.aug, training=False)
FRONT = ["CAM_FRONT"]


@pytest.fixture(scope="module")
def val_records(synth_infos):
    return load_info_file(synth_infos[1]["val"])["infos"]


@pytest.fixture(scope="module")
def front_image(val_records):
    """The first frame's CAM_FRONT picture as an (H, W, 3) uint8 array."""
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    return np.asarray(Image.open(rig["frames"][0]["images"]["CAM_FRONT"]).convert("RGB"))


def _rig_with_image(val_records, tmp_path, image: Image.Image, name: str):
    """A one-camera rig whose frame 0 image is ``image`` saved as ``name`` -> its CameraRigFrames."""
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    path = tmp_path / name
    image.save(path)
    rig["frames"][0]["images"]["CAM_FRONT"] = str(path)
    return CameraRigFrames(load_camera_rig(write_rig_file(rig, tmp_path / f"{name}.json")), AUG)


# ------------------------------------------------------------------------------------ image modes

def test_16bit_greyscale_png_is_scaled_not_clipped(val_records, front_image, tmp_path):
    grey8 = np.asarray(Image.fromarray(front_image).convert("L"))
    grey16 = grey8.astype(np.uint16) * 257                      # the same picture in 16 bits
    img16 = Image.fromarray(grey16)
    assert img16.mode == "I;16"
    got = _rig_with_image(val_records, tmp_path, img16, "grey16.png")[0].images
    want = _rig_with_image(val_records, tmp_path, Image.fromarray(grey8), "grey8.png")[0].images
    assert torch.equal(got, want)   # clipping at 255 would make it all white


@pytest.mark.parametrize("mode", ["P", "RGBA", "L"])
def test_palette_opaque_rgba_and_greyscale_convert_as_they_are(val_records, front_image, tmp_path, mode):
    img = Image.fromarray(front_image)
    img = img.quantize(64) if mode == "P" else img.convert(mode)
    got = _rig_with_image(val_records, tmp_path, img, f"m_{mode}.png")[0].images
    want = _rig_with_image(val_records, tmp_path, img.convert("RGB"), f"m_{mode}_rgb.png")[0].images
    assert torch.equal(got, want)


@pytest.mark.parametrize("mode, ext, match", [("RGBA", "png", "transparent pixels"),
                                              ("CMYK", "jpg", "mode CMYK"),
                                              ("F", "tiff", "mode F .32-bit float")])
def test_images_that_are_not_8bit_rgb_are_refused_naming_file_and_mode(val_records, front_image, tmp_path,
                                                                       mode, ext, match):
    img = Image.fromarray(front_image).convert(mode)
    if mode == "RGBA":
        img.putalpha(Image.fromarray(np.full(front_image.shape[:2], 100, np.uint8)))
    frames = _rig_with_image(val_records, tmp_path, img, f"bad.{ext}")
    with pytest.raises(CalibrationError, match=match) as e:
        frames[0]
    assert f"bad.{ext}" in str(e.value) and "camera 'CAM_FRONT'" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ timestamps

def _load(tmp_path, rig, name="rig.json"):
    return load_camera_rig(write_rig_file(rig, tmp_path / name))


@pytest.mark.parametrize("edit, match", [
    (lambda t, t0: t * 1e6, r"frames\[0\]: field 'timestamp' .* looks like microseconds since 1970: divide by 1e\+06"),
    (lambda t, t0: t * 1e3, r"looks like milliseconds since 1970: divide by 1000"),
    (lambda t, t0: (t - t0) * 1e3, r"median step.* look like milliseconds, not seconds: divide by 1000"),
    (lambda t, t0: (t - t0) * 1e6, r"median step.* look like microseconds"),
    (lambda t, t0: (t - t0) * 1e-4, r"less than 1 ms .* another unit than seconds"),
])
def test_timestamps_in_another_unit_are_refused_naming_the_unit(val_records, tmp_path, edit, match):
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    t0 = rig["frames"][0]["timestamp"]
    assert 1e9 < t0 < 1e11   # seconds: accepted
    _load(tmp_path, rig)
    for f in rig["frames"]:
        f["timestamp"] = edit(f["timestamp"], t0)
    with pytest.raises(CalibrationError, match=match):
        _load(tmp_path, rig)


def test_a_20_second_gap_between_frames_is_refused(val_records, tmp_path):
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    for f in rig["frames"][3:]:
        f["timestamp"] += 20.0
    with pytest.raises(CalibrationError, match=r"frames\[3\]: field 'timestamp' is 20\.\d+ s after frames\[2\]'s"):
        _load(tmp_path, rig)


# ------------------------------------------------------------------------------------ intrinsics

@pytest.mark.parametrize("edit, match", [
    (lambda K, W: K[0].__setitem__(2, 2.5 * W), r"principal point .* is outside the \d+x\d+ image"),
    (lambda K, W: K[1].__setitem__(2, -5.0), r"principal point"),
    (lambda K, W: K[0].__setitem__(0, 0.01 * W), r"fx = .* pixels is outside"),
    (lambda K, W: K[1].__setitem__(1, 80.0 * W), r"fy = .* pixels is outside"),
])
def test_intrinsics_of_no_camera_are_refused_naming_camera_and_field(val_records, front_image, tmp_path, edit, match):
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    CameraRigFrames(_load(tmp_path, rig), AUG)   # the real intrinsics: accepted
    edit(rig["cameras"][0]["intrinsics"], front_image.shape[1])
    with pytest.raises(CalibrationError, match=r"cameras\[0\] \(CAM_FRONT\): field 'intrinsics': " + match):
        CameraRigFrames(_load(tmp_path, rig), AUG)


# ------------------------------------------------------------------------------------ file structure

def test_duplicate_keys_are_refused_in_json_and_yaml(val_records, tmp_path):
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    text = json.dumps(rig, indent=1)
    i = text.index('"intrinsics"')
    bad = text[:i] + '"intrinsics": [[1, 0, 1], [0, 1, 1], [0, 0, 1]],\n' + text[i:]
    (tmp_path / "dup.json").write_text(bad)
    with pytest.raises(CalibrationError, match=r"dup\.json: key 'intrinsics' is given twice"):
        load_camera_rig(tmp_path / "dup.json")
    require("yaml")
    lines = write_rig_file(rig, tmp_path / "ok.yaml").read_text().splitlines()
    j = next(k for k, s in enumerate(lines) if "name: CAM_FRONT" in s)
    indent = lines[j + 1][:len(lines[j + 1]) - len(lines[j + 1].lstrip())]
    lines.insert(j + 1, indent + "name: CAM_BACK")
    (tmp_path / "dup.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(CalibrationError, match=rf"dup\.yaml: line {j + 2}: key 'name' is given twice in one "
                                               rf"mapping \(first at line {j + 1}\)"):
        load_camera_rig(tmp_path / "dup.yaml")


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_a_deeply_nested_calibration_file_is_a_clear_error(tmp_path, capsys, suffix):
    if suffix == "yaml":
        require("yaml")
    path = tmp_path / f"deep.{suffix}"
    path.write_text('{"cameras": ' + "[" * 100_000 + "]" * 100_000 + ', "frames": []}')
    with pytest.raises(CalibrationError, match=rf"deep\.{suffix}: nested too deeply to read"):
        load_camera_rig(path)


def test_a_calibration_file_larger_than_the_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import raydn.limits
    path = tmp_path / "big.json"
    path.write_text('{"cameras": [], "frames": []}' + " " * 4096)
    monkeypatch.setattr(raydn.limits, "MAX_CALIBRATION_FILE_BYTES", 1024)
    monkeypatch.setattr(type(path), "read_text", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(CalibrationError, match=r"big\.json: calibration file of 4\.\d KiB is larger than the limit"):
        load_camera_rig(path)


def test_matrix_fields_are_bounded_before_conversion(val_records, tmp_path):
    rig = rig_dict_from_infos(val_records, cameras=FRONT)
    rig["cameras"][0]["intrinsics"] = [[0.0] * 1_000_000] * 3
    with pytest.raises(CalibrationError, match=r"field 'intrinsics': expected a 3x3 array of numbers, got \[\["):
        _load(tmp_path, rig)


# ------------------------------------------------------------------------------------ worker errors

@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_image_in_a_worker_is_one_line_and_leaves_no_output(val_records, tiny_model_file,
                                                                        tmp_path, capsys, workers):
    rig = copy.deepcopy(rig_dict_from_infos(val_records))
    bad = tmp_path / "broken.jpg"   # a real JPEG cut in half: its header reads, its pixels do not
    data = open(rig["frames"][3]["images"]["CAM_BACK"], "rb").read()
    bad.write_bytes(data[:len(data) // 2])
    for f in rig["frames"][3:]:
        f["images"]["CAM_BACK"] = str(bad)
    calib = write_rig_file(rig, tmp_path / "calib.json")
    out = tmp_path / "o"
    previous = out / "png" / "keep.txt"           # a file that was there before the run stays
    previous.parent.mkdir(parents=True)
    previous.write_text("x")
    rc = cli_main(["infer", "--checkpoint", str(tiny_model_file), "--cameras", str(calib),
                   "--out", str(out / "dets.jsonl"), "--render", str(out / "png"), "--video", str(out / "v.mp4"),
                   "--workers", str(workers), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("raydn infer: error: ") and "\n" not in err, err
    assert "broken.jpg" in err and "frames[3]" in err and "CAM_BACK" in err and "Traceback" not in err
    assert "cannot decode camera image" in err      # met while loading frame 3, after frames 0-2 ran
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt", "png"]
