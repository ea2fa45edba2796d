"""Decoder of the RayDN / RepDETR3D head (spec §7): post-norm layers
``self_attn -> norm -> cross_attn (DFA) -> norm -> ffn -> norm``, 6 layers, no final norm.

Names follow the official checkpoint: ``decoder.layers.{i}.attentions.0.attn.*`` (packed
multi-head attention), ``attentions.1.*`` (deformable feature aggregation), ``ffns.0.*``,
``norms.{0,1,2}.*``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from raydn.geometry import denormalize_points, fp32_geometry
from raydn.models.deformable import deformable_sample, get_sampler
from raydn.models.layers import FFN


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with the parameter layout of ``nn.MultiheadAttention``
    (``in_proj_weight`` (3C, C) in q, k, v order, ``in_proj_bias`` (3C), ``out_proj``), computed
    with ``F.scaled_dot_product_attention``. Batch-first.

    ``attn_mask`` (Lq, Lk) bool uses PyTorch-MHA semantics: **True = blocked**.
    ``explicit_cpu_training``: in CPU training with dropout use :func:`_attention_with_dropout`
    (faster than SDPA's math path there) instead of SDPA.
    """
    explicit_cpu_training: bool = True

    def __init__(self, embed_dims: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dims))
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attn_mask: Tensor | None = None) -> Tensor:
        """query (B, Lq, C), key/value (B, Lk, C) -> (B, Lq, C)."""
        B, Lq, C = query.shape
        Lk = key.shape[1]
        h = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3, dim=0)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3, dim=0)
        q = F.linear(query, w_q, b_q).view(B, Lq, h, C // h).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(B, Lk, h, C // h).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(B, Lk, h, C // h).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if (self.explicit_cpu_training and p > 0.0 and q.device.type == "cpu" and torch.is_grad_enabled()
                and _explicit_ok(attn_mask)):
            out = _attention_with_dropout(q, k, v, attn_mask, p)
        else:
            mask = None if attn_mask is None else ~attn_mask  # SDPA: True = may attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, C))


def _explicit_ok(attn_mask: Tensor | None) -> bool:
    """The explicit CPU training path handles no mask or a 2-D bool mask without fully blocked
    rows (SDPA gives those rows 0, a plain softmax NaN); everything else goes to SDPA."""
    if attn_mask is None:
        return True
    return attn_mask.dtype == torch.bool and attn_mask.dim() == 2 and not bool(attn_mask.all(-1).any())


class _NoiseDropout(torch.autograd.Function):
    """``x * noise`` with ``noise = (U[0,1) >= p) / (1 - p)`` drawn from the default generator:
    dropout with the semantics of ``F.dropout`` (keep probability ``1 - p``, kept values scaled),
    cheaper on CPU than ``bernoulli_`` + division for large tensors (one uniform draw, in-place
    threshold and scale), same saved state (the float noise)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        noise = torch.rand(x.shape, dtype=x.dtype, device=x.device)
        torch.ge(noise, p, out=noise)
        noise.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad: Tensor):
        (noise,) = ctx.saved_tensors
        return grad * noise, None


def _attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None, p: float) -> Tensor:
    """Scaled dot-product attention with attention-weight dropout, as SDPA's math path but
    cheaper on CPU in training: the additive mask is fused into the score GEMM (``baddbmm``),
    plain softmax (no fully blocked rows, see :func:`_explicit_ok`), :class:`_NoiseDropout`.

    q (B, h, Lq, d), k/v (B, h, Lk, d), blocked (Lq, Lk) bool True = blocked or None
    -> (B, h, Lq, d)."""
    B, h, Lq, d = q.shape
    Lk = k.shape[2]
    q2 = (q * (1.0 / math.sqrt(d))).reshape(B * h, Lq, d)
    kt = k.reshape(B * h, Lk, d).transpose(1, 2)
    if blocked is None:
        scores = torch.bmm(q2, kt)
    else:
        bias = torch.zeros(Lq, Lk, dtype=q2.dtype, device=q2.device).masked_fill_(blocked, float("-inf"))
        scores = torch.baddbmm(bias, q2, kt)
    attn = _NoiseDropout.apply(scores.softmax(-1), p)
    return torch.bmm(attn, v.reshape(B * h, Lk, d)).view(B, h, Lq, d)


class TemporalSelfAttention(nn.Module):
    """mmcv ``MultiheadAttention`` wrapper (batch_first): ``q + Dropout(MHA(q + pos, k + kpos, v))``.

    The official ``dropout=0.1`` sets both the attention-weight dropout and the output dropout.
    """

    def __init__(self, embed_dims: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        self.embed_dims = embed_dims
        self.attn = PackedMultiheadAttention(embed_dims, num_heads, dropout)
        self.dropout_layer = nn.Dropout(dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, query_pos: Tensor,
                key_pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        out = self.attn(query + query_pos, key + key_pos, value, attn_mask)
        return query + self.dropout_layer(out)


class DeformableFeatureAggregation(nn.Module):
    """Official ``DeformableFeatureAggregationCuda`` (spec §7.2) in pure PyTorch.

    Per query: 13 learnable key points (metres, LiDAR frame) ``denorm(ref) + learnable_fc(f)``,
    projected into every camera with ``lidar2img`` (depth clamped at 1e-5, no visibility mask);
    weights = softmax over cams x levels x points per group of ``weights_fc(f + pos + cam_embed)``;
    bilinear multi-scale sampling; sum over cameras; ``f + Dropout(output_proj(.))``.
    """

    def __init__(self, embed_dims: int = 256, num_groups: int = 8, num_levels: int = 4,
                 num_cams: int = 6, dropout: float = 0.1, num_pts: int = 13, bias: float = 2.0,
                 sampler: Callable[..., Tensor] = deformable_sample):
        super().__init__()
        self.embed_dims = embed_dims
        self.num_groups = num_groups
        self.num_levels = num_levels
        self.num_cams = num_cams
        self.num_pts = num_pts
        self.bias = bias
        self.weights_fc = nn.Linear(embed_dims, num_groups * num_levels * num_pts)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.learnable_fc = nn.Linear(embed_dims, num_pts * 3)
        self.cam_embed = nn.Sequential(
            nn.Linear(12, embed_dims // 2), nn.ReLU(inplace=True),
            nn.Linear(embed_dims // 2, embed_dims), nn.ReLU(inplace=True),
            nn.LayerNorm(embed_dims))
        self.drop = nn.Dropout(dropout)
        self.sampler = sampler  # swappable implementation of deformable_sample

    def init_weight(self) -> None:
        """Official ``init_weight`` (called after the transformer-wide Xavier init)."""
        nn.init.zeros_(self.weights_fc.weight)
        nn.init.zeros_(self.weights_fc.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        nn.init.uniform_(self.learnable_fc.bias, -self.bias, self.bias)

    def key_points(self, instance_feature: Tensor, reference_points: Tensor, pc_range) -> Tensor:
        """(B, A, C), normalised refs (B, A, 3) -> key points (B, A, P, 3) in metres."""
        B, A = reference_points.shape[:2]
        ref = denormalize_points(reference_points, pc_range)
        return ref.unsqueeze(-2) + self.learnable_fc(instance_feature).view(B, A, self.num_pts, 3)

    def get_weights(self, instance_feature: Tensor, query_pos: Tensor, lidar2img: Tensor) -> Tensor:
        """-> (B*N, A, G, L, P) softmax-normalised over (N, L, P) per group.

        ``weights_fc`` is linear, so ``weights_fc(f + e + cam)`` is evaluated as
        ``W (f + e) + (W cam + b)`` (6x fewer FLOPs than on the (B, A, N, C) sum; equal up to
        float rounding). The result is a permuted view of a contiguous (G, B*N, A, L, P) tensor
        (the layout the gather sampler wants)."""
        B, A = instance_feature.shape[:2]
        N, G, L, P = self.num_cams, self.num_groups, self.num_levels, self.num_pts
        cam = self.cam_embed(lidar2img[..., :3, :].flatten(-2))                   # (B, N, C)
        # Output features of weights_fc are ordered (l, p, g); reorder its (tiny) weight rows to
        # (g, l, p) so that the group-major re-layout below copies runs of L*P values, not
        # single values at stride G (same dot products, same result).
        C = instance_feature.shape[-1]
        weight = self.weights_fc.weight.view(L * P, G, C).transpose(0, 1).reshape(G * L * P, C)
        bias = self.weights_fc.bias.view(L * P, G).t().reshape(G * L * P)
        w_q = nn.functional.linear(instance_feature + query_pos, weight)            # (B, A, G*LP)
        w_c = nn.functional.linear(cam, weight, bias)                              # (B, N, G*LP)
        logits = w_q.view(B, A, 1, G, L * P) + w_c.view(B, 1, N, G, L * P)         # (B, A, N, G, LP)
        logits = logits.permute(3, 0, 1, 2, 4)                                     # (G, B, A, N, LP)
        w = logits.reshape(G, B, A, N * L * P).softmax(dim=-1)
        w = w.view(G, B, A, N, L, P).permute(0, 1, 3, 2, 4, 5).contiguous().view(G, B * N, A, L, P)
        return w.permute(1, 2, 0, 3, 4)

    @staticmethod
    def project(key_points: Tensor, lidar2img: Tensor, pad_shape: tuple[int, int]) -> Tensor:
        """Key points (B, A, P, 3) metres -> normalised image locations (B*N, A, P, 2) (x, y)."""
        B, A, P, _ = key_points.shape
        N = lidar2img.shape[1]
        with fp32_geometry(key_points.device):  # pixel x depth ~1e4: float32 even under autocast
            if key_points.dtype in (torch.float16, torch.bfloat16):
                key_points = key_points.float()
            lidar2img = lidar2img.to(key_points.dtype)
            pts = torch.cat([key_points, torch.ones_like(key_points[..., :1])], dim=-1)
            # Full 4x4 @ 4x1 products, as officially: the summation order matters for parity
            # (pixel coordinates ~1e4 before the division; an einsum drifts by ~1e-5 downstream).
            cam = torch.matmul(lidar2img[:, :, None, None], pts[:, None, ..., None]).squeeze(-1)
            uv = cam[..., :2] / cam[..., 2:3].clamp(min=1e-5)                    # (B, N, A, P, 2)
            uv = uv / uv.new_tensor([float(pad_shape[1]), float(pad_shape[0])])
        return uv.reshape(B * N, A, P, 2)

    def forward(self, instance_feature: Tensor, query_pos: Tensor, feat_flatten: Tensor,
                reference_points: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                level_start: Sequence[int], lidar2img: Tensor, pad_shape: tuple[int, int],
                pc_range) -> Tensor:
        """instance_feature/query_pos (B, A, C); feat_flatten (B*N, sumHW, C); reference_points
        (B, A, 3) normalised; lidar2img (B, N, 4, 4); pad_shape (H, W) -> (B, A, C)."""
        B, A, C = instance_feature.shape
        kp = self.key_points(instance_feature, reference_points, pc_range)
        weights = self.get_weights(instance_feature, query_pos, lidar2img)
        loc = self.project(kp, lidar2img, pad_shape)
        feats = self.sampler(feat_flatten, spatial_shapes, level_start, loc, weights)
        feats = feats.view(B, self.num_cams, A, C).sum(1)
        return instance_feature + self.drop(self.output_proj(feats))


class DecoderLayer(nn.Module):
    """Official ``Detr3DTemporalDecoderLayer`` (post-norm)."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_groups: int = 8,
                 num_levels: int = 4, num_cams: int = 6, num_pts: int = 13,
                 ffn_dims: int = 1024, dropout: float = 0.1,
                 sampler: Callable[..., Tensor] = deformable_sample):
        super().__init__()
        self.attentions = nn.ModuleList([
            TemporalSelfAttention(embed_dims, num_heads, dropout),
            DeformableFeatureAggregation(embed_dims, num_groups, num_levels, num_cams, dropout,
                                         num_pts, sampler=sampler),
        ])
        self.ffns = nn.ModuleList([FFN(embed_dims, ffn_dims)])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(self, query: Tensor, query_pos: Tensor, temp_memory: Tensor | None,
                temp_pos: Tensor | None, attn_mask: Tensor | None, feat_flatten: Tensor,
                reference_points: Tensor, spatial_shapes, level_start, lidar2img: Tensor,
                pad_shape: tuple[int, int], pc_range) -> Tensor:
        """query/query_pos (B, Q', C); temp_memory/temp_pos (B, M', C) extra self-attention
        keys; attn_mask (Q', Q' + M') bool True = blocked; feat_flatten (B*N, sumHW, C) (or the
        sampler's prepared form) -> (B, Q', C)."""
        if temp_memory is not None:
            kv = torch.cat([query, temp_memory], dim=1)
            kpos = torch.cat([query_pos, temp_pos], dim=1)
        else:
            kv, kpos = query, query_pos
        q = self.attentions[0](query, kv, kv, query_pos, kpos, attn_mask)
        q = self.norms[0](q)
        q = self.attentions[1](q, query_pos, feat_flatten, reference_points, spatial_shapes,
                               level_start, lidar2img, pad_shape, pc_range)
        q = self.norms[1](q)
        return self.norms[2](self.ffns[0](q))


class Decoder(nn.Module):
    """Stack of decoder layers; returns every layer's output (L, B, Q', C)."""

    def __init__(self, layers: list[DecoderLayer], checkpoint_layers: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.checkpoint_layers = checkpoint_layers

    def forward(self, query: Tensor, query_pos: Tensor, temp_memory: Tensor | None,
                temp_pos: Tensor | None, attn_mask: Tensor | None, feat_flatten: Tensor,
                reference_points: Tensor, spatial_shapes, level_start, lidar2img: Tensor,
                pad_shape: tuple[int, int], pc_range) -> Tensor:
        """Arguments as :meth:`DecoderLayer.forward` -> (num_layers, B, Q', C)."""
        dfa = self.layers[0].attentions[1]
        prepare = getattr(dfa.sampler, "prepare", None)
        value = prepare(feat_flatten, dfa.num_groups) if prepare is not None else feat_flatten
        args = (query_pos, temp_memory, temp_pos, attn_mask, value, reference_points,
                spatial_shapes, level_start, lidar2img, pad_shape, pc_range)
        outs = []
        for layer in self.layers:
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                query = cp.checkpoint(layer, query, *args, use_reentrant=False,
                                      preserve_rng_state=True)
            else:
                query = layer(query, *args)
            outs.append(query)
        return torch.stack(outs)


class Detr3DTransformer(nn.Module):
    """Official ``Detr3DTransformer``: holds ``decoder``; Xavier init then per-module init."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def init_weights(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, DeformableFeatureAggregation):
                m.init_weight()

    def forward(self, tgt: Tensor, query_pos: Tensor, feat_flatten: Tensor, spatial_shapes,
                level_start, temp_memory: Tensor | None, temp_pos: Tensor | None,
                attn_mask: Tensor | None, reference_points: Tensor, lidar2img: Tensor,
                pad_shape: tuple[int, int], pc_range) -> Tensor:
        """-> outs_dec (num_layers, B, Q', C). Reference points and query_pos are constant
        across layers (no iterative refinement, as officially)."""
        return self.decoder(tgt, query_pos, temp_memory, temp_pos, attn_mask, feat_flatten,
                            reference_points, spatial_shapes, level_start, lidar2img, pad_shape,
                            pc_range)


def build_transformer(embed_dims: int = 256, num_layers: int = 6, num_heads: int = 8,
                      num_groups: int = 8, num_levels: int = 4, num_cams: int = 6,
                      num_pts: int = 13, ffn_dims: int = 1024, dropout: float = 0.1,
                      checkpoint_layers: bool = False,
                      sampler: str = "fused") -> Detr3DTransformer:
    """Build the decoder stack with the official initialisation (spec §7.3). ``sampler`` names
    the deformable sampling implementation (:data:`raydn.models.deformable.SAMPLERS`)."""
    fn = get_sampler(sampler)
    layers = [DecoderLayer(embed_dims, num_heads, num_groups, num_levels, num_cams, num_pts,
                           ffn_dims, dropout, fn) for _ in range(num_layers)]
    t = Detr3DTransformer(Decoder(layers, checkpoint_layers))
    t.init_weights()
    return t
