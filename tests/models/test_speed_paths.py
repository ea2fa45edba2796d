"""The speed paths (raydn.models.options.RuntimeOptions): BN folding, channels-last encoder, sampler,
explicit CPU attention. They must not change results beyond float rounding, and must be
switchable at construction (the benchmark's baseline and the ONNX export turn them off)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from raydn.config import BackboneConfig
from raydn.data.synthetic_batch import synthetic_frame_batch
from raydn.models.backbones import build_backbone
from raydn.models.backbones.resnet import ResNet, conv_bn
from raydn.models.options import RuntimeOptions
from raydn.presets import build_model


def _random_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_fold_equals_conv_then_bn_float64(bias):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=bias).double()
    bn = nn.BatchNorm2d(7).double()
    _random_bn(bn, g)
    bn.eval()
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    ref = bn(conv(x))
    go = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    gref = torch.autograd.grad(ref, [x, conv.weight, bn.weight, bn.bias], go)
    out = conv_bn(conv, bn, x, fold=True)
    gout = torch.autograd.grad(out, [x, conv.weight, bn.weight, bn.bias], go)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(gout, gref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # fold=False is the plain path, bit for bit
    assert torch.equal(conv_bn(conv, bn, x, fold=False), ref)


def test_conv_bn_train_mode_bn_is_not_folded():
    """A BN in training mode uses batch statistics (and updates its running ones): no folding."""
    g = torch.Generator().manual_seed(1)
    conv, bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
    _random_bn(bn, g)
    bn.train()
    x = torch.randn(2, 3, 5, 5, generator=g)
    bn_ref = copy.deepcopy(bn)
    before = bn.running_mean.clone()
    out = conv_bn(conv, bn, x, fold=True)
    torch.testing.assert_close(out, bn_ref(conv(x)))
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    assert not torch.allclose(bn.running_mean, before)            # batch statistics were used


@pytest.mark.parametrize("with_cp", [False, True])
def test_resnet_fold_bn_same_outputs_and_grads(with_cp):
    """ResNet-50 blocks (bottleneck + downsample) with frozen BN, train mode (norm_eval): folded
    vs unfolded forward and conv-weight gradients agree to float32 rounding."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    net = ResNet(depth=50, out_indices=(0, 1), with_cp=with_cp)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _random_bn(m, g)
    net.train()  # BN stays in eval (norm_eval), convs train
    x = torch.randn(2, 3, 64, 96, generator=g)
    res = {}
    for fold in (False, True):
        n = copy.deepcopy(net)
        for m in n.modules():
            if hasattr(m, "fold_bn"):
                m.fold_bn = fold
        outs = n(x)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
        loss.backward()
        res[fold] = ([o.detach() for o in outs], n.layer1[0].conv2.weight.grad.clone(),
                     n.conv1.weight.grad.clone())
    for a, b in zip(res[True][0], res[False][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    for a, b in zip(res[True][1:], res[False][1:]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_detector_fast_paths_default_and_switchable():
    """R50 detector: fast paths on by default (channels-last encoder weights, BN folding); turning
    them off gives the same features and head outputs up to float rounding."""
    torch.manual_seed(0)
    fast = build_model("r50_raydn").eval()
    assert fast.channels_last and fast.img_backbone.fold_bn
    assert fast.img_backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.img_neck.fpn_convs[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.options == RuntimeOptions()
    torch.manual_seed(0)
    slow = build_model("r50_raydn", options=RuntimeOptions.baseline()).eval()
    assert not slow.channels_last and not slow.img_backbone.layer1[0].fold_bn
    assert not slow.img_backbone.fold_bn and slow.img_backbone.layer4[2].fold_bn is False
    assert slow.img_backbone.conv1.weight.is_contiguous()
    dfa = slow.pts_bbox_head.transformer.decoder.layers[0].attentions[1]
    assert dfa.sampler.__name__ == "deformable_sample"              # the grid_sample reference
    assert not slow.pts_bbox_head.transformer.decoder.layers[0].attentions[0].attn.explicit_cpu_training
    # official weights load into channels-last parameters unchanged (values, not layout)
    slow.load_state_dict(fast.state_dict())
    batch = synthetic_frame_batch(1, (64, 176), num_boxes=0, with_targets=False)
    with torch.no_grad():
        x = fast.prepare_images(batch.images)
        assert x.is_contiguous(memory_format=torch.channels_last)
        f_fast = fast.extract_feats(batch.images)
        f_slow = slow.extract_feats(batch.images)
        for a, b in zip(f_fast, f_slow):
            assert a.shape == b.shape == (1, 6, 256) + tuple(b.shape[-2:])
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
        o_fast, _, _ = fast(batch, fast.init_state(1))
        o_slow, _, _ = slow(batch, slow.init_state(1), feats=f_fast)
    torch.testing.assert_close(o_fast["all_cls_scores"], o_slow["all_cls_scores"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o_fast["all_bbox_preds"], o_slow["all_bbox_preds"], rtol=1e-4, atol=1e-4)


def test_collect_feats_channels_last_is_a_view_with_the_right_values():
    torch.manual_seed(0)
    model = build_model("tiny_raydn")
    f = torch.randn(6, 64, 8, 22).contiguous(memory_format=torch.channels_last)
    n = model.cfg.head.num_levels
    out = model.collect_feats([f] * n, 2)
    assert len(out) == n and out[0].shape == (2, 3, 64, 8, 22)
    assert out[0].data_ptr() == f.data_ptr()                  # no copy
    torch.testing.assert_close(out[0], f.contiguous().view(2, 3, 64, 8, 22))


def test_runtime_options_validate_and_reach_the_modules():
    with pytest.raises(ValueError, match="unknown sampler 'cuda_op'"):
        RuntimeOptions(sampler="cuda_op")
    with pytest.raises(ValueError, match="encoder_autocast"):
        RuntimeOptions(encoder_autocast=torch.float64)
    m = build_model("demo_raydn", options=RuntimeOptions(fold_bn=False, channels_last=False,
                                                         sampler="gather",
                                                         encoder_autocast=torch.bfloat16))
    assert not m.channels_last and m.encoder_autocast is torch.bfloat16
    assert all(not b.fold_bn for b in m.img_backbone.features[1:])
    dfa = m.pts_bbox_head.transformer.decoder.layers[-1].attentions[1]
    assert dfa.sampler.__name__ == "deformable_sample_gather"
    # automatic channels-last for the MobileNetV2 encoder, explicit True for the tiny one
    assert build_model("demo_raydn").channels_last
    assert build_model("tiny_raydn", options=RuntimeOptions(channels_last=True)).channels_last


def test_tiny_backbone_has_no_fast_path_side_effects():
    """Non-ResNet backbones keep contiguous weights (channels-last only where it pays)."""
    model = build_model("tiny_raydn")
    assert not model.channels_last
    conv = next(m for m in model.img_backbone.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()
    assert isinstance(build_backbone(BackboneConfig(name="resnet18")).fold_bn, bool)


def test_noise_dropout_semantics_and_gradient():
    from raydn.models.transformer import _NoiseDropout
    torch.manual_seed(0)
    x = torch.rand(200, 500, requires_grad=True) + 1.0
    y = _NoiseDropout.apply(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005             # keep probability 1 - p
    torch.testing.assert_close(y[kept], x[kept] / 0.9)                 # kept values scaled
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * kept / 0.9)


def test_explicit_attention_matches_sdpa_and_is_used_in_cpu_training():
    import torch.nn.functional as F

    import raydn.models.transformer as tr
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (7, 11, 11))
    blocked = torch.rand(7, 11, generator=g) < 0.5
    blocked[:, 3] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked)
    out = tr._attention_with_dropout(q, k, v, blocked, 1e-300)         # p ~ 0: no element dropped
    torch.testing.assert_close(out, ref)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b)
    # a fully blocked row falls back to SDPA (0 output for that row instead of NaN)
    full = blocked.clone()
    full[2] = True
    assert tr._explicit_ok(blocked) and not tr._explicit_ok(full) and tr._explicit_ok(None)
    # train mode + grad on CPU: the module takes the explicit path, dropout is active
    mha = tr.PackedMultiheadAttention(16, 4, dropout=0.5).train()
    x = torch.randn(1, 5, 16)
    calls = []
    orig = tr._attention_with_dropout
    try:
        tr._attention_with_dropout = lambda *a: calls.append(1) or orig(*a)
        y1, y2 = mha(x, x, x), mha(x, x, x)
        assert len(calls) == 2 and not torch.equal(y1, y2)
        mha.explicit_cpu_training = False                               # baseline: SDPA
        assert not mha.explicit_cpu_training
        mha(x, x, x)
        assert len(calls) == 2
    finally:
        tr._attention_with_dropout = orig
    with torch.no_grad():
        mha.eval()
        torch.testing.assert_close(mha(x, x, x), mha(x, x, x))
