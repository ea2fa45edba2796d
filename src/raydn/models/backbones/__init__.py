"""Image backbones: ResNet-18/34/50/101 (feeds the FPN), EVA02 ViT + SimpleFeaturePyramid, tiny CPU net.

``build_backbone(cfg)`` returns an ``nn.Module`` mapping images (B, 3, H, W) to a sequence of feature
maps, with attributes ``out_channels`` (tuple per output) and ``strides`` (tuple per output, pixels):

=============  ===========================  ===================  =========================
name           outputs                      strides              neck
=============  ===========================  ===================  =========================
resnet18/34    C2..C5 (64, 128, 256, 512)   4, 8, 16, 32         FPN (set in_channels)
resnet50/101   C2..C5 (256, ..., 2048)      4, 8, 16, 32         FPN (official)
eva02          4 x out_channels             4, 8, 16, 32         none (pyramid inside)
tiny           4 x out_channels             8, 16, 32, 64        none (mini-FPN inside)
mobilenet_v2   4 x out_channels             8, 16, 32, 64        none (mini-FPN inside)
=============  ===========================  ===================  =========================
"""
from __future__ import annotations

from torch import nn

from raydn.config import BackboneConfig
from raydn.models.backbones.eva02 import EVA02ViT, build_eva02
from raydn.models.backbones.mobilenet import MobileNetV2Backbone
from raydn.models.backbones.pretrained import LoadReport, load_backbone_weights
from raydn.models.backbones.resnet import ResNet
from raydn.models.backbones.tiny import TinyBackbone

__all__ = ["build_backbone", "ResNet", "EVA02ViT", "TinyBackbone", "MobileNetV2Backbone", "LoadReport",
           "load_backbone_weights"]

_RESNET_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the backbone named by ``cfg.name`` (see the module table)."""
    if cfg.name in _RESNET_DEPTHS:
        return ResNet(depth=_RESNET_DEPTHS[cfg.name], out_indices=cfg.out_indices,
                      frozen_stages=cfg.frozen_stages, norm_eval=cfg.frozen_bn,
                      bn_requires_grad=not cfg.frozen_bn, with_cp=cfg.with_cp)
    if cfg.name == "eva02":
        return build_eva02(cfg)
    if cfg.name == "tiny":
        return TinyBackbone(out_channels=cfg.out_channels, frozen_bn=cfg.frozen_bn)
    if cfg.name == "mobilenet_v2":
        return MobileNetV2Backbone(out_channels=cfg.out_channels, frozen_stages=cfg.frozen_stages,
                                   frozen_bn=cfg.frozen_bn)
    raise ValueError(f"BackboneConfig.name: unknown backbone {cfg.name!r}; expected one of "
                     f"{', '.join([*_RESNET_DEPTHS, 'eva02', 'tiny', 'mobilenet_v2'])}")
