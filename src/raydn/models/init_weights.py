"""Initialising a detector from a weight file: the backbone only, or the whole detector non-strictly.

Two ways, as the official mmcv/mmdet code has them:

* **backbone** (``raydn train --pretrained``, mmcv ``init_cfg=Pretrained``): the image backbone of an
  mmdet detector (``backbone.*``), a torchvision classifier or an official RayDN/StreamPETR detector
  (``img_backbone.*``) -- :func:`raydn.models.backbones.pretrained.load_backbone_weights`, which
  refuses a tensor of another shape (a wrong file); :func:`backbone_init_report` turns its report
  into an :class:`InitReport` in detector key names.
* **detector** (``raydn train --load-from``, mmcv ``load_from`` = ``load_checkpoint(strict=False)``):
  :func:`raydn.interop.convert.load_detector_weights` (next to the checkpoint formats it reads: an
  official checkpoint's keys are mapped with :func:`raydn.interop.convert.read_model_file`; raydn
  model files and training checkpoints are read too). A tensor whose shape differs from the model's is **skipped** and listed with both shapes,
  every other matching tensor is loaded; model keys the file lacks keep their initialisation
  (``missing``) and file keys the model lacks are listed (``unexpected``). A file of which no tensor
  fits is an error (mmcv would only warn).

Files are read with ``torch.load(weights_only=True)`` unless ``trust=True``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from raydn.core.files import file_sha256  # noqa: F401 (re-exported)
from raydn.models.backbones.pretrained import LoadReport, count_by_prefix

#: ``kind`` of an :class:`InitReport`
BACKBONE, DETECTOR = "backbone", "detector"


@dataclass
class InitReport:
    """What loading one weight file did. Keys are detector keys (``img_backbone.conv1.weight``)
    except ``unexpected`` / ``ignored``, which are the file's own names.

    ``loaded``: model keys that received a tensor; ``skipped``: ``(key, model shape, file shape)``
    of the tensors left out because their shape differs; ``missing``: model keys the file does
    not provide (they keep their initialisation); ``unexpected``: file keys the model does not
    have; ``ignored``: file keys outside the part being loaded (e.g. an mmdet detector's
    ``neck.*`` / ``rpn_head.*`` / ``roi_head.*`` under ``--pretrained``); ``notes``: anything
    else worth reading (tied copies that differ, a digest that is not the official file's)."""
    kind: str                       # BACKBONE | DETECTOR
    path: str
    layout: str = ""                # what the file was read as
    sha256: str | None = None       # of the file (None when not computed)
    loaded: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def headline(self) -> str:
        """One line: ``backbone <- FILE (layout): loaded N tensors, ...``."""
        return (f"{self.kind} <- {self.path} ({self.layout}): loaded {len(self.loaded)} tensors, "
                f"skipped {len(self.skipped)} (shape differs), missing {len(self.missing)}, "
                f"unexpected {len(self.unexpected)}, ignored {len(self.ignored)}")

    def summary(self, max_list: int = 10) -> str:
        """The headline, then every skipped tensor with both shapes (up to ``max_list``) and the
        missing / unexpected / ignored keys counted by prefix."""
        lines = [self.headline()]
        if self.loaded:
            lines.append("  loaded: " + count_by_prefix(self.loaded))
        for key, ours, theirs in self.skipped[:max_list]:
            lines.append(f"  skipped {key}: model {tuple(ours)} vs file {tuple(theirs)}")
        if len(self.skipped) > max_list:
            lines.append(f"  ... and {len(self.skipped) - max_list} more skipped (init_report.json lists all)")
        if self.missing:
            lines.append("  missing (keep their initialisation): " + count_by_prefix(self.missing))
        if self.unexpected:
            lines.append("  unexpected (not in the model): " + count_by_prefix(self.unexpected))
        if self.ignored:
            lines.append("  ignored (not " + ("backbone weights" if self.kind == BACKBONE else "loaded")
                         + "): " + count_by_prefix(self.ignored))
        if self.sha256:
            lines.append(f"  sha256 {self.sha256}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [{"key": k, "model_shape": list(a), "file_shape": list(b)} for k, a, b in self.skipped]
        return d


def backbone_init_report(rep: LoadReport, prefix: str = "img_backbone.") -> InitReport:
    """An :class:`InitReport` of a backbone load (:class:`LoadReport`; model keys given the
    detector prefix ``prefix``, file keys kept as the file has them)."""
    layout = {"backbone.": "mmdet detector, backbone.* keys",
              "img_backbone.": "RayDN/StreamPETR detector, img_backbone.* keys",
              "": "bare backbone keys (torchvision / timm style)"}.get(rep.prefix, f"{rep.prefix}* keys")
    return InitReport(kind=BACKBONE, path=rep.path, layout=layout,
                      loaded=[prefix + k for k in rep.loaded], missing=[prefix + k for k in rep.missing],
                      unexpected=[rep.prefix + k for k in rep.unexpected], ignored=list(rep.ignored))


__all__ = ["BACKBONE", "DETECTOR", "InitReport", "backbone_init_report", "file_sha256"]
