"""How a training run's weights start: the plan (checked before any work) and its application.

Sources, in the order they are applied (later ones override earlier ones, as mmcv applies a
backbone ``init_cfg`` and then ``load_from``):

1. the random initialisation of :func:`raydn.presets.build_model`;
2. backbone weights: ``TrainOptions.pretrained`` (``--pretrained PATH``), else the preset's
   ``BackboneConfig.pretrained`` (the demo presets' ``'imagenet'``);
3. whole-detector weights, non-strict: ``TrainOptions.load_from`` (``--load-from PATH``).

Rules (:func:`plan_initialisation`):

* an official preset (its :attr:`raydn.presets.Preset.init` is set) needs one of them, or
  ``from_scratch=True`` (``--from-scratch``) to say that random weights are intended; otherwise
  :class:`InitialisationError` names the file, where to get it and the flags -- raised before the
  run folder is created or any data read;
* ``from_scratch`` with ``pretrained`` / ``load_from`` is a contradiction (error); it also skips
  the preset's own backbone weights (the demo's ImageNet MobileNetV2);
* a run that resumes from a checkpoint takes every weight from it: the initialisation is not
  applied (a line says so). With ``--resume auto`` the same command line therefore works for the
  first start (initialised) and for every restart (resumed).
* the files must exist (checked up front); they are read with ``weights_only=True`` unless
  ``TrainOptions.trust_checkpoint``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from raydn.engine.run_files import iteration_checkpoints
from raydn.errors import RaydnError
from raydn.interop.convert import load_detector_weights
from raydn.core.files import file_sha256
from raydn.models.init_weights import backbone_init_report


class InitialisationError(RaydnError):
    """A training run whose initialisation is missing, contradictory or not found."""


@dataclass(frozen=True)
class InitPlan:
    """What :func:`apply_initialisation` will load. ``pretrained``: backbone weights (a path or
    ``'imagenet'``) and ``pretrained_from`` where that came from (``'--pretrained'`` or
    ``'preset'``); ``load_from``: whole-detector weights; ``resuming``: a checkpoint provides the
    weights (nothing is loaded); ``expected``: the preset's :class:`raydn.presets.InitSpec`."""
    preset: str
    pretrained: str | None = None
    pretrained_from: str | None = None
    load_from: str | None = None
    from_scratch: bool = False
    resuming: bool = False
    trust: bool = False
    expected: object = None          # raydn.presets.InitSpec | None
    ignored_flags: tuple = field(default_factory=tuple)  # flags not applied because of resuming

    def describe(self) -> str:
        """One line: what initialises the run."""
        if self.resuming:
            extra = (f" ({', '.join(self.ignored_flags)} not applied: they initialise a fresh run)"
                     if self.ignored_flags else "")
            return f"initialisation: weights from the resumed checkpoint{extra}"
        if self.from_scratch:
            return "initialisation: from scratch (random weights), as requested by --from-scratch"
        parts = []
        if self.pretrained:
            parts.append(f"backbone <- {self.pretrained}"
                         + (" (preset's BackboneConfig.pretrained)" if self.pretrained_from == "preset" else ""))
        if self.load_from:
            parts.append(f"detector (non-strict) <- {self.load_from}")
        return "initialisation: " + ("; then ".join(parts) if parts else "random weights (the preset needs none)")


def missing_init_message(preset_name: str, spec) -> str:
    """The one-line error of an official preset started without its initialisation."""
    get = f"{spec.how.split(' (')[0]}: {spec.source}" if spec.how else f"download: {spec.source}"
    other = ("--load-from PATH for whole-detector weights" if spec.flag == "--pretrained"
             else "--pretrained PATH for backbone weights only")
    return (f"preset {preset_name} starts from {spec.kind} weights {spec.file_name} ({get}): pass "
            f"{spec.flag} PATH (or {other}), or --from-scratch to train from random weights on purpose")


def plan_initialisation(preset, opts, resuming: bool, model_cfg=None) -> InitPlan:
    """Check the initialisation options of ``opts`` (:class:`raydn.engine.train.TrainOptions`)
    against ``preset`` (:class:`raydn.presets.Preset`) and return the plan; raises
    :class:`InitialisationError` (see the module docstring). ``model_cfg``: the run's
    :class:`raydn.config.ModelConfig` (overrides applied; default the preset's), whose
    ``backbone.pretrained`` counts as an initialisation. Reads no weights, creates nothing."""
    pretrained = getattr(opts, "pretrained", None) or None
    load_from = getattr(opts, "load_from", None) or None
    scratch = bool(getattr(opts, "from_scratch", False))
    trust = bool(getattr(opts, "trust_checkpoint", False))
    if scratch and (pretrained or load_from):
        given = " and ".join(f for f, v in (("--pretrained", pretrained), ("--load-from", load_from)) if v)
        raise InitialisationError(f"--from-scratch contradicts {given}: give one or the other")
    if resuming:
        flags = tuple(f for f, v in (("--pretrained", pretrained), ("--load-from", load_from),
                                     ("--from-scratch", scratch)) if v)
        return InitPlan(preset=preset.name, resuming=True, expected=preset.init, ignored_flags=flags,
                        trust=trust)
    for flag, path in (("--pretrained", pretrained), ("--load-from", load_from)):
        if path and not (flag == "--pretrained" and path == "imagenet") and not os.path.isfile(path):
            raise InitialisationError(f"{flag} {path}: file not found")
    configured = (model_cfg or preset.model).backbone.pretrained
    if scratch:
        return InitPlan(preset=preset.name, from_scratch=True, expected=preset.init, trust=trust)
    if not (pretrained or load_from or configured) and preset.init is not None:
        raise InitialisationError(missing_init_message(preset.name, preset.init))
    return InitPlan(preset=preset.name, pretrained=pretrained or configured,
                    pretrained_from=("--pretrained" if pretrained else "preset") if (pretrained or configured) else None,
                    load_from=load_from, trust=trust, expected=preset.init)


def will_resume(out_dir, where: str | None) -> bool:
    """Whether a run with ``--resume where`` will continue from a checkpoint (cheap: nothing is
    read): a path always, ``'auto'`` when ``out_dir`` holds ``latest.pt`` or an ``iter_*.pt``. The
    trainer re-plans if the checkpoint then turns out unusable."""

    if not where:
        return False
    if where != "auto":
        return True
    return (Path(out_dir) / "latest.pt").is_file() or bool(iteration_checkpoints(out_dir))


def apply_initialisation(model, plan: InitPlan) -> list:
    """Load what ``plan`` says into ``model`` (a :class:`raydn.models.detector.RayDNDetector`, on
    CPU, before it is moved or wrapped); returns the :class:`raydn.models.init_weights.InitReport`
    of each file, in order. A file whose SHA-256 does not match the digest the preset records
    gets a note (not an error: a re-saved copy of the right weights has another digest)."""
    if plan.resuming or plan.from_scratch:
        return []
    reports = []
    if plan.pretrained:
        rep = backbone_init_report(model.load_pretrained_backbone(plan.pretrained, trust=plan.trust))
        if plan.pretrained_from == "--pretrained":
            rep.sha256 = file_sha256(rep.path)
        reports.append(rep)
    if plan.load_from:
        rep = load_detector_weights(model, plan.load_from, trust=plan.trust)
        rep.sha256 = file_sha256(rep.path)
        reports.append(rep)
    spec = plan.expected
    for rep in reports:
        if spec is None or rep.sha256 is None or rep.kind != spec.kind:
            continue
        want = spec.sha256 or spec.sha256_prefix
        if want and not rep.sha256.startswith(want):
            rep.notes.append(f"sha256 {rep.sha256[:12]}... is not the official {spec.file_name}'s "
                             f"({want}...): another or a re-saved file")
        elif want:
            rep.notes.append(f"sha256 matches the official {spec.file_name} ({want}...)")
    return reports


def init_report_json(plan: InitPlan, reports: list) -> dict:
    """The content of the run folder's ``init_report.json``."""
    spec = plan.expected
    return {"preset": plan.preset, "plan": plan.describe(),
            "resuming": plan.resuming, "from_scratch": plan.from_scratch,
            "expected": None if spec is None else {"kind": spec.kind, "file_name": spec.file_name,
                                                    "flag": spec.flag, "source": spec.source},
            "files": [r.as_dict() for r in reports]}


def format_init(plan: InitPlan, reports: list) -> str:
    """The printed initialisation report: the plan line, then each file's summary."""
    return "\n".join([plan.describe()] + [r.summary() for r in reports])


__all__ = ["InitPlan", "InitialisationError", "apply_initialisation", "format_init", "init_report_json",
           "missing_init_message", "plan_initialisation", "will_resume"]
