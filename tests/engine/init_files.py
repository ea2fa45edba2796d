"""Test helper: weight files in the official key layouts, built from the official key lists.

Every tensor is one distinct constant (``torch.full((), v).expand(shape)``): ``torch.save`` stores
the one-element storage, so a file with the 23.5 M-parameter ResNet-50 or the 300 M-parameter
EVA02-L stays a few hundred KB, and the value tells which key a model tensor was loaded from.

* :func:`nuimages_r50_file`: mmdet's Cascade Mask R-CNN R50-FPN of the nuImages model zoo
  (``{'meta': ..., 'state_dict': {backbone.*, neck.*, rpn_head.*, roi_head.*}}``): the ``backbone.*``
  keys are the official detector's ``img_backbone.*`` (``state_dict_keys.txt``) renamed as mmdet has
  them; neck / RPN / RoI-head keys follow mmdet's module names (FPN on C2..C5, three cascade stages
  with shared-FC box heads and mask heads).
* :func:`eva02l_remapped_file`: ``eva02_L_coco_det_sys_o365_remapped.pth`` as StreamPETR's
  remapping script writes it -- a plain dict of the ``img_backbone.*`` keys of
  ``eva02L_state_dict_keys.txt`` -- with chosen tensors given another shape.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raydn.interop.convert import read_key_list


def constant(shape, value: float, int_valued: bool = False) -> torch.Tensor:
    """A tensor of ``shape`` holding ``value`` everywhere, stored as one element."""
    base = torch.full((), int(value) if int_valued else value,
                      dtype=torch.int64 if int_valued else torch.float32)
    return base.expand(tuple(shape))


def value_of(i: int) -> float:
    """The constant of the i-th tensor of a file (distinct, exact in float32)."""
    return (i + 1) / 1024.0


def official_keys(fixtures: Path, name: str, prefix: str) -> dict[str, tuple]:
    return {k: v for k, v in read_key_list(fixtures / name).items() if k.startswith(prefix)}


def _mmdet_heads() -> dict[str, tuple]:
    """Neck / RPN / cascade RoI-head keys of mmdet's cascade_mask_rcnn_r50_fpn (10 classes)."""
    keys: dict[str, tuple] = {}
    for i, c in enumerate((256, 512, 1024, 2048)):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, c, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    keys.update({"rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
                 "rpn_head.rpn_cls.weight": (3, 256, 1, 1), "rpn_head.rpn_cls.bias": (3,),
                 "rpn_head.rpn_reg.weight": (12, 256, 1, 1), "rpn_head.rpn_reg.bias": (12,)})
    for s in range(3):
        b = f"roi_head.bbox_head.{s}"
        keys.update({f"{b}.fc_cls.weight": (11, 1024), f"{b}.fc_cls.bias": (11,),
                     f"{b}.fc_reg.weight": (4, 1024), f"{b}.fc_reg.bias": (4,),
                     f"{b}.shared_fcs.0.weight": (1024, 12544), f"{b}.shared_fcs.0.bias": (1024,),
                     f"{b}.shared_fcs.1.weight": (1024, 1024), f"{b}.shared_fcs.1.bias": (1024,)})
        m = f"roi_head.mask_head.{s}"
        for j in range(4):
            keys[f"{m}.convs.{j}.conv.weight"] = (256, 256, 3, 3)
            keys[f"{m}.convs.{j}.conv.bias"] = (256,)
        keys.update({f"{m}.upsample.weight": (256, 256, 2, 2), f"{m}.upsample.bias": (256,),
                     f"{m}.conv_logits.weight": (10, 256, 1, 1), f"{m}.conv_logits.bias": (10,)})
    return keys


def nuimages_r50_file(path: Path, fixtures: Path) -> dict[str, float]:
    """Write the nuImages Cascade Mask R-CNN layout to ``path``; returns ``{our backbone key
    (img_backbone.*): its constant}``."""
    backbone = official_keys(fixtures, "state_dict_keys.txt", "img_backbone.")
    sd, values = {}, {}
    for i, (k, shape) in enumerate(backbone.items()):
        ints = k.endswith("num_batches_tracked")
        v = float(i + 1) if ints else value_of(i)
        sd["backbone." + k[len("img_backbone."):]] = constant(shape, v, ints)
        values[k] = v
    for j, (k, shape) in enumerate(_mmdet_heads().items()):
        sd[k] = constant(shape, -value_of(j))
    meta = {"mmdet_version": "2.5.0", "epoch": 20, "iter": 0,
            "CLASSES": ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle",
                        "motorcycle", "pedestrian", "traffic_cone", "barrier")}
    torch.save({"meta": meta, "state_dict": sd}, path)
    return values


def eva02l_remapped_file(path: Path, fixtures: Path, other_shapes: dict[str, tuple]) -> dict[str, float]:
    """Write the remapped EVA02-L layout (``img_backbone.*`` only) with ``other_shapes`` replacing
    the shapes of some keys; returns ``{key: constant}``."""
    backbone = official_keys(fixtures, "eva02L_state_dict_keys.txt", "img_backbone.")
    sd, values = {}, {}
    for i, (k, shape) in enumerate(backbone.items()):
        sd[k] = constant(other_shapes.get(k, shape), value_of(i))
        values[k] = value_of(i)
    torch.save(sd, path)
    return values
