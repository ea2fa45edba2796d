"""Small building blocks of the RayDN head (spec §5.1, §7.1).

Module/attribute names follow the official checkpoint so that state dicts load 1:1.
"""
from __future__ import annotations

import math

from torch import Tensor, nn


class MLN(nn.Module):
    """Modulated layer norm (the MLN defined at the bottom of the official ``raydn_head.py``).

    ``out = gamma(reduce(c)) * LN(x) + beta(reduce(c))`` with ``LN`` a LayerNorm without affine
    parameters (skipped when ``use_ln=False``). Initialised to the identity (or plain LN):
    ``gamma.W = 0, gamma.b = 1, beta.W = 0, beta.b = 0``.

    Shapes: ``x`` (..., f_dim), ``c`` (..., c_dim) broadcastable to ``x``'s leading dims.
    """

    def __init__(self, c_dim: int, f_dim: int = 256, use_ln: bool = True):
        super().__init__()
        self.c_dim = c_dim
        self.f_dim = f_dim
        self.use_ln = use_ln
        self.reduce = nn.Sequential(nn.Linear(c_dim, f_dim), nn.ReLU())
        self.gamma = nn.Linear(f_dim, f_dim)
        self.beta = nn.Linear(f_dim, f_dim)
        if use_ln:
            self.ln = nn.LayerNorm(f_dim, elementwise_affine=False)
        self.init_weight()

    def init_weight(self) -> None:
        nn.init.zeros_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.use_ln:
            x = self.ln(x)
        c = self.reduce(c)
        return self.gamma(c) * x + self.beta(c)


class FFN(nn.Module):
    """mmcv ``FFN`` as used by the official decoder layer: ``x + fc2(relu(fc1(x)))``.

    Official default width 1024 and no dropout (spec §7.4). Keys: ``layers.0.0`` (fc1),
    ``layers.1`` (fc2). Shapes: (..., embed_dims) -> (..., embed_dims).
    """

    def __init__(self, embed_dims: int = 256, feedforward_channels: int = 1024):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True)),
            nn.Linear(feedforward_channels, embed_dims),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.layers(x)


def build_cls_branch(embed_dims: int, num_classes: int, num_reg_fcs: int = 2) -> nn.Sequential:
    """Official classification branch: ``num_reg_fcs`` x (Linear, LayerNorm, ReLU) + Linear."""
    layers: list[nn.Module] = []
    for _ in range(num_reg_fcs):
        layers += [nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(embed_dims, num_classes))
    return nn.Sequential(*layers)


def build_reg_branch(embed_dims: int, code_size: int = 10, num_reg_fcs: int = 2) -> nn.Sequential:
    """Official regression branch: ``num_reg_fcs`` x (Linear, ReLU) + Linear(code_size)."""
    layers: list[nn.Module] = []
    for _ in range(num_reg_fcs):
        layers += [nn.Linear(embed_dims, embed_dims), nn.ReLU()]
    layers.append(nn.Linear(embed_dims, code_size))
    return nn.Sequential(*layers)


def tied_module_list(module: nn.Module, n: int) -> nn.ModuleList:
    """A ModuleList holding the SAME module ``n`` times (official tied branches). Its state dict
    lists all ``n`` copies (``{i}.…``), as the official checkpoints do."""
    return nn.ModuleList([module for _ in range(n)])


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias so that ``sigmoid(bias) == prior_prob`` (mmcv helper; 0.01 -> -4.595). Computed in
    float64 like mmcv's ``np.log`` (and so that it works under ``torch.device('meta')``)."""
    return float(-math.log((1 - prior_prob) / prior_prob))
