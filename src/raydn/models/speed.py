"""Switches of the speed optimisations that are not the default maths path (one place).

:func:`set_fast_paths` turns them on or off on a built detector or head; the benchmark
``benchmarks/bench_speed.py`` uses it to build its "baseline" (everything off, plus the
``grid_sample`` reference sampler). None of them changes results beyond float rounding.
"""
from __future__ import annotations

import torch
from torch import nn


def set_fast_paths(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Enable (default) or disable the fast paths of ``model`` (a ``RayDNDetector``, or any module
    containing one): channels-last backbone / neck / aux head, eval-mode BatchNorms folded into the
    ResNet convolutions, explicit CPU training self-attention with the cheaper dropout
    (``PackedMultiheadAttention.explicit_cpu_training``). Returns ``model``."""
    fmt = torch.channels_last if enabled else torch.contiguous_format
    for m in model.modules():
        if hasattr(m, "fold_bn"):
            m.fold_bn = enabled
        if hasattr(m, "explicit_cpu_training"):
            m.explicit_cpu_training = enabled
        if hasattr(m, "img_backbone") and hasattr(m, "channels_last"):
            m.channels_last = enabled
            for part in (m.img_backbone, m.img_neck, m.img_roi_head):
                if part is not None:
                    part.to(memory_format=fmt)
    return model
