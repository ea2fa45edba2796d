"""Bad inputs to ``model.predict`` (the documented own-camera API): a clear ``DataError`` before the
temporal memory is touched, never plausible boxes computed from NaN carried into later frames."""
from __future__ import annotations

import pytest
import torch

from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.core.batch import check_frame_batch
from raydn.errors import DataError
from raydn.presets import build_model

HW = (64, 176)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny_raydn").eval()


def _frames(n):
    return [synthetic_frame_batch(1, HW, frame_index=f, with_targets=False, seed=5) for f in range(n)]


def _run(model, frames, state=None):
    state = model.init_state(1) if state is None else state
    dets = []
    for b in frames:
        d, state = model.predict(b, state)
        dets.append(d[0])
    return dets, state


@pytest.mark.parametrize("field, index", [
    ("images", (0, 2, 1, 10, 20)),
    ("lidar2img", (0, 4, 0, 3)),
    ("intrinsics", (0, 1, 0, 0)),
    ("extrinsics", (0, 5, 2, 3)),
    ("ego_pose", (0, 0, 3)),
    ("ego_pose_inv", (0, 1, 1)),
])
def test_nan_in_one_frame_is_refused_and_the_memory_is_untouched(model, field, index):
    """NaN in the images or the calibration/odometry of frame 1 of 3: predict raises, naming the field,
    the frame and (per-camera fields) the camera; the state from frame 0 is unchanged, so going on
    with frame 2 gives exactly what frames 0 and 2 give without the bad frame."""
    frames = _frames(3)
    _, state0 = _run(model, frames[:1])
    snapshot = {k: v.clone() for k, v in state0.as_dict().items()}
    bad = frames[1]
    getattr(bad, field)[index] = float("nan")
    with pytest.raises(DataError) as e:
        model.predict(bad, state0)
    msg = str(e.value)
    assert f"FrameBatch.{field}: NaN/inf value in frame 'synthetic-0-1'" in msg, msg
    assert "expected finite values" in msg and "state passed in is unchanged" in msg
    if field in ("images", "lidar2img", "intrinsics", "extrinsics"):
        assert f"camera {index[1]}" in msg, msg
    for k, v in state0.as_dict().items():
        assert torch.equal(v, snapshot[k]), k        # nothing written into the memory
    after_skip, _ = _run(model, frames[2:], state0)
    reference, _ = _run(model, [frames[0], frames[2]])
    for k in ("boxes", "scores", "labels"):
        torch.testing.assert_close(after_skip[0][k], reference[1][k], rtol=0, atol=0)


def test_inf_timestamp_is_refused(model):
    b = _frames(1)[0]
    b.timestamp[0] = float("inf")
    with pytest.raises(DataError, match=r"FrameBatch\.timestamp: NaN/inf value in frame 'synthetic-0-0'"):
        model.predict(b, model.init_state(1))


@pytest.mark.parametrize("cams", [5, 7])
def test_camera_count_other_than_the_models_is_a_clear_error(model, cams):
    b = _frames(1)[0]
    idx = list(range(6)) + [0] if cams == 7 else list(range(cams))
    for name in ("images", "intrinsics", "extrinsics", "lidar2img"):
        setattr(b, name, getattr(b, name)[:, idx])
    with pytest.raises(DataError, match=rf"FrameBatch\.intrinsics: {cams} cameras, but the model is built "
                                        rf"for 6 \(shape \(1, {cams}, 4, 4\), expected \(1, 6, 4, 4\)\)"):
        model.predict(b, model.init_state(1))
    # images alone with the wrong count (calibration right) are named too
    b = _frames(1)[0]
    b.images = b.images[:, idx]
    with pytest.raises(DataError, match=rf"FrameBatch\.images: {cams} cameras, but the model is built for 6"):
        model.predict(b, model.init_state(1))


def test_shape_errors_name_the_field():
    b = synthetic_frame_batch(1, HW, with_targets=False)
    b.lidar2img = b.lidar2img[..., :3, :]
    with pytest.raises(DataError, match=r"FrameBatch\.lidar2img: expected shape \(B=1, N=6, 4, 4\), got \(1, 6, 3, 4\)"):
        check_frame_batch(b, 6)
    b = synthetic_frame_batch(2, HW, with_targets=False)
    b.ego_pose = b.ego_pose[:1]
    with pytest.raises(DataError, match=r"FrameBatch\.ego_pose: expected shape \(2, 4, 4\), got \(1, 4, 4\)"):
        check_frame_batch(b, 6)
    b = synthetic_frame_batch(2, HW, with_targets=False)
    b.timestamp = b.timestamp[:1]
    with pytest.raises(DataError, match=r"FrameBatch\.timestamp: expected 2 values"):
        check_frame_batch(b, 6)


def test_good_frames_pass_unchanged(model):
    """The check is silent on good input and predict still gives boxes (the check does not alter data)."""
    frames = _frames(2)
    for b in frames:
        check_frame_batch(b, 6)
    dets, _ = _run(model, frames)
    assert all(torch.isfinite(d["boxes"]).all() and d["boxes"].shape[0] > 0 for d in dets)
