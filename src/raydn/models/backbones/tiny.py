"""A small CPU backbone for tests and the demo (``BackboneConfig(name='tiny')``), with its own mini-FPN.

Design (no official counterpart): a ResNet-18-style encoder with one BasicBlock per stage
(``widths`` = 32, 64, 128, 256 at strides 8, 16, 32, 64 after a two-conv stride-4 stem), then a
lightweight FPN built in: 1x1 laterals to ``out_channels``, nearest top-down addition, one 3x3 conv per
level. It therefore returns the four levels the head expects (strides 8/16/32/64, like R50 + FPN)
directly at ``out_channels`` channels, so the model needs no separate neck (``NeckConfig(enabled=False)``).

Input: images (B, 3, H, W). Output: list of 4 maps (B, out_channels, ceil(H/s), ceil(W/s)),
s = 8, 16, 32, 64. About 0.05-0.1 s for 6 x 3 x 128 x 352 on two CPU cores (see benchmarks).
BatchNorm trains normally unless ``frozen_bn`` (then frozen like the ResNet's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydn.models.backbones.resnet import BasicBlock


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """Tiny ResNet-style encoder + built-in mini-FPN (see module docstring).

    Attributes: ``out_channels`` (tuple, 4 x out_channels), ``strides`` (8, 16, 32, 64).
    """

    def __init__(self, out_channels: int = 64, widths=(32, 64, 128, 256), stem_widths=(16, 32),
                 frozen_bn: bool = False):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(3, stem_widths[0], 2), _conv_bn_relu(stem_widths[0], stem_widths[1], 2))
        stages = []
        cin = stem_widths[1]
        for w in widths:
            down = nn.Sequential(nn.Conv2d(cin, w, 1, stride=2, bias=False), nn.BatchNorm2d(w))
            stages.append(BasicBlock(cin, w, stride=2, downsample=down))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(w, out_channels, 1) for w in widths)
        self.out_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in widths)
        self.out_channels = (out_channels,) * len(widths)
        self.strides = tuple(8 * 2 ** i for i in range(len(widths)))
        self.frozen_bn = frozen_bn
        self._init_weights()
        if frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m.bias is None:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:  # FPN-style convs
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list:
        """x (B, 3, H, W) -> list of 4 maps (B, out_channels, H/s, W/s), s = 8, 16, 32, 64."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return top_down_fpn(feats, self.lateral_convs, self.out_convs)


def top_down_fpn(feats, lateral_convs, out_convs) -> list:
    """Mini-FPN: 1x1 laterals, nearest top-down addition (coarse -> fine), one conv per level.
    ``feats`` fine-to-coarse list of (B, C_i, H_i, W_i) -> list of (B, C_out, H_i, W_i)."""
    lat = [conv(f) for conv, f in zip(lateral_convs, feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    return [conv(t) for conv, t in zip(out_convs, lat)]
