"""Official RayDN / StreamPETR-RepDETR3D checkpoints <-> raydn state dicts (spec §11).

Our detector uses the official top-level names (``img_backbone.``, ``img_neck.``,
``img_roi_head.``, ``pts_bbox_head.``) and the head uses the official module paths, so the mapping
is the identity after unwrapping (``state_dict`` / ``model`` wrappers, ``module.`` DDP prefix,
``meta``/optimizer entries dropped). :data:`RENAMES` holds (official prefix -> our prefix) rules
for any part that differs (none today). The 6 classification / regression branches are ONE
module each officially and in raydn; the checkpoint lists all 6 copies, which must be identical.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from raydn.errors import CheckpointError
from raydn.io import atomic_torch_save
from raydn.models.init_weights import DETECTOR, InitReport
from raydn.presets import build_model, get_preset
from raydn.safe_load import load_weights_only
from raydn.weights import resolve_checkpoint

#: (official key prefix, raydn key prefix) rename rules, applied first match wins.
RENAMES: tuple[tuple[str, str], ...] = ()

#: Module paths whose numbered children are tied copies of child 0.
TIED_PREFIXES: tuple[str, ...] = ("pts_bbox_head.cls_branches.", "pts_bbox_head.reg_branches.")

_WRAPPERS = ("state_dict", "model", "module")


@dataclass
class ConversionReport:
    """Result of a conversion. Key lists are in raydn naming except ``unexpected`` /
    ``dropped`` (official naming)."""
    mapped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)
    tied_mismatch: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unwrapped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every expected key was found with the right shape, nothing was left over
        and tied copies were identical."""
        return not (self.missing or self.unexpected or self.shape_mismatch or self.tied_mismatch)

    def summary(self, max_list: int = 20) -> str:
        def block(title: str, items) -> list[str]:
            items = list(items)
            if not items:
                return []
            out = [f"  {title} ({len(items)}):"]
            out += [f"    {k}" for k in items[:max_list]]
            if len(items) > max_list:
                out.append(f"    ... and {len(items) - max_list} more")
            return out

        groups: dict[str, int] = {}
        for k in self.mapped:
            top = k.split(".", 1)[0]
            groups[top] = groups.get(top, 0) + 1
        lines = [f"conversion {'OK' if self.ok else 'FAILED'}: {len(self.mapped)} keys mapped"
                 + (" (" + ", ".join(f"{g}: {n}" for g, n in sorted(groups.items())) + ")" if groups else "")]
        if self.unwrapped:
            lines.append(f"  unwrapped: {', '.join(self.unwrapped)}")
        if self.renamed:
            lines.append(f"  renamed: {len(self.renamed)} keys")
        lines += block("dropped non-tensor entries", self.dropped)
        lines += block("missing (expected by the model, absent from the checkpoint)", self.missing)
        lines += block("unexpected (in the checkpoint, unknown to the model)", self.unexpected)
        lines += block("shape mismatch (key: checkpoint -> model)",
                       [f"{k}: {tuple(a)} -> {tuple(b)}" for k, (a, b) in self.shape_mismatch.items()])
        lines += block("tied copies that differ from copy 0", self.tied_mismatch)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _unwrap(sd: Mapping, report: ConversionReport) -> dict:
    sd = dict(sd)
    while True:
        tensors = [k for k, v in sd.items() if isinstance(v, Tensor)]
        if tensors:
            break
        for w in _WRAPPERS:
            if isinstance(sd.get(w), Mapping):
                report.unwrapped.append(w)
                sd = dict(sd[w])
                break
        else:
            raise CheckpointError("checkpoint: no tensors found (expected a state dict or a dict "
                                  f"with one of {_WRAPPERS}); top-level keys: {sorted(sd)[:10]}")
    if sd and all(k.startswith("module.") for k in sd if isinstance(sd[k], Tensor)):
        report.unwrapped.append("module.")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd


def _rename(key: str, rules) -> str:
    for src, dst in rules:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def _tied_parts(key: str):
    """``pts_bbox_head.cls_branches.3.0.weight`` -> (prefix, 3, '0.weight') or None."""
    for p in TIED_PREFIXES:
        if key.startswith(p):
            idx, _, rest = key[len(p):].partition(".")
            if idx.isdigit():
                return p, int(idx), rest
    return None


def expected_shapes(model_or_shapes) -> dict[str, tuple]:
    """Expected ``{key: shape}`` from an ``nn.Module`` (its state dict), a mapping of keys to
    shapes/tensors, or ``None`` (-> empty dict, no checking)."""
    if model_or_shapes is None:
        return {}
    if isinstance(model_or_shapes, nn.Module):
        return {k: tuple(v.shape) for k, v in model_or_shapes.state_dict().items()}
    return {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v)
            for k, v in model_or_shapes.items()}


def read_key_list(path: str | os.PathLike) -> dict[str, tuple]:
    """Parse an official key listing (``key<TAB>[d0, d1]<TAB>dtype`` per line, as
    ``state_dict_keys.txt``) into ``{key: shape}``."""
    out: dict[str, tuple] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise CheckpointError(f"{path}:{n}: expected 'key<TAB>[shape]<TAB>dtype', got {line!r}")
        dims = parts[1].strip().strip("[]").strip()
        out[parts[0]] = tuple(int(d) for d in dims.split(",") if d.strip()) if dims else ()
    return out


def convert_official_state_dict(sd: Mapping, expected=None,
                                renames=RENAMES) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map an official full-detector state dict (743 keys for R50) onto raydn names.

    Args:
        sd: the loaded checkpoint (plain state dict or wrapped in ``state_dict``/``model``,
            optionally with ``module.`` prefixes and non-tensor entries such as ``meta``).
        expected: a model, a ``{key: shape}`` mapping or None; when given, missing /
            unexpected / shape-mismatched keys are reported (and unexpected keys dropped from
            the result).
        renames: prefix rename rules (official -> raydn).

    Returns:
        (state dict in raydn naming, :class:`ConversionReport`). Tensors are not copied.
    """
    report = ConversionReport()
    sd = _unwrap(sd, report)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            report.dropped.append(k)
            continue
        nk = _rename(k, renames)
        if nk != k:
            report.renamed[k] = nk
        out[nk] = v
    # tied branches: every copy must equal copy 0
    for k, v in out.items():
        parts = _tied_parts(k)
        if parts and parts[1] > 0:
            ref = out.get(f"{parts[0]}0.{parts[2]}")
            if ref is None or ref.shape != v.shape or not torch.equal(ref, v):
                report.tied_mismatch.append(k)
    exp = expected_shapes(expected)
    if exp:
        report.missing = [k for k in exp if k not in out]
        inverse = {v: k for k, v in report.renamed.items()}
        report.unexpected = [inverse.get(k, k) for k in out if k not in exp]
        for k in list(out):
            if k not in exp:
                del out[k]
            elif tuple(out[k].shape) != exp[k]:
                report.shape_mismatch[k] = (tuple(out[k].shape), exp[k])
    report.mapped = [k for k in out if k not in report.shape_mismatch]
    return out, report


def to_official_state_dict(our_sd: Mapping[str, Tensor], renames=RENAMES) -> dict[str, Tensor]:
    """Inverse of :func:`convert_official_state_dict` (raydn -> official names). Tied branch
    copies are kept (raydn's state dict lists all of them, as the official one does)."""
    inverse = tuple((dst, src) for src, dst in renames)
    return {_rename(k, inverse): v for k, v in our_sd.items()}


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Sub-state-dict of the keys under ``prefix`` (e.g. ``'pts_bbox_head.'``), prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def load_checkpoint_file(path: str | os.PathLike, trust: bool = False) -> dict:
    """``torch.load`` on CPU with ``weights_only=True``; a file that needs arbitrary unpickling
    raises :class:`CheckpointError` unless ``trust=True`` (only for files you trust). ``path`` may
    name a shipped reference model (:func:`raydn.weights.resolve_checkpoint`, sha256 checked)."""
    return load_weights_only(resolve_checkpoint(path), map_location="cpu", trust=trust)


def load_official_checkpoint(path: str | os.PathLike, model: nn.Module, strict: bool = True,
                             trust: bool = False) -> ConversionReport:
    """Load an official checkpoint file into ``model`` (whose keys use the official top-level
    names). With ``strict`` any missing/unexpected/shape-mismatched key or differing tied copy
    raises :class:`CheckpointError` (message = the report); otherwise matching keys are loaded."""
    sd, report = convert_official_state_dict(load_checkpoint_file(path, trust), expected=model)
    if strict and not report.ok:
        raise CheckpointError(f"{path}: checkpoint does not match the model\n{report.summary()}")
    loadable = {k: v for k, v in sd.items() if k not in report.shape_mismatch}
    model.load_state_dict(loadable, strict=strict)
    return report


def save_state_dict_atomic(sd: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`raydn.io.atomic_path` (temporary file beside it, then ``os.replace``)."""
    atomic_torch_save(dict(sd), path)


# ----------------------------------------------------------------------------------------------
# raydn model files (``raydn convert`` output) and loading a ready model
# ----------------------------------------------------------------------------------------------

#: ``raydn convert`` output: ``{"format": MODEL_FORMAT, "preset": str | None, "model": state dict,
#: "source": str}`` (plain tensors and strings only: loads with ``weights_only=True``).
MODEL_FORMAT = "raydn-model/1"
#: Training checkpoints written by :mod:`raydn.engine.train` (same ``preset`` / ``model`` keys).
TRAIN_FORMAT = "raydn-train/1"
#: Presets tried (in order) when a checkpoint does not name its preset. The ``*_repdetr3d``
#: variants have the same weights as ``*_raydn`` (ray denoising adds no parameters), so a bare
#: state dict is attributed to the ``*_raydn`` one.
DETECTABLE_PRESETS: tuple[str, ...] = ("r50_raydn", "eva02l_raydn", "tiny_raydn")

_SHAPES_CACHE: dict[str, dict[str, tuple]] = {}


def preset_shapes(preset: str) -> dict[str, tuple]:
    """``{key: shape}`` of the detector of ``preset``, built on the ``meta`` device (no memory,
    ~1 s for EVA02-L); cached."""
    if preset not in _SHAPES_CACHE:
        with torch.device("meta"):
            model = build_model(preset)
        _SHAPES_CACHE[preset] = expected_shapes(model)
    return _SHAPES_CACHE[preset]


def detect_preset(sd: Mapping[str, Tensor], candidates=DETECTABLE_PRESETS) -> str | None:
    """The first preset whose detector has exactly the keys and shapes of ``sd`` (raydn
    naming), or None."""
    shapes = expected_shapes(sd)
    for name in candidates:
        if preset_shapes(name) == shapes:
            return name
    return None


def save_model_file(sd: Mapping[str, Tensor], path: str | os.PathLike, preset: str | None,
                    source: str = "") -> None:
    """Write a raydn model file (:data:`MODEL_FORMAT`) atomically."""
    save_state_dict_atomic({"format": MODEL_FORMAT, "preset": preset, "model": dict(sd),
                            "source": str(source)}, path)


def read_model_file(path: str | os.PathLike, trust: bool = False) -> tuple[dict, str | None]:
    """Load any supported checkpoint as ``(state dict in raydn naming, preset or None)``:
    a raydn model file, a raydn training checkpoint, or an official / plain state dict
    (unwrapped and renamed as in :func:`convert_official_state_dict`)."""
    ckpt = load_checkpoint_file(path, trust)
    if isinstance(ckpt, Mapping) and ckpt.get("format") in (MODEL_FORMAT, TRAIN_FORMAT):
        sd = ckpt.get("model")
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path}: {ckpt['format']} file without a 'model' state dict")
        return dict(sd), ckpt.get("preset")
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("format"), str):
        raise CheckpointError(f"{path}: unknown checkpoint format {ckpt['format']!r}; expected "
                              f"{MODEL_FORMAT!r}, {TRAIN_FORMAT!r} or an official checkpoint")
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    sd, _ = convert_official_state_dict(ckpt)
    return sd, None


def load_detector_weights(model: nn.Module, path: str | os.PathLike, trust: bool = False) -> InitReport:
    """Load a whole-detector file into ``model`` non-strictly (mmcv ``load_from``; see the module
    docstring). Returns the :class:`InitReport`; raises :class:`CheckpointError` naming the file
    when it cannot be read or when none of its tensors fits the model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"--load-from: checkpoint not found: {path}")
    sd, preset = read_model_file(path, trust=trust)
    layout = (f"raydn model, preset {preset}" if preset else
              "RayDN/StreamPETR detector keys (official layout)")
    own = model.state_dict()
    report = InitReport(kind=DETECTOR, path=path, layout=layout)
    to_load = {}
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.skipped.append((k, tuple(own[k].shape), tuple(v.shape)))
        else:
            to_load[k] = v
    if not to_load:
        hint = (" (its keys are an image backbone's: give it to --pretrained)"
                if any(k.startswith(("backbone.", "conv1.", "features.")) for k in sd) else "")
        raise CheckpointError(f"{path}: none of its {len(sd)} tensors fits the {type(model).__name__} "
                              f"(first keys: {', '.join(list(sd)[:4])}){hint}")
    # tied copies (the 6 cls / reg branches are one module): the file's copies must agree
    differing = [k for k in to_load if (p := _tied_parts(k)) and p[1] > 0
                 and f"{p[0]}0.{p[2]}" in to_load and not to_load[f"{p[0]}0.{p[2]}"].equal(to_load[k])]
    if differing:
        report.notes.append(f"{len(differing)} tied branch copies differ from copy 0 in the file "
                            f"(e.g. {differing[0]}); the model holds one copy: the last one loaded")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.missing = [k for k in own if k not in to_load and k not in {s[0] for s in report.skipped}]
    return report


def resolve_preset(recorded: str | None, requested: str | None, what: str) -> str | None:
    """The preset of a model file: the one it records wins; ``requested`` (``--preset`` /
    ``preset=``) only names the preset of a file that records none. Both given and different is a
    :class:`CheckpointError` naming both (a silent override would change the input transform, the
    input size and the detections); the same name twice is fine. ``what``: the file, for the
    message. Returns ``recorded or requested`` (None when neither)."""
    if recorded is not None and requested is not None and requested != recorded:
        raise CheckpointError(f"{what}: the model is preset {recorded!r} but preset {requested!r} was "
                              f"requested (--preset only applies to model files that name none: "
                              f"leave it out or pass --preset {recorded})")
    return recorded if recorded is not None else requested


def load_model(path: str | os.PathLike, preset: str | None = None, *, strict: bool = True,
               trust: bool = False, options=None) -> nn.Module:
    """Build the right preset's detector and load a checkpoint into it (CPU, train mode as
    built; call ``.eval()`` / ``.to(device)`` yourself).

    Accepts a ``raydn convert`` output (:data:`MODEL_FORMAT`), a raydn training checkpoint
    (:data:`TRAIN_FORMAT`) or an official checkpoint. The preset the file records wins;
    ``preset`` names the preset of a file that records none, and a different one is a
    :class:`CheckpointError` (:func:`resolve_preset`); a file naming none and given none is
    matched against :data:`DETECTABLE_PRESETS` by its keys and shapes.
    ``options``: :class:`raydn.models.options.RuntimeOptions` of the built model (default the fast
    paths; ``RuntimeOptions.for_export()`` for ONNX export).
    Raises :class:`CheckpointError` (naming the file) when the weights do not fit the model."""
    sd, recorded = read_model_file(path, trust)
    name = resolve_preset(recorded, preset, str(path)) or detect_preset(sd)
    if name is None:
        raise CheckpointError(f"{path}: the checkpoint names no preset and its keys/shapes match "
                              f"none of {', '.join(DETECTABLE_PRESETS)}; pass preset=...")
    try:
        get_preset(name)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    model = build_model(name, options=options)
    # training-only parameters (Group-DETR query groups, HeadConfig.query_groups; the dense depth
    # head, ModelConfig.depth): not part of the inference model, dropped
    sd = {k: v for k, v in sd.items() if not k.endswith("pts_bbox_head.group_reference_points.weight")
          and not k.startswith("depth_head.")}
    sd, report = convert_official_state_dict(sd, expected=model)
    if strict and not report.ok:
        raise CheckpointError(f"{path}: checkpoint does not match preset {name!r}\n{report.summary()}")
    model.load_state_dict({k: v for k, v in sd.items() if k not in report.shape_mismatch},
                          strict=strict)
    return model
