"""EVA02 ViT backbone with windowed attention, 2-D RoPE, SwiGLU and a SimpleFeaturePyramid.

Re-implements the official ``EVAViT`` (StreamPETR ``models/backbones/eva_vit.py``, used unchanged by
RayDN; spec §3.4, §11.5) with the same module paths, so the official EVA02-L checkpoint's
``img_backbone.*`` keys load as they are:

* ``patch_embed.proj`` conv p x p / p (3 -> D); tokens are kept as (B, h, w, D) maps (h = H/p, w = W/p);
* ``pos_embed`` (1, 1 + (pretrain_img_size/p)^2, D): the cls entry is dropped and the square grid is
  bicubically resized (``align_corners=False``) to (h, w) at every forward, then added;
* ``rope_win`` / ``rope_glb``: 2-D rotary tables ``freqs_{cos,sin}`` (S*S, head_dim) for window side
  S = ``window_size`` and S = ``img_size / p`` (the official "global" table, = ``global_window_size``
  in the official configs). The same modules are also children of every block's attention
  (``blocks.{i}.attn.rope``), so their buffers appear under both paths in the state dict, as officially;
* ``blocks.{i}``: x = x + drop_path(attn(window_partition(norm1(x)))); x = x + drop_path(mlp(norm2(x))),
  LayerNorm eps 1e-6. Blocks in ``window_block_indexes`` use ``window_size`` windows, the others
  ``global_window_size`` windows (20x20 for EVA02-L: *not* true global attention). Windows are made by
  zero-padding the normalised tokens at the bottom/right to a multiple of the window; padded tokens take
  part in attention as keys (no mask), exactly as officially;
* attention: separate ``q_proj/k_proj/v_proj`` (no bias) plus learnable ``q_bias`` and ``v_bias`` (k has
  none), RoPE on q and k (interleaved pairs), softmax(q k^T / sqrt(head_dim)) v through
  ``F.scaled_dot_product_attention``, output ``proj``. ``fp16_attention=True`` reproduces the official
  FlashAttention wrapper: q, k, v rounded to float16 and the attention output returned in float16, then
  cast back (on CUDA the kernel really runs in fp16; on CPU fp32 math on the rounded values);
* ``mlp`` SwiGLU: ``w3(ffn_ln(silu(w1 x) * w2 x))``, hidden ``int(D * mlp_ratio)``;
* no final norm; ``adapter.simfp_{2,3,4,5}``: SimpleFeaturePyramid (scales 4, 2, 1, 0.5 of the stride-p
  map, channels-first LayerNorm eps 1e-6) -> ``out_channels`` maps at strides p/4, p/2, p, 2p.

Input: images (B, 3, H, W), normalised; H, W multiples of the patch size. Output: list of 4 maps
(B, out_channels, H/s, W/s) for s = 4, 8, 16, 32 (p = 16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from raydn.config import BackboneConfig
from raydn.models.backbones.pretrained import LoadReport, load_backbone_weights


# ---------------------------------------------------------------------------------------------- RoPE
class VisionRotaryEmbeddingFast(nn.Module):
    """2-D rotary position table for an S x S token window (official ``VisionRotaryEmbeddingFast``).

    ``dim`` = head_dim / 2 rotary channels per axis; frequencies 1 / theta^(2j/dim), j < dim/2, each
    repeated twice (interleaved pairs); positions t = arange(S) / S * pt_seq_len. The first ``dim``
    channels rotate with the row index, the last ``dim`` with the column index.
    Buffers ``freqs_cos``, ``freqs_sin``: (S*S, 2*dim), rows in row-major window order.
    """

    def __init__(self, dim: int, pt_seq_len: int = 16, ft_seq_len: int | None = None, theta: float = 10000.0):
        super().__init__()
        ft_seq_len = pt_seq_len if ft_seq_len is None else ft_seq_len
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        f = (t[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)          # (S, dim)
        s = ft_seq_len
        grid = torch.cat((f[:, None, :].expand(s, s, dim), f[None, :, :].expand(s, s, dim)), dim=-1)
        self.side = s
        self.register_buffer("freqs_cos", grid.cos().reshape(s * s, 2 * dim))
        self.register_buffer("freqs_sin", grid.sin().reshape(s * s, 2 * dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (..., S*S, 2*dim) -> same shape, rotated."""
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------- small modules
class PatchEmbed(nn.Module):
    """Conv p x p / p; (B, 3, H, W) -> (B, H/p, W/p, D) channels-last token map."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class DropPath(nn.Module):
    """Stochastic depth per sample (training only): x / keep * floor(keep + U[0,1))."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``; (..., D) -> (..., D), hidden width H."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of (B, C, H, W) maps (official detectron2-style ``LayerNorm``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvNorm(nn.Conv2d):
    """Conv2d followed by a ``.norm`` child (official detectron2-style ``Conv2d(norm=...)``)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0, eps: float = 1e-6):
        super().__init__(cin, cout, kernel_size, padding=padding, bias=False)
        self.norm = ChannelLayerNorm(cout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


# ------------------------------------------------------------------------------------- attention
def window_partition(x: torch.Tensor, ws: int):
    """(B, H, W, C) -> windows (B*nH*nW, ws, ws, C) after zero-padding H, W up to multiples of ws;
    also returns the padded size (Hp, Wp)."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % ws, (-W) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, ws: int, pad_hw, hw) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B*nW, ws, ws, C) -> (B, H, W, C), padding removed."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // ((Hp // ws) * (Wp // ws))
    x = windows.view(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


class Attention(nn.Module):
    """Multi-head self-attention over one window of tokens, with 2-D RoPE on q and k.

    Input/Output: (B', S, S, D) windows. Parameters: ``q_proj/k_proj/v_proj.weight`` (D, D),
    ``q_bias``, ``v_bias`` (D) [if qkv_bias], ``proj`` (D -> D with bias); ``rope`` a shared
    :class:`VisionRotaryEmbeddingFast` for S x S windows.
    """

    def __init__(self, dim: int, num_heads: int, rope: VisionRotaryEmbeddingFast, qkv_bias: bool = True,
                 fp16_attention: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.rope = rope
        self.proj = nn.Linear(dim, dim)
        self.fp16_attention = fp16_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        if N != self.rope.freqs_cos.shape[0]:
            raise ValueError(f"attention window has {H}x{W} tokens but the RoPE table is for "
                             f"{self.rope.side}x{self.rope.side}")
        x = x.reshape(B, N, C)
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q = self.rope(q).type_as(v)                                   # (B', heads, N, head_dim)
        k = self.rope(k).type_as(v)
        out = self._attend(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out).view(B, H, W, C)

    def _attend(self, q, k, v):
        """q, k, v (B', heads, N, head_dim) -> (B', heads, N, head_dim) in v's dtype."""
        if not self.fp16_attention:
            return F.scaled_dot_product_attention(q, k, v)
        dtype = v.dtype
        if q.is_cuda:  # a real fp16 kernel, like the official FlashAttention
            out = F.scaled_dot_product_attention(q.half(), k.half(), v.half())
        else:
            # CPU emulation of the official wrapper: fp32 math on fp16-rounded q, k, v, output rounded to
            # fp16. Plain matmul-softmax-matmul (not SDPA) reproduces the official fixture bit for bit.
            q, k, v = (t.half().float() for t in (q, k, v))
            attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = (attn @ v).half()
        return out.to(dtype)


class Block(nn.Module):
    """Pre-norm transformer block on a (B, h, w, D) token map with (padded) window attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int,
                 rope: VisionRotaryEmbeddingFast, qkv_bias: bool = True, drop_path: float = 0.0,
                 fp16_attention: bool = False, with_cp: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rope, qkv_bias, fp16_attention)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.with_cp = with_cp

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


# ----------------------------------------------------------------------------------- the pyramid
class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple pyramid on the (B, D, h, w) stride-p map; children ``simfp_{log2(stride)}``.

    scale 4:   ConvT(D, D/2, 2, 2), LN, GELU, ConvT(D/2, D/4, 2, 2), 1x1+LN, 3x3+LN
    scale 2:   ConvT(D, D/2, 2, 2), 1x1+LN, 3x3+LN
    scale 1:   1x1+LN, 3x3+LN
    scale 0.5: Conv(D, D, 2, 2) (bias), 1x1+LN, 3x3+LN       (1x1 / 3x3 convs without bias)
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factors=(4, 2, 1, 0.5), patch_size: int = 16):
        super().__init__()
        dim = in_channels
        self.stage_names = []
        for scale in scale_factors:
            if scale == 4:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), ChannelLayerNorm(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                out_dim = dim // 4
            elif scale == 2:
                layers, out_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1:
                layers, out_dim = [], dim
            elif scale == 0.5:
                layers, out_dim = [nn.Conv2d(dim, dim, 2, stride=2)], dim
            elif scale == 0.25:
                layers, out_dim = [nn.Conv2d(dim, dim, 4, stride=4)], dim
            else:
                raise ValueError(f"unsupported SimpleFeaturePyramid scale {scale}")
            layers += [ConvNorm(out_dim, out_channels, 1), ConvNorm(out_channels, out_channels, 3, padding=1)]
            name = f"simfp_{int(math.log2(int(patch_size / scale)))}"
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)

    def forward(self, x: torch.Tensor) -> list:
        return [getattr(self, n)(x) for n in self.stage_names]


# ------------------------------------------------------------------------------------ the backbone
def default_window_block_indexes(depth: int) -> tuple:
    """Official EVA02 layout: every third block (2, 5, 8, ...) uses the large window, the rest 16x16."""
    return tuple(i for i in range(depth) if i % 3 != 2)


class EVA02ViT(nn.Module):
    """EVA02 ViT + SimpleFeaturePyramid (see module docstring).

    Attributes: ``out_channels`` (tuple per output), ``strides`` (tuple per output, pixels).
    """

    def __init__(self, img_size: int = 320, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4 * 2 / 3, qkv_bias: bool = True,
                 drop_path_rate: float = 0.3, window_size: int = 16, global_window_size: int = 20,
                 window_block_indexes=None, pretrain_img_size: int = 224, pt_hw_seq_len: int = 16,
                 out_channels: int = 256, scale_factors=(4, 2, 1, 0.5), fp16_attention: bool = False,
                 with_cp: bool = False):
        super().__init__()
        if window_block_indexes is None:
            window_block_indexes = default_window_block_indexes(depth)
        window_block_indexes = set(window_block_indexes)
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n_pos = (pretrain_img_size // patch_size) ** 2 + 1                   # + cls token
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))
        half_head_dim = embed_dim // num_heads // 2
        self.rope_win = VisionRotaryEmbeddingFast(half_head_dim, pt_hw_seq_len, window_size)
        self.rope_glb = VisionRotaryEmbeddingFast(half_head_dim, pt_hw_seq_len, img_size // patch_size)
        if global_window_size > 0 and global_window_size != img_size // patch_size:
            raise ValueError(f"global_window_size {global_window_size} must equal img_size / patch_size "
                             f"({img_size // patch_size}): the official 'global' RoPE table has that side")
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # float32 values, as officially
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio,
                  window_size if i in window_block_indexes else global_window_size,
                  self.rope_win if i in window_block_indexes else self.rope_glb,
                  qkv_bias, dpr[i], fp16_attention, with_cp)
            for i in range(depth))
        self.adapter = SimpleFeaturePyramid(embed_dim, out_channels, scale_factors, patch_size)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.out_channels = (out_channels,) * len(scale_factors)
        self.strides = tuple(int(patch_size / s) for s in scale_factors)

    def set_fp16_attention(self, enabled: bool) -> None:
        """Switch the official fp16 rounding of q, k, v (and the attention output) on or off."""
        for blk in self.blocks:
            blk.attn.fp16_attention = bool(enabled)

    def abs_pos(self, h: int, w: int) -> torch.Tensor:
        """Absolute position embedding for an (h, w) token grid: (1, h, w, D)."""
        pos = self.pos_embed[:, 1:]
        side = int(math.isqrt(pos.shape[1]))
        grid = pos.reshape(1, side, side, -1)
        if side == h and side == w:
            return grid
        grid = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=(h, w), mode="bicubic", align_corners=False)
        return grid.to(pos.dtype).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list:
        """x (B, 3, H, W) -> list of (B, out_channels, H/s, W/s), s in ``self.strides``."""
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of the patch size "
                             f"{self.patch_size}")
        x = self.patch_embed(x)
        x = x + self.abs_pos(x.shape[1], x.shape[2])
        for blk in self.blocks:
            x = blk(x)
        return self.adapter(x.permute(0, 3, 1, 2))

    def load_pretrained(self, path) -> LoadReport:
        """Load official (``img_backbone.*``) or bare EVA02 weights; see :func:`load_backbone_weights`."""
        return load_backbone_weights(self, path)


def build_eva02(cfg: BackboneConfig) -> EVA02ViT:
    """EVA02 from a :class:`BackboneConfig` (``name='eva02'``)."""
    return EVA02ViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                    num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
                    window_size=cfg.window_size, global_window_size=cfg.global_window_size,
                    window_block_indexes=cfg.window_block_indexes, pretrain_img_size=cfg.pretrain_img_size,
                    out_channels=cfg.out_channels, fp16_attention=cfg.fp16_attention, with_cp=cfg.with_cp)
