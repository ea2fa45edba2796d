"""The full detector (official ``RepDetr3D``): image backbone -> neck -> RayDN head, plus the
auxiliary YOLOX 2D head and GridMask in training. The criterion is separate
(:class:`raydn.models.criterion.RayDNCriterion`) and holds no state-dict entries.

Temporal state is explicit::

    model = raydn.build_model("r50_raydn").eval()
    state = model.init_state(batch_size=1)
    for batch in frames:                      # FrameBatch, one frame per slot
        detections, state = model.predict(batch, state)

Attribute names equal the official checkpoint prefixes (``img_backbone``, ``img_neck``,
``img_roi_head``, ``pts_bbox_head``), so official state dicts load 1:1 (see ``raydn.interop``).
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import Tensor, nn

from raydn.config import ModelConfig
from raydn.core.batch import FrameBatch, check_frame_batch
from raydn.core.outputs import Selection
from raydn.core.state import TemporalState
from raydn.errors import CheckpointError
from raydn.models.aux_head import build_aux_head
from raydn.models.backbones import MobileNetV2Backbone, ResNet, build_backbone
from raydn.models.backbones.mobilenet import resolve_pretrained
from raydn.models.backbones.pretrained import load_backbone_weights
from raydn.models.criterion import RayDNCriterion
from raydn.models.decode import decode
from raydn.models.depth_head import DenseDepthHead
from raydn.models.grid_mask import GridMask
from raydn.models.head import RayDNHead
from raydn.models.neck import build_neck
from raydn.models.options import RuntimeOptions
from raydn.models.transformer import PackedMultiheadAttention


class RayDNDetector(nn.Module):
    """``options``: the speed/backend choices (:class:`raydn.models.options.RuntimeOptions`; default:
    the library's fast paths), fixed at construction and kept as :attr:`options` (the encoder's
    autocast dtype among them). Nothing is set on a built detector from outside: a training loop
    that caches the frozen stem passes the cached maps to :meth:`forward` / :meth:`forward_train`
    (``stem=``)."""

    def __init__(self, cfg: ModelConfig, options: RuntimeOptions | None = None):
        super().__init__()

        self.cfg = cfg
        self.options = RuntimeOptions() if options is None else options
        self.img_backbone = build_backbone(cfg.backbone)
        self.img_neck = build_neck(cfg.neck) if cfg.neck.enabled else None
        if cfg.aux_head.enabled:
            self.img_roi_head = build_aux_head(cfg.aux_head)
        else:
            self.img_roi_head = None
        self.pts_bbox_head = RayDNHead(cfg.head, sampler=self.options.sampler)
        if cfg.use_grid_mask:
            self.grid_mask = GridMask()
        else:
            self.grid_mask = None
        self.criterion = RayDNCriterion(cfg.head)
        # dense depth supervision (not official, training only): built last, so the other modules'
        # initial weights are the same with and without it
        if cfg.depth.enabled:
            encoder = self.img_neck if self.img_neck is not None else self.img_backbone
            self.depth_head = DenseDepthHead(cfg.depth, encoder.out_channels[-1], cfg.head.num_levels)
        else:
            self.depth_head = None
        #: run backbone + neck (+ aux head) in the channels-last layout (``options.channels_last``)
        self.channels_last = False
        self._apply_options()
        self.preset: str | None = None

    @property
    def encoder_autocast(self) -> torch.dtype | None:
        """Autocast dtype of backbone + neck in training (official: fp16 only there), None = fp32:
        ``options.encoder_autocast``, fixed at construction."""
        return self.options.encoder_autocast

    def _apply_options(self) -> None:
        """Put :attr:`options` into the built modules (BN folding, memory layout, attention path)."""
        opts = self.options
        conv_encoder = isinstance(self.img_backbone, (ResNet, MobileNetV2Backbone))
        if conv_encoder:
            self.img_backbone.set_fold_bn(opts.fold_bn)
        self.channels_last = conv_encoder if opts.channels_last is None else bool(opts.channels_last)
        if self.channels_last:
            for part in (self.img_backbone, self.img_neck, self.img_roi_head):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        for m in self.pts_bbox_head.modules():
            if isinstance(m, PackedMultiheadAttention):
                m.explicit_cpu_training = opts.explicit_cpu_training

    def load_pretrained_backbone(self, source: str | None = None, trust: bool = False):
        """Load backbone weights from ``source`` (default ``cfg.backbone.pretrained``): a ``.pth``
        path or ``'imagenet'`` (MobileNetV2). Returns the :class:`LoadReport`; raises
        ``CheckpointError`` naming the file / the package to install when the weights are missing.
        ``trust``: read the file with full unpickling (only for files you trust)."""
        source = source or self.cfg.backbone.pretrained
        if source is None:
            raise CheckpointError("no pretrained backbone weights configured (BackboneConfig.pretrained)")
        source = resolve_pretrained(source, self.cfg.backbone.name)
        return load_backbone_weights(self.img_backbone, source, trust=trust)  # copies in place: layout kept

    # ------------------------------------------------------------------ features
    def extract_feats(self, images: Tensor | None, stem: Tensor | None = None,
                      batch_size: int | None = None) -> list[Tensor]:
        """images (B, N, 3, H, W) normalised -> feature levels, each (B, N, C, H_l, W_l) fp32.
        Or ``stem``: cached frozen-stem maps (:mod:`raydn.models.stem_cache`; a tuple of
        (B*N, C_i, h_i, w_i), or one such tensor) instead of the images, with ``batch_size`` B."""
        if stem is None:
            B = images.shape[0]
            x = self.prepare_images(images)
        else:
            B = int(batch_size)
            maps = (stem,) if isinstance(stem, Tensor) else tuple(stem)
            x = tuple(m.contiguous(memory_format=torch.channels_last) for m in maps) if self.channels_last else maps
        device = (x if stem is None else x[0]).device
        ctx = (torch.autocast(device_type=device.type, dtype=self.encoder_autocast)
               if (self.training and self.encoder_autocast is not None) else contextlib.nullcontext())
        with ctx:
            feats = self.img_backbone(x) if stem is None else self.img_backbone.forward_from_stem(x)
            if self.img_neck is not None:
                feats = self.img_neck(feats)
        return self.collect_feats(feats, B)

    def prepare_images(self, images: Tensor) -> Tensor:
        """images (B, N, 3, H, W) -> encoder input (B*N, 3, H, W): GridMask in training, and the
        channels-last memory layout when :attr:`channels_last` is set (same values)."""
        x = images.flatten(0, 1)
        if self.training and self.grid_mask is not None:
            x = self.grid_mask(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def collect_feats(self, feats, batch_size: int) -> list[Tensor]:
        """Encoder outputs (B*N, C, H_l, W_l) -> the last ``num_levels`` levels as
        (B, N, C, H_l, W_l) fp32 (a view when possible: channels-last maps keep their layout, which
        is the (pixel, channel) order the head flattens them to)."""
        feats = list(feats)[-self.cfg.head.num_levels:]
        return [f.float().reshape(batch_size, -1, *f.shape[1:]) for f in feats]

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device=None) -> TemporalState:
        if device is None:
            device = next(self.parameters()).device
        return self.pts_bbox_head.init_state(batch_size, device=device)

    # ------------------------------------------------------------------ passes
    def forward(self, batch: FrameBatch, state: TemporalState | None = None,
                feats: list[Tensor] | None = None, stem: tuple[Tensor, ...] | None = None
                ) -> tuple[dict, TemporalState, list[Tensor]]:
        """Head outputs for one frame per slot. Returns ``(outputs, new_state, feats)``.
        The image features come from ``feats`` (precomputed levels), else from ``stem`` (cached
        frozen-stem maps of the batch's frames, :meth:`extract_feats`), else from ``batch.images``."""
        if feats is None:
            B = batch.lidar2img.shape[0]
            if stem is not None:
                feats = self.extract_feats(None, stem=stem, batch_size=B)
            elif batch.images is None:
                raise ValueError("RayDNDetector: the FrameBatch has no images (and no stem maps were given)")
            else:
                feats = self.extract_feats(batch.images)
        outputs, state = self.pts_bbox_head(feats, batch, state)
        return outputs, state, feats

    def forward_train(self, batch: FrameBatch, state: TemporalState | None = None,
                      stem: tuple[Tensor, ...] | None = None) -> tuple[dict[str, Tensor], TemporalState]:
        """Losses of one training frame per slot (official names, 24 head + 5 auxiliary terms).
        The total loss is the plain sum of the values (``sum(losses.values())``). ``stem``: cached
        frozen-stem maps of the batch's frames instead of its images (see :meth:`forward`)."""
        if not batch.has_targets:
            raise ValueError("forward_train needs a FrameBatch with gt_boxes/gt_labels")
        outputs, state, feats = self.forward(batch, state, stem=stem)
        losses = dict(self.criterion(outputs, batch.gt_boxes, batch.gt_labels))
        if self.img_roi_head is not None and batch.gt_boxes_2d is not None:
            aux_out = self.img_roi_head(feats)
            losses.update(self.img_roi_head.loss(aux_out, batch.gt_boxes_2d, batch.gt_labels_2d,
                                                 batch.centers_2d, batch.depths_2d))
        if self.depth_head is not None:
            if batch.points is None:
                raise ValueError("forward_train: depth supervision is on (ModelConfig.depth.enabled) but "
                                 "the FrameBatch carries no LiDAR points (build the dataset with load_points=True)")
            losses["loss_depth"] = self.depth_head.loss_from_points(
                feats, batch.points, batch.lidar2img, batch.intrinsics, batch.pad_shape)
        return losses, state.detach()

    @torch.no_grad()
    def predict(self, batch: FrameBatch, state: TemporalState | None = None, *, nms: bool = True,
                with_selection: bool = False):
        """Decoded detections per sample: dicts with ``boxes`` (k, 9) LiDAR boxes (gravity centre),
        ``scores`` (k,), ``labels`` (k,), ``query`` (k,) (the query each came from) -> ``(dets,
        state)``; ``with_selection``: ``(dets, state, selection)`` with the
        :class:`raydn.models.decode.Selection` of the frame (what the query ids follow). Use in
        eval mode. ``nms=False`` skips the preset's BEV
        NMS (``HeadConfig.nms_radius``; the official presets have none). A batch with another
        camera count than the model's or with NaN/inf images, calibration or poses raises
        ``DataError`` before the memory is touched (``raydn.core.batch.check_frame_batch``):
        ``state`` stays as it was."""

        check_frame_batch(batch, self.cfg.head.num_cams)
        outputs, state, _ = self.forward(batch, state)
        head = self.cfg.head if nms or self.cfg.head.nms_radius is None else replace(self.cfg.head, nms_radius=None)
        dets = decode(outputs, head)
        if with_selection:
            return dets, state, Selection.of(dets, outputs["memory_index"])
        return dets, state
