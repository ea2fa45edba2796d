"""ResNet-18/34/50/101 as mmdet builds it ("pytorch" style), with torchvision/mmdet parameter names.

Names: ``conv1``, ``bn1``, ``layer{1..4}.{b}.conv{1,2,3}`` / ``.bn{1,2,3}`` / ``.downsample.{0,1}``,
no ``fc`` -- identical to the official checkpoint keys after the ``img_backbone.`` prefix (spec §11.1).

Behaviour (spec §3.4, official config): stem 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, stride of a stage
on the 3x3 conv of its first block, BN frozen (``requires_grad=False`` and kept in eval mode even when
the module is put in train mode, mmdet ``norm_eval=True``), ``frozen_stages`` (stem = stage 0),
optional per-block gradient checkpointing (``with_cp``, active only in training with grad enabled).

Input: images (B, 3, H, W) float, normalised. Output: tuple of the feature maps of ``out_indices``
(0 = C2 at stride 4 ... 3 = C5 at stride 32), each (B, C_i, H/s_i, W/s_i). Works unchanged with
``torch.channels_last`` (convert the module and the input with ``.to(memory_format=...)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from raydn.models.backbones.pretrained import LoadReport, load_backbone_weights

# depth -> (block type, blocks per stage)
ARCH = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool = True) -> torch.Tensor:
    """``bn(conv(x))``. When ``fold`` and ``bn`` is in eval mode (running statistics: the frozen BN
    of the official config) it is one affine map per channel, folded into the convolution:
    ``conv(x, W * s) + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``. Same result up to
    float rounding, one pass over the activation instead of two, and no BN backward; gradients
    still reach ``W`` (and ``gamma``/``beta`` when they require grad) through ``W * s``."""
    if not fold or bn.training or bn.running_var is None or not bn.affine or conv.padding_mode != "zeros":
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    w = conv.weight * scale.view(-1, 1, 1, 1)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        w = w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


class _CheckpointedBlock(nn.Module):
    """Runs ``_residual(x)`` (everything up to and including the identity add) under activation
    checkpointing when ``with_cp`` and training with grad enabled, then the final ReLU (as mmdet).
    ``fold_bn``: fold eval-mode BatchNorms into the convolutions (see :func:`conv_bn`)."""
    with_cp: bool = False
    fold_bn: bool = True

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        ds = self.downsample
        if ds is None:
            return x
        if isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[1], nn.BatchNorm2d):
            return conv_bn(ds[0], ds[1], x, self.fold_bn)
        return ds(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            out = cp.checkpoint(self._residual, x, use_reentrant=False)
        else:
            out = self._residual(x)
        return F.relu(out, inplace=True)


class BasicBlock(_CheckpointedBlock):
    """3x3 (stride s) -> BN -> ReLU -> 3x3 -> BN, + identity. Expansion 1 (ResNet-18/34)."""
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 with_cp: bool = False):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.with_cp = with_cp

    def _residual(self, x):
        f = self.fold_bn
        out = F.relu(conv_bn(self.conv1, self.bn1, x, f), inplace=True)
        out = conv_bn(self.conv2, self.bn2, out, f)
        return out.add_(self._shortcut(x))  # in place: conv outputs are not saved for backward


class Bottleneck(_CheckpointedBlock):
    """1x1 -> BN -> ReLU -> 3x3 (stride s, "pytorch" style) -> BN -> ReLU -> 1x1 (x4) -> BN, + identity."""
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 with_cp: bool = False):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.with_cp = with_cp

    def _residual(self, x):
        f = self.fold_bn
        out = F.relu(conv_bn(self.conv1, self.bn1, x, f), inplace=True)
        out = F.relu(conv_bn(self.conv2, self.bn2, out, f), inplace=True)
        out = conv_bn(self.conv3, self.bn3, out, f)
        return out.add_(self._shortcut(x))  # in place: conv outputs are not saved for backward


class ResNet(nn.Module):
    """mmdet-compatible ResNet (see module docstring).

    Args:
        depth: 18, 34, 50 or 101.
        out_indices: stages to return, 0..3 (C2..C5).
        frozen_stages: -1 = nothing frozen; k >= 0 freezes the stem and stages 1..k (params and BN).
        norm_eval: keep every BatchNorm in eval mode (running statistics fixed) in train mode.
        bn_requires_grad: whether BN affine parameters are trainable (official: False).
        with_cp: gradient checkpointing per residual block.
        zero_init_residual: init the last BN of each block to 0 (mmdet default for fresh weights).

    Attributes: ``out_channels`` (tuple per output), ``strides`` (tuple per output, pixels).
    """

    def __init__(self, depth: int = 50, out_indices=(0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = True, bn_requires_grad: bool = False, with_cp: bool = False,
                 zero_init_residual: bool = True):
        super().__init__()
        if depth not in ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(ARCH)}, got {depth}")
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f"out_indices must be a non-empty subset of 0..3, got {out_indices}")
        kind, blocks = ARCH[depth]
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        #: fold eval-mode BatchNorms into the convolutions (exact up to rounding; see conv_bn)
        self.fold_bn = True

        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        stage_channels = []
        for s, n in enumerate(blocks):
            planes = 64 * 2 ** s
            stride = 1 if s == 0 else 2
            cout = planes * block_cls.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            layers = [block_cls(cin, planes, stride, downsample, with_cp)]
            layers += [block_cls(cout, planes, 1, None, with_cp) for _ in range(n - 1)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*layers))
            stage_channels.append(cout)
            cin = cout
        self.out_channels = tuple(stage_channels[i] for i in self.out_indices)
        self.strides = tuple(4 * 2 ** i for i in self.out_indices)

        self._init_weights(zero_init_residual)
        if not bn_requires_grad:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)
        self._freeze_stages()

    def _init_weights(self, zero_init_residual: bool) -> None:
        """mmdet defaults: Kaiming-normal (fan_out, relu) convs, BN weight 1 / bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods = [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def set_fold_bn(self, enabled: bool) -> None:
        """Fold (or not) the eval-mode BatchNorms of the stem and of every block."""
        self.fold_bn = bool(enabled)
        for m in self.modules():
            if isinstance(m, _CheckpointedBlock):
                m.fold_bn = bool(enabled)

    def train(self, mode: bool = True):
        """Like ``nn.Module.train`` but frozen stages and (``norm_eval``) all BatchNorms stay in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple:
        """x (B, 3, H, W) -> tuple of (B, C_i, H/s_i, W/s_i) for ``out_indices``."""
        x = self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, x, self.fold_bn), inplace=True))
        outs = []
        for i in range(max(self.out_indices) + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def load_pretrained(self, path) -> LoadReport:
        """Load torchvision (``fc.*`` ignored), mmdet (``backbone.*``) or official RayDN
        (``img_backbone.*``) weights; returns a :class:`LoadReport`, raises ``CheckpointError``."""
        return load_backbone_weights(self, path)
