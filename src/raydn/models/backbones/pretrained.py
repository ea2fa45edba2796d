"""Loading pretrained backbone weights from torchvision / mmdet / official RayDN checkpoints.

A checkpoint is a ``.pth`` file holding either a plain state dict or a dict with a ``state_dict`` /
``model`` entry. Keys may carry a wrapper prefix: ``module.`` (DataParallel), ``backbone.`` (mmdet
detectors such as the nuImages Cascade Mask R-CNN), ``img_backbone.`` (official RayDN/StreamPETR
detectors). When prefixed keys exist only those are kept (the rest belongs to necks and heads and
is listed in the report's ``ignored``, never dropped silently).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from raydn.errors import CheckpointError
from raydn.safe_load import load_weights_only

DEFAULT_PREFIXES = ("img_backbone.", "backbone.")
# keys that never belong to our backbones (torchvision classifier head)
_IGNORED_KEY_PREFIXES = ("fc.",)


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did. ``loaded`` are model keys that received a tensor."""
    path: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)      # model keys absent from the checkpoint
    unexpected: list = field(default_factory=list)   # checkpoint keys the model does not have
    # checkpoint keys that are not backbone weights by design: torchvision ``fc.*``, and the keys
    # outside the backbone prefix of a detector file (mmdet ``neck.*`` / ``rpn_head.*`` /
    # ``roi_head.*``, official ``img_neck.*`` / ``pts_bbox_head.*``), with their full names
    ignored: list = field(default_factory=list)
    prefix: str = ""                                 # the wrapper prefix stripped ('' if none)

    def summary(self) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded)} tensors, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"]
        if self.ignored:
            lines.append("  ignored (not backbone weights): " + count_by_prefix(self.ignored))
        if self.missing:
            lines.append("  missing: " + ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else ""))
        if self.unexpected:
            lines.append("  unexpected: " + ", ".join(self.unexpected[:10])
                         + (" ..." if len(self.unexpected) > 10 else ""))
        return "\n".join(lines)


def count_by_prefix(keys, depth: int = 1, limit: int = 8) -> str:
    """``'neck.* (8), rpn_head.* (6), roi_head.* (40)'``: keys counted by their first ``depth``
    dotted parts, in first-seen order (at most ``limit`` groups named)."""
    groups: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:depth])
        head = head + ".*" if head != k else k
        groups[head] = groups.get(head, 0) + 1
    items = [f"{g} ({n})" for g, n in groups.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more groups)" if len(items) > limit else "")


def read_state_dict(path: str | os.PathLike, trust: bool = False) -> dict:
    """Read a checkpoint safely (``weights_only=True``; ``trust=True``: full unpickling, for files
    you trust) and return its flat tensor state dict (non-tensor entries such as mmdet's ``meta``
    are outside the ``state_dict`` wrapper)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"pretrained checkpoint not found: {path}")
    obj = load_weights_only(path, map_location="cpu", trust=trust)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (optionally under "
                              f"'state_dict' or 'model'), got {type(obj).__name__}")
    return obj


def strip_prefixes(state: dict, prefixes=DEFAULT_PREFIXES) -> dict:
    """Remove ``module.``, then keep and strip the first of ``prefixes`` that any key starts with."""
    return split_prefixed(state, prefixes)[0]


def split_prefixed(state: dict, prefixes=DEFAULT_PREFIXES) -> tuple[dict, list, str]:
    """``(backbone state, other keys, prefix)``: remove ``module.``, then keep and strip the first of
    ``prefixes`` that any key starts with; ``other keys`` are the (full) keys left out, ``prefix``
    the one used (``''`` when no key is prefixed: everything is kept)."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return ({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                    [k for k in state if not k.startswith(prefix)], prefix)
    return dict(state), [], ""


def load_backbone_weights(model: nn.Module, path: str | os.PathLike,
                          prefixes=DEFAULT_PREFIXES, trust: bool = False) -> LoadReport:
    """Load a (possibly prefixed) checkpoint into ``model`` non-strictly, with shape checks.

    Raises :class:`CheckpointError` when a shared key has a different shape or when no key matches
    at all (almost surely the wrong file). Missing / unexpected keys are listed in the report, and
    so are the checkpoint keys outside the backbone prefix (``ignored``). ``trust``: see
    :func:`read_state_dict`.
    """
    state, others, prefix = split_prefixed(read_state_dict(path, trust=trust), prefixes)
    report = LoadReport(path=os.fspath(path), ignored=list(others), prefix=prefix)
    own = model.state_dict()
    to_load = {}
    mismatched = []
    for k, v in state.items():
        if k.startswith(_IGNORED_KEY_PREFIXES) and k not in own:
            report.ignored.append(k)
        elif k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            to_load[k] = v
    if mismatched:
        raise CheckpointError(f"{path}: {len(mismatched)} shape mismatches, e.g. " + "; ".join(mismatched[:5]))
    if not to_load:
        raise CheckpointError(f"{path}: no key matches the {type(model).__name__} model "
                              f"(first checkpoint keys: {list(state)[:5]})")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in own if k not in to_load]
    return report
