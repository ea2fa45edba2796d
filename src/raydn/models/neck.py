"""mmdet FPN as configured by the official R50 RayDN model (spec §3.4, §11.2).

``FPN(in_channels=(256, 512, 1024, 2048), out_channels=256, start_level=1, num_outs=4)``:
lateral 1x1 convs (bias, no norm/activation) on inputs[start_level:], top-down pathway
``lateral[i-1] += nearest_upsample(lateral[i], size=lateral[i-1].shape)``, a 3x3 conv (bias) on each,
then extra levels: the first is a 3x3 stride-2 conv on the **last FPN output** (mmdet
``add_extra_convs='on_output'``, no ReLU before it); later extra levels (none in the official
config) get a ReLU first (``relu_before_extra_convs=True``). No activations elsewhere.

Parameter names equal the official keys after ``img_neck.``: ``lateral_convs.{i}.conv.*``,
``fpn_convs.{i}.conv.*`` (mmcv ``ConvModule`` wraps the conv as ``.conv``). Init: Xavier-uniform
weights (gain 1), zero bias (mmdet ``FPN`` ``init_cfg``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydn.config import NeckConfig


class ConvModule(nn.Module):
    """A bare conv named ``.conv`` (mmcv ConvModule without norm / activation)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """Feature pyramid network (mmdet semantics, see module docstring).

    Input: sequence of backbone maps, ``inputs[i]`` (B, in_channels[i], H_i, W_i).
    Output: list of ``num_outs`` maps (B, out_channels, H_j, W_j): the FPN levels of
    inputs[start_level:] followed by the stride-2 extra levels.

    Attributes: ``out_channels`` (tuple per output) and ``strides`` (tuple per output; derived
    from ``in_strides``, default backbone strides 4, 8, 16, 32).
    """

    def __init__(self, in_channels=(256, 512, 1024, 2048), out_channels: int = 256, start_level: int = 1,
                 num_outs: int = 4, relu_before_extra_convs: bool = True, in_strides=(4, 8, 16, 32)):
        super().__init__()
        in_channels = tuple(in_channels)
        n_used = len(in_channels) - start_level
        if n_used < 1 or num_outs < n_used:
            raise ValueError(f"FPN: need start_level < len(in_channels) and num_outs >= used levels; got "
                             f"in_channels={in_channels}, start_level={start_level}, num_outs={num_outs}")
        self.in_channels = in_channels
        self.start_level = start_level
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1) for c in in_channels[start_level:])
        convs = [ConvModule(out_channels, out_channels, 3, padding=1) for _ in range(n_used)]
        convs += [ConvModule(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(num_outs - n_used)]
        self.fpn_convs = nn.ModuleList(convs)
        self.out_channels = (out_channels,) * num_outs
        base = tuple(in_strides)[start_level:]
        self.strides = base + tuple(base[-1] * 2 ** (k + 1) for k in range(num_outs - n_used))
        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1.0)
                nn.init.zeros_(m.bias)

    def forward(self, inputs) -> list:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} input maps, got {len(inputs)}")
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        n_used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(n_used)]
        for i in range(n_used, self.num_outs):
            src = outs[-1]
            if i > n_used and self.relu_before_extra_convs:
                src = F.relu(src)
            outs.append(self.fpn_convs[i](src))
        return outs


def build_neck(cfg: NeckConfig, in_strides=(4, 8, 16, 32)) -> FPN | None:
    """The official FPN from ``cfg``; ``None`` when ``cfg.enabled`` is False (EVA02, tiny)."""
    if not cfg.enabled:
        return None
    return FPN(in_channels=cfg.in_channels, out_channels=cfg.out_channels, start_level=cfg.start_level,
               num_outs=cfg.num_outs, relu_before_extra_convs=True, in_strides=in_strides)
