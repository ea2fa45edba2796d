"""The RayDN head (official ``RayDNHead`` = StreamPETR ``SparseHead`` + ray denoising), spec §5.

Pure function of its inputs: ``outputs, new_state = head(feats, batch, state)``; the temporal
object-query memory (spec §5.4) lives in an explicit :class:`TemporalState`, never in module
attributes. Parameter names equal the official checkpoint keys (``pts_bbox_head.`` stripped).

Frames/units: reference points are normalised to the point-cloud range; memory reference points
are metres (global frame between frames, current LiDAR frame inside a forward); timestamps are
float64 seconds; box predictions are ``[x, y, z (metres, gravity centre), log l, log w, log h,
sin yaw, cos yaw, vx, vy]``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from raydn.config import HeadConfig
from raydn.core.batch import FrameBatch
from raydn.geometry import (
    denormalize_points, inverse_sigmoid, normalize_points, pos2posemb1d, pos2posemb3d,
)
from raydn.models.layers import (
    MLN, bias_init_with_prob, build_cls_branch, build_reg_branch, tied_module_list,
)
from raydn.core.state import TemporalState
from raydn.models.temporal import (
    Memory, current_motion, memory_motion, post_update_selected, pre_update, propagate,
)
from raydn.models.transformer import build_transformer
from raydn.models.denoising import build_denoising_queries


class RayDNHead(nn.Module):
    """Sparse deformable head with StreamPETR temporal memory and (training) ray denoising."""

    def __init__(self, cfg: HeadConfig, *, sampler: str = "fused"):
        """``sampler``: deformable sampling implementation, ``"fused"`` (custom autograd op, default), ``"gather"`` or
        ``"grid_sample"`` (reference); both give the same result up to float rounding."""
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dims
        self.embed_dims = C
        self.num_classes = cfg.num_classes
        self.num_query = cfg.num_query
        self.num_propagated = cfg.num_propagated
        self.memory_len = cfg.memory_len
        self.topk_proposals = cfg.topk_proposals
        if cfg.num_propagated > cfg.memory_len or cfg.topk_proposals > cfg.num_query + cfg.num_propagated:
            raise ValueError("HeadConfig: need num_propagated <= memory_len and "
                             "topk_proposals <= num_query + num_propagated")

        cls_branch = build_cls_branch(C, cfg.num_classes, cfg.num_reg_fcs)
        reg_branch = build_reg_branch(C, cfg.code_size, cfg.num_reg_fcs)
        self.cls_branches = tied_module_list(cls_branch, cfg.num_layers)
        self.reg_branches = tied_module_list(reg_branch, cfg.num_layers)

        self.reference_points = nn.Embedding(cfg.num_query, 3)
        if cfg.query_groups < 1:
            raise ValueError(f"HeadConfig.query_groups must be >= 1, got {cfg.query_groups}")
        if cfg.query_groups > 1:  # Group-DETR training groups (not official; no checkpoint key otherwise)
            self.group_reference_points = nn.Embedding(cfg.num_query * (cfg.query_groups - 1), 3)
        if cfg.num_propagated > 0:
            self.pseudo_reference_points = nn.Embedding(cfg.num_propagated, 3)
        self.query_embedding = nn.Sequential(nn.Linear(C * 3 // 2, C), nn.ReLU(), nn.Linear(C, C))
        self.spatial_alignment = MLN(14, C, use_ln=False)
        self.time_embedding = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C))
        if cfg.with_ego_pos:
            self.ego_pose_pe = MLN(180, C)
            self.ego_pose_memory = MLN(180, C)

        self.transformer = build_transformer(
            embed_dims=C, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
            num_groups=cfg.num_groups, num_levels=cfg.num_levels, num_cams=cfg.num_cams,
            num_pts=cfg.num_points, ffn_dims=cfg.ffn_dims, dropout=cfg.dropout,
            checkpoint_layers=cfg.checkpoint_layers, sampler=sampler)

        # Frozen official "parameters" (kept as Parameters so the checkpoint keys match).
        self.code_weights = nn.Parameter(torch.tensor(cfg.loss.code_weights[:cfg.code_size],
                                                      dtype=torch.float32), requires_grad=False)
        self.match_costs = nn.Parameter(self.code_weights.detach().clone(), requires_grad=False)
        self.pc_range = nn.Parameter(torch.tensor(cfg.pc_range, dtype=torch.float32),
                                     requires_grad=False)
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official ``init_weights`` (spec §5.1, §7.3)."""
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        if self.num_propagated > 0:
            nn.init.uniform_(self.pseudo_reference_points.weight, 0, 1)
            self.pseudo_reference_points.weight.requires_grad = False
        self.transformer.init_weights()
        nn.init.constant_(self.cls_branches[0][-1].bias, bias_init_with_prob(0.01))
        if self.cfg.query_groups > 1:  # drawn last: the official parameters' draws are unchanged
            nn.init.uniform_(self.group_reference_points.weight, 0, 1)

    def init_state(self, batch_size: int, device=None) -> TemporalState:
        """Fresh memory: zeros, M rows (timestamps float64)."""
        return TemporalState.zeros(batch_size, self.memory_len, self.embed_dims, device=device)

    # ---------------------------------------------------------------- memory
    def pseudo_reference(self) -> Tensor | None:
        """(P, 3) metres: the frozen pseudo reference points seeding reset slots, or None."""
        if self.num_propagated == 0:
            return None
        return denormalize_points(self.pseudo_reference_points.weight, self.pc_range)

    def _pre_update(self, state: TemporalState | None, batch: FrameBatch, B: int,
                    device, dtype) -> Memory:
        """:func:`raydn.models.temporal.pre_update` with this head's sizes and pseudo points."""
        return pre_update(state, batch.prev_exists.reshape(B), batch.ego_pose_inv, batch.timestamp,
                          memory_len=self.memory_len, embed_dims=self.embed_dims,
                          pseudo_reference=self.pseudo_reference(), dtype=dtype, device=device)

    # --------------------------------------------------------------- pieces
    def _flatten_features(self, feats: list[Tensor], batch: FrameBatch):
        """Camera-aware MLN on every level, flattened: (B*N, sumHW, C), shapes, starts."""
        B, N = feats[0].shape[:2]
        dtype = self.reference_points.weight.dtype
        intr = batch.intrinsics.to(feats[0].device, dtype) / 1e3
        extr = batch.extrinsics.to(feats[0].device, dtype)[..., :3, :]
        mln_in = torch.cat([intr[..., 0, 0:1], intr[..., 1, 1:2], extr.flatten(-2)], dim=-1)
        mln_in = mln_in.flatten(0, 1).unsqueeze(1)                                 # (B*N, 1, 14)
        shapes, flat = [], []
        for f in feats:  # loop over the 4 levels
            _, _, Cf, H, W = f.shape
            flat.append(f.reshape(B * N, Cf, H * W).transpose(1, 2).to(dtype))
            shapes.append((int(H), int(W)))
        feat_flatten = self.spatial_alignment(torch.cat(flat, dim=1), mln_in)
        starts, s = [], 0
        for H, W in shapes:
            starts.append(s)
            s += H * W
        return feat_flatten, shapes, starts

    def _temporal_alignment(self, query_pos: Tensor, tgt: Tensor, ref: Tensor, mem: Memory):
        """Official ``temporal_alignment`` (spec §5.5). Returns tgt, query_pos, ref (with the P
        propagated rows appended), temp_memory, temp_pos (the M - P remaining rows)."""
        temp_ref = normalize_points(mem.reference_point, self.pc_range)
        temp_pos = self.query_embedding(pos2posemb3d(temp_ref, self.embed_dims // 2))
        temp_memory = mem.embedding
        if self.cfg.with_ego_pos:
            rec_motion = current_motion(ref)
            tgt = self.ego_pose_memory(tgt, rec_motion)
            query_pos = self.ego_pose_pe(query_pos, rec_motion)
            mem_motion = memory_motion(mem)
            temp_pos = self.ego_pose_pe(temp_pos, mem_motion)
            temp_memory = self.ego_pose_memory(temp_memory, mem_motion)
        query_pos = query_pos + self.time_embedding(pos2posemb1d(torch.zeros_like(ref[..., :1]), self.embed_dims))
        temp_pos = temp_pos + self.time_embedding(
            pos2posemb1d(mem.timestamp, self.embed_dims).to(temp_pos.dtype))
        return propagate(tgt, query_pos, ref, temp_memory, temp_pos, temp_ref, self.num_propagated)

    def _predict(self, outs_dec: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
        """Shared branches on every layer with the SAME reference points (no refinement).
        outs_dec (L, B, Q', C), ref (B, Q', 3) -> cls (L, B, Q', K), boxes (L, B, Q', 10)."""
        reference = inverse_sigmoid(ref)
        cls, box = [], []
        for lvl in range(outs_dec.shape[0]):  # loop over decoder layers
            cls.append(self.cls_branches[lvl](outs_dec[lvl]))
            tmp = self.reg_branches[lvl](outs_dec[lvl])
            centre = denormalize_points((tmp[..., :3] + reference).sigmoid(), self.pc_range)
            box.append(torch.cat([centre, tmp[..., 3:]], dim=-1))
        return torch.stack(cls), torch.stack(box)

    def _denoising(self, batch: FrameBatch, B: int):
        if not (self.training and self.cfg.denoising.enabled and batch.has_targets):
            return None
        if sum(int(b.shape[0]) for b in batch.gt_boxes) == 0:
            return None
        dev = self.reference_points.weight.device
        return build_denoising_queries(
            [b.to(dev) for b in batch.gt_boxes], [l.to(dev) for l in batch.gt_labels],
            self.reference_points.weight, batch.lidar2img.to(dev), tuple(batch.pad_shape),
            self.cfg.denoising, pc_range=self.cfg.pc_range, num_classes=self.num_classes,
            num_propagated=self.num_propagated, memory_len=self.memory_len)

    # --------------------------------------------------------------- forward
    def forward(self, feats: list[Tensor], batch: FrameBatch, state: TemporalState | None,
                return_intermediates: bool = False) -> tuple[dict, TemporalState]:
        """One frame.

        Args:
            feats: ``num_levels`` tensors (B, N, C, H_l, W_l) (strides 8..64 for R50).
            batch: calibration/poses/timestamps (and GT in training) of the frame.
            state: memory from the previous frame of every slot, or None (fresh zeros; the
                official "memory is None": no transform is applied).
            return_intermediates: also return the transformer inputs/outputs.

        Returns:
            (outputs, new_state). outputs: ``all_cls_scores`` (L, B, Q+P, classes) logits,
            ``all_bbox_preds`` (L, B, Q+P, 10), ``memory_index`` (B, K) int64 (the queries written
            into the new state's first K rows, :class:`raydn.models.decode.Selection`),
            ``dn`` (:class:`DenoisingQueries` or None),
            ``dn_cls_scores`` / ``dn_bbox_preds`` (L, B, D, .) or None.
        """
        if len(feats) != self.cfg.num_levels:
            raise ValueError(f"RayDNHead: expected {self.cfg.num_levels} feature levels, got {len(feats)}")
        B = feats[0].shape[0]
        device, dtype = feats[0].device, self.reference_points.weight.dtype
        mem = self._pre_update(state, batch, B, device, dtype)
        feat_flatten, shapes, starts = self._flatten_features(feats, batch)

        dn = self._denoising(batch, B)
        if dn is not None:
            ref, attn_mask, D = dn.reference_points, dn.attn_mask, int(dn.pad_size)
        else:
            ref = self.reference_points.weight.unsqueeze(0).expand(B, -1, -1)
            attn_mask, D = None, 0
        G = self.cfg.query_groups if self.training else 1
        if G > 1:  # extra groups' queries after the main ones (moved behind the propagated rows below)
            ref = torch.cat([ref, self.group_reference_points.weight.unsqueeze(0).expand(B, -1, -1)], 1)
        query_pos = self.query_embedding(pos2posemb3d(ref, self.embed_dims // 2))
        tgt = torch.zeros_like(query_pos)
        tgt, query_pos, ref, temp_memory, temp_pos = self._temporal_alignment(query_pos, tgt, ref, mem)
        E = 0
        if G > 1:  # [DN, Q, extra, P] -> [DN, Q, P, extra]
            E, n0 = (G - 1) * self.num_query, D + self.num_query
            tgt, query_pos, ref = (torch.cat([x[:, :n0], x[:, n0 + E:], x[:, n0:n0 + E]], 1)
                                   for x in (tgt, query_pos, ref))
            attn_mask = group_attention_mask(attn_mask, D + self.num_query + self.num_propagated,
                                             self.num_query, G, temp_memory.shape[1], ref.device)

        lidar2img = batch.lidar2img.to(device, dtype)
        outs_dec = self.transformer(tgt, query_pos, feat_flatten, shapes, starts, temp_memory,
                                    temp_pos, attn_mask, ref, lidar2img, tuple(batch.pad_shape),
                                    self.cfg.pc_range)
        outs_dec = torch.nan_to_num(outs_dec)
        all_cls, all_box = self._predict(outs_dec, ref)
        group_out = {}
        if E:
            L = all_cls.shape[0]
            group_out = {"group_cls_scores": all_cls[:, :, -E:].reshape(L, B, G - 1, self.num_query, -1),
                         "group_bbox_preds": all_box[:, :, -E:].reshape(L, B, G - 1, self.num_query, -1)}
            all_cls, all_box, outs_dec = all_cls[:, :, :-E], all_box[:, :, :-E], outs_dec[:, :, :-E]

        new_state, memory_index = post_update_selected(
            mem, batch.ego_pose, batch.timestamp, all_cls[-1, :, D:], all_box[-1, :, D:],
            outs_dec[-1, :, D:], self.topk_proposals)
        out = {
            "all_cls_scores": all_cls[:, :, D:], "all_bbox_preds": all_box[:, :, D:], "dn": dn,
            "memory_index": memory_index,
            "dn_cls_scores": all_cls[:, :, :D] if dn is not None else None,
            "dn_bbox_preds": all_box[:, :, :D] if dn is not None else None,
            **group_out,
        }
        if return_intermediates:
            out.update(tgt=tgt, query_pos=query_pos, temp_memory=temp_memory, temp_pos=temp_pos,
                       reference_points=ref, attn_mask=attn_mask, outs_dec=outs_dec)
        return out, new_state



def group_attention_mask(base: Tensor | None, num_main: int, num_query: int, groups: int,
                         num_memory: int, device) -> Tensor:
    """Self-attention mask with Group-DETR training groups (True = blocked).

    Query rows: the ``num_main`` official rows (DN + Q + P, masked by ``base`` (num_main,
    num_main + num_memory) or not at all), then ``groups - 1`` groups of ``num_query`` rows.
    Key columns: the same queries, then ``num_memory`` temporal-memory rows. The official rows
    never see the extra groups; each extra group sees itself and the temporal memory only.
    Returns (num_main + E, num_main + E + num_memory), E = (groups - 1) * num_query."""
    E = (groups - 1) * num_query
    Lq = num_main + E
    mask = torch.ones(Lq, Lq + num_memory, dtype=torch.bool, device=device)
    if base is None:
        mask[:num_main, :num_main] = False
        mask[:num_main, Lq:] = False
    else:
        mask[:num_main, :num_main] = base[:, :num_main]
        mask[:num_main, Lq:] = base[:, num_main:]
    gid = torch.arange(E, device=device) // num_query
    mask[num_main:, num_main:Lq] = gid[:, None] != gid[None, :]
    mask[num_main:, Lq:] = False
    return mask
