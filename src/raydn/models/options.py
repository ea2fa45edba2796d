"""Speed and backend choices of a detector, given once at construction (one place).

None of them changes results beyond float rounding; they pick *how* the same maths is computed::

    build_model("r50_raydn")                                        # library defaults (fast paths)
    build_model("r50_raydn", options=RuntimeOptions.baseline())     # plain reference paths
    build_model("tiny_raydn", options=RuntimeOptions.for_export())  # ONNX-traceable paths

``benchmarks/bench_speed.py`` builds its "baseline" with :meth:`RuntimeOptions.baseline`;
``raydn export`` uses :meth:`RuntimeOptions.for_export` (the plain ``grid_sample`` sampler: the fused
sampling op is a custom autograd function that no ONNX exporter can trace).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["RuntimeOptions", "SAMPLER_NAMES"]

#: Names accepted by :attr:`RuntimeOptions.sampler` (see :data:`raydn.models.deformable.SAMPLERS`).
SAMPLER_NAMES = ("fused", "gather", "grid_sample")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a :class:`~raydn.models.detector.RayDNDetector` computes (not what).

    Attributes:
        fold_bn: fold eval-mode (frozen) BatchNorms into the preceding convolutions of the
            ResNet / MobileNetV2 backbones (:func:`raydn.models.backbones.resnet.conv_bn`).
        channels_last: run backbone + neck (+ aux head) in the channels-last memory layout;
            ``None`` = automatic: on for ResNet / MobileNetV2 backbones (convolution-bound, ~1.3x
            faster on CPU), off otherwise.
        sampler: deformable sampling implementation of the head: ``"fused"`` (custom autograd op
            with a hand-written backward, the default), ``"gather"`` (embedding-bag forward,
            autograd backward) or ``"grid_sample"`` (the plain reference, exportable).
        encoder_autocast: autocast dtype of backbone + neck in training (official: fp16 only
            there), or None for fp32 (the trainer builds its model with the run's ``--amp``).
        explicit_cpu_training: CPU training self-attention through the explicit fused-mask path
            with the cheaper dropout (``PackedMultiheadAttention.explicit_cpu_training``).
    """
    fold_bn: bool = True
    channels_last: bool | None = None
    sampler: str = "fused"
    encoder_autocast: torch.dtype | None = None
    explicit_cpu_training: bool = True

    def __post_init__(self):
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"RuntimeOptions.sampler: unknown sampler {self.sampler!r}; "
                             f"expected one of {', '.join(SAMPLER_NAMES)}")
        if self.encoder_autocast not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"RuntimeOptions.encoder_autocast: expected None, torch.float16 or "
                             f"torch.bfloat16, got {self.encoder_autocast!r}")

    @classmethod
    def baseline(cls) -> "RuntimeOptions":
        """Every optimisation off: unfolded BN, contiguous NCHW, ``grid_sample`` sampler, SDPA."""
        return cls(fold_bn=False, channels_last=False, sampler="grid_sample",
                   explicit_cpu_training=False)

    @classmethod
    def for_export(cls) -> "RuntimeOptions":
        """Traceable paths for ONNX export: the ``grid_sample`` sampler (ONNX ``GridSample``),
        plain BatchNorms (onnxruntime fuses Conv + BN itself), contiguous layout, fp32."""
        return cls(fold_bn=False, channels_last=False, sampler="grid_sample",
                   explicit_cpu_training=False)

    def replace(self, **changes) -> "RuntimeOptions":
        return replace(self, **changes)
