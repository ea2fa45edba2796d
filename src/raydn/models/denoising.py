"""Query denoising for training: the standard box-noise groups and **ray denoising** (RayDN).

(Contract written first; the builder is implemented below by the denoising work.)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class DenoisingQueries:
    """Denoising queries of one training batch (official ``mask_dict``), spec §6.

    n = total GT boxes in the batch, G_tot = scalar + ray groups * num_rays (15 officially),
    S = max boxes of a sample, D = pad_size = S * G_tot, Q = learnable queries,
    P = propagated queries, M = memory length.

    * ``reference_points`` (B, D + Q, 3): normalised; DN slots [0, D) then the learnable points.
    * ``attn_mask`` (D + Q + P, D + Q + M) bool, True = attention blocked (PyTorch MHA semantics).
    * ``pad_size``: D.
    * ``known_labels`` (G_tot * n,) int64: class of the GT or ``num_classes`` (background) for
      negatives; entry order group-major then batch-major boxes (index g * n + i).
    * ``known_boxes`` (G_tot * n, 9): the ORIGINAL GT box of each entry (LiDAR frame, gravity
      centre) - the regression target of every DN query, negatives included.
    * ``known_bid`` (G_tot * n,) int64: batch row of each entry.
    * ``map_known_indice`` (G_tot * n,) int64: query slot in [0, D) of each entry.
    * ``known_indice`` (G_tot * n,) int64: index of the GT within the batch (arange(n) repeated).
    * ``known_num`` list[int]: boxes per sample.
    """
    reference_points: Tensor
    attn_mask: Tensor
    pad_size: int
    known_labels: Tensor
    known_boxes: Tensor
    known_bid: Tensor
    map_known_indice: Tensor
    known_indice: Tensor
    known_num: list
