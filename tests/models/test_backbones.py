"""Backbones and FPN: official key names/shapes, output shapes/strides, frozen BN, checkpointing,
channels_last, pretrained loading, tiny backbone."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import raydn.models.backbones.eva02 as eva_mod
import raydn.models.backbones.resnet as resnet_mod
from raydn.config import BackboneConfig, NeckConfig
from raydn.errors import CheckpointError
from raydn.models.backbones import EVA02ViT, ResNet, TinyBackbone, build_backbone
from raydn.models.backbones.eva02 import DropPath, window_partition, window_unpartition
from raydn.models.neck import FPN, build_neck


def _official_keys(official_dir, filename: str, prefix: str) -> dict:
    """{key without prefix: (shape tuple, dtype str)} for the lines of a key list starting with prefix."""
    out = {}
    for line in (official_dir / filename).read_text().splitlines():
        if not line.startswith(prefix):
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
        out[key[len(prefix):]] = (shape, dtype)
    assert out, f"no {prefix} keys in {filename}"
    return out


def _our_keys(module) -> dict:
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()}


def _assert_same_keys(ours: dict, official: dict):
    missing = sorted(set(official) - set(ours))
    extra = sorted(set(ours) - set(official))
    assert not missing and not extra, f"missing {missing[:8]}, extra {extra[:8]}"
    bad = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
    assert not bad, f"shape/dtype mismatches: {list(bad.items())[:8]}"


# ------------------------------------------------------------------------------ official key lists
def test_r50_keys_match_official(official_dir):
    model = build_backbone(BackboneConfig(name="resnet50"))
    _assert_same_keys(_our_keys(model), _official_keys(official_dir, "state_dict_keys.txt", "img_backbone."))


def test_fpn_keys_match_official(official_dir):
    neck = build_neck(NeckConfig())
    _assert_same_keys(_our_keys(neck), _official_keys(official_dir, "state_dict_keys.txt", "img_neck."))


def test_eva02l_keys_match_official_on_meta(official_dir):
    official = _official_keys(official_dir, "eva02L_state_dict_keys.txt", "img_backbone.")
    assert len(official) == 545
    cfg = BackboneConfig(name="eva02", img_size=320, embed_dim=1024, depth=24, num_heads=16,
                         window_size=16, global_window_size=20, drop_path_rate=0.3, out_channels=256)
    with torch.device("meta"):
        model = build_backbone(cfg)
    assert model.pos_embed.is_meta
    _assert_same_keys(_our_keys(model), official)
    # the RoPE modules are shared between the top level and the blocks (aliased keys, as officially)
    assert model.blocks[0].attn.rope is model.rope_win and model.blocks[2].attn.rope is model.rope_glb
    assert [b.window_size for b in model.blocks[:6]] == [16, 16, 20, 16, 16, 20]
    assert model.out_channels == (256,) * 4 and model.strides == (4, 8, 16, 32)
    # stochastic depth: linear 0 -> 0.3
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)


# -------------------------------------------------------------------------------- shapes, strides
def test_r50_fpn_output_shapes_256x704():
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet50")).eval()
    neck = build_neck(NeckConfig(), in_strides=backbone.strides).eval()
    assert backbone.out_channels == (256, 512, 1024, 2048) and backbone.strides == (4, 8, 16, 32)
    assert neck.strides == (8, 16, 32, 64) and neck.out_channels == (256,) * 4
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 256, 704))
        outs = neck(feats)
    assert isinstance(feats, tuple)
    assert [tuple(f.shape) for f in feats] == [(1, 256, 64, 176), (1, 512, 32, 88), (1, 1024, 16, 44),
                                               (1, 2048, 8, 22)]
    assert [tuple(o.shape) for o in outs] == [(1, 256, 32, 88), (1, 256, 16, 44), (1, 256, 8, 22),
                                              (1, 256, 4, 11)]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("name,channels", [("resnet18", (64, 128, 256, 512)), ("resnet34", (64, 128, 256, 512)),
                                           ("resnet101", (256, 512, 1024, 2048))])
def test_resnet_family_channels(name, channels):
    with torch.device("meta"):
        model = build_backbone(BackboneConfig(name=name))
    assert model.out_channels == channels
    n_blocks = {"resnet18": 8, "resnet34": 16, "resnet101": 33}[name]
    assert sum(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == n_blocks


def test_resnet18_forward_and_out_indices():
    model = ResNet(depth=18, out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert model.out_channels == (128, 512) and model.strides == (8, 32)
    assert [tuple(o.shape) for o in outs] == [(2, 128, 8, 12), (2, 512, 2, 3)]


def test_fpn_semantics():
    """Top-down = nearest upsample to the lower level's size; the extra level is a stride-2 conv on
    the P5 *output* with no ReLU; no activation anywhere."""
    torch.manual_seed(0)
    fpn = FPN(in_channels=(4, 6, 8, 10), out_channels=5, start_level=1, num_outs=4).eval()
    ins = [torch.randn(1, c, h, w) for c, h, w in ((4, 32, 44), (6, 16, 22), (8, 8, 11), (10, 4, 6))]
    with torch.no_grad():
        outs = fpn(ins)
        l2 = fpn.lateral_convs[2](ins[3])
        rows, cols = torch.arange(8) * 4 // 8, torch.arange(11) * 6 // 11   # nearest: floor(dst * in / out)
        l1 = fpn.lateral_convs[1](ins[2]) + l2[:, :, rows][:, :, :, cols]
        l0 = fpn.lateral_convs[0](ins[1]) + l1.repeat_interleave(2, 2).repeat_interleave(2, 3)
        p5 = F.conv2d(l2, fpn.fpn_convs[2].conv.weight, fpn.fpn_convs[2].conv.bias, padding=1)
        p6 = F.conv2d(p5, fpn.fpn_convs[3].conv.weight, fpn.fpn_convs[3].conv.bias, stride=2, padding=1)
        p3 = fpn.fpn_convs[0](l0)
    assert torch.allclose(outs[2], p5, atol=1e-6)
    assert torch.allclose(outs[3], p6, atol=1e-6)
    assert torch.allclose(outs[0], p3, atol=1e-6)
    assert torch.allclose(outs[1], fpn.fpn_convs[1](l1), atol=1e-6)
    assert (outs[3] < 0).any()  # no ReLU on the output
    # Xavier-uniform init, zero bias
    w = fpn.lateral_convs[2].conv.weight
    bound = (6.0 / (10 + 5)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    assert all(m.conv.bias.abs().sum() == 0 for m in [*fpn.lateral_convs, *fpn.fpn_convs])


def test_build_neck_disabled_and_unknown_backbone():
    assert build_neck(NeckConfig(enabled=False)) is None
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone(BackboneConfig(name="vgg16"))


# ----------------------------------------------------------------------------------- frozen BN
def test_frozen_bn_stays_frozen_in_train_mode():
    torch.manual_seed(0)
    model = ResNet(depth=18, frozen_stages=1)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    # frozen stem and layer1: no trainable parameters; later convs train
    assert not model.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert model.layer2[0].conv1.weight.requires_grad
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model(torch.randn(2, 3, 64, 64) * 3 + 1).__getitem__(-1).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.layer2[0].conv1.weight.grad is not None and model.conv1.weight.grad is None


def test_unfrozen_bn_trains():
    model = ResNet(depth=18, norm_eval=False, bn_requires_grad=True).train()
    model(torch.randn(2, 3, 32, 32))
    assert model.bn1.training and model.bn1.weight.requires_grad
    assert int(model.bn1.num_batches_tracked) == 1


# ------------------------------------------------------------------------------- checkpointing
def _count_checkpoint_calls(monkeypatch, module):
    calls = []
    real = module.cp.checkpoint

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(module.cp, "checkpoint", spy)
    return calls


def _outputs_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


def test_resnet_checkpointing_same_outputs_and_grads(monkeypatch):
    torch.manual_seed(0)
    plain = ResNet(depth=18, with_cp=False, zero_init_residual=False).train()
    ckpt = ResNet(depth=18, with_cp=True, zero_init_residual=False).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    calls = _count_checkpoint_calls(monkeypatch, resnet_mod)
    o1, g1 = _outputs_and_grads(plain, x)
    assert not calls
    o2, g2 = _outputs_and_grads(ckpt, x)
    assert len(calls) == 8  # one per residual block
    assert len(g1) == len(g2) > 0
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-5)
    # no checkpointing in eval mode or without grad
    calls.clear()
    with torch.no_grad():
        ckpt(x)
    ckpt.eval()(x)
    assert not calls


def _tiny_eva(**kw):
    args = dict(img_size=64, embed_dim=32, depth=3, num_heads=2, window_size=2, global_window_size=4,
                out_channels=8, drop_path_rate=0.0)
    args.update(kw)
    return EVA02ViT(**args)


def test_eva_checkpointing_same_outputs_and_grads_with_drop_path(monkeypatch):
    torch.manual_seed(0)
    plain = _tiny_eva(drop_path_rate=0.5, with_cp=False).train()
    ckpt = _tiny_eva(drop_path_rate=0.5, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 48, 80)  # 3 x 5 tokens: padding for both window sizes
    calls = _count_checkpoint_calls(monkeypatch, eva_mod)
    o1, g1 = _outputs_and_grads(plain, x, seed=3)
    o2, g2 = _outputs_and_grads(ckpt, x, seed=3)
    assert len(calls) == 3
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert g1.keys() == g2.keys() and "pos_embed" in g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4)
    # drop path is active in training (a different seed gives different outputs) but not in eval
    o3, _ = _outputs_and_grads(plain, x, seed=4)
    assert not torch.allclose(o1[2], o3[2])
    plain.eval()
    with torch.no_grad():
        e1, e2 = plain(x), plain(x)
    assert torch.equal(e1[0], e2[0])


def test_drop_path_per_sample():
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    x = torch.ones(2000, 3, 4)
    y = dp(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()   # whole samples dropped, kept x/keep
    assert 0.45 < (per_sample[:, 0] == 0).float().mean() < 0.55
    assert torch.equal(dp.eval()(x), x)


def test_window_partition_roundtrip_with_padding():
    x = torch.randn(2, 5, 7, 3)
    win, pad_hw = window_partition(x, 4)
    assert pad_hw == (8, 8) and tuple(win.shape) == (8, 4, 4, 3)
    assert torch.equal(win[1, :, :3], x[0, :4, 4:7])          # window (0, 1) of sample 0
    assert (win[1, :, 3] == 0).all() and (win[3, 1:] == 0).all()  # zero padding right / bottom
    assert torch.equal(window_unpartition(win, 4, pad_hw, (5, 7)), x)


def test_eva_fp16_attention_option_rounds_qkv():
    torch.manual_seed(0)
    model = _tiny_eva().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
        model.set_fp16_attention(True)
        b = model(x)
    diff = max((p - q).abs().max().item() for p, q in zip(a, b))
    assert 1e-6 < diff < 1e-2


# ------------------------------------------------------------------------------ channels_last
def test_resnet_fpn_channels_last_transparent():
    torch.manual_seed(0)
    backbone, neck = ResNet(depth=18).eval(), FPN(in_channels=(64, 128, 256, 512)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = neck(backbone(x))
        backbone.to(memory_format=torch.channels_last)
        neck.to(memory_format=torch.channels_last)
        out = neck(backbone(x.contiguous(memory_format=torch.channels_last)))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- pretrained loading
def test_load_pretrained_torchvision_and_mmdet_styles(tmp_path):
    torch.manual_seed(0)
    src = ResNet(depth=18)
    for p in src.parameters():
        p.data.normal_()
    sd = src.state_dict()
    # torchvision style: bare names plus the classifier, saved through DataParallel ("module.")
    tv = {f"module.{k}": v for k, v in sd.items()}
    tv["module.fc.weight"], tv["module.fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(tv, tmp_path / "tv.pth")
    dst = ResNet(depth=18)
    rep = dst.load_pretrained(tmp_path / "tv.pth")
    assert sorted(rep.ignored) == ["fc.bias", "fc.weight"]
    assert not rep.missing and not rep.unexpected and len(rep.loaded) == len(sd)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in sd.items())
    # mmdet detector style: {'state_dict': {'backbone.*', 'neck.*', ...}, 'meta': ...}
    mm = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items() if "num_batches" not in k},
                         "neck.lateral_convs.0.conv.weight": torch.zeros(256, 64, 1, 1)}, "meta": {"epoch": 20}}
    torch.save(mm, tmp_path / "mm.pth")
    dst = ResNet(depth=18)
    rep = dst.load_pretrained(tmp_path / "mm.pth")
    assert not rep.unexpected and all(k.endswith("num_batches_tracked") for k in rep.missing)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert "loaded" in rep.summary()


def test_load_pretrained_errors(tmp_path):
    model = ResNet(depth=18)
    with pytest.raises(CheckpointError, match="not found"):
        model.load_pretrained(tmp_path / "nope.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="shape"):
        model.load_pretrained(tmp_path / "bad.pth")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no key matches"):
        model.load_pretrained(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------ tiny
def test_tiny_backbone_shapes_and_training():
    torch.manual_seed(0)
    cfg = BackboneConfig(name="tiny", frozen_bn=False, out_channels=64)
    model = build_backbone(cfg)
    assert isinstance(model, TinyBackbone)
    assert model.out_channels == (64,) * 4 and model.strides == (8, 16, 32, 64)
    x = torch.randn(6, 3, 128, 352)
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(6, 64, 16, 44), (6, 64, 8, 22), (6, 64, 4, 11), (6, 64, 2, 6)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.stem[0][1].training  # BN trains when not frozen
    frozen = build_backbone(replace(cfg, frozen_bn=True)).train()
    assert not frozen.stem[0][1].training and not frozen.stem[0][1].weight.requires_grad
