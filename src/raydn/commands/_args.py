"""Arguments shared by the ``raydn`` commands, each spelled (name, default, help) in one place.

* :func:`add_device_argument` / :func:`resolve_device`: ``--device`` with one default rule in every
  command that computes (``auto``: ``cuda`` if ``torch.cuda.is_available()``, else ``cpu``);
* :func:`add_trust_argument`: ``--trust-checkpoint`` on every command that loads a checkpoint;
* :func:`add_deprecated_alias`: an old spelling of an option, kept for one release: it stores into
  the new option's ``dest`` and prints ``raydn CMD: warning: --old is deprecated, use --new`` on
  stderr. It is hidden from ``--help``; the README's command-line reference lists it.

The naming rules these apply (README, "Command-line reference"): the info pickle is ``--data``, a
folder of images is ``--images``, a count of frames is ``--num-frames``, an iteration cap is
``--max-iters``, a wall-clock budget is ``--time-budget MINUTES``.
"""
from __future__ import annotations

import argparse
import sys

from raydn.engine.tracking import TRACKERS
from raydn.errors import RaydnError

#: ``--device`` values besides a torch device string
AUTO_DEVICE = "auto"


class DeprecatedAlias(argparse.Action):
    """The old spelling ``option_strings[0]`` of the option ``new`` (an action of the same parser):
    parses like it, stores into its ``dest`` and warns on stderr each time it is given."""

    def __init__(self, option_strings, dest, *, new: argparse.Action, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    @property
    def new_name(self) -> str:
        """The new option's preferred (longest) spelling, e.g. ``--data``."""
        return max(self.new.option_strings, key=len)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string or self.option_strings[0]} is deprecated, use "
              f"{self.new_name} (the old spelling will be removed in the next release)", file=sys.stderr)
        if self.nargs == 0:  # a flag (store_true / store_const): store the new option's constant
            values = self.new.const
        if isinstance(self.new, argparse._AppendAction):  # e.g. a repeatable option
            items = list(getattr(namespace, self.dest, None) or [])
            setattr(namespace, self.dest, items + [values])
        else:
            setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: argparse.Action) -> argparse.Action:
    """Register ``old`` (e.g. ``"--infos"``) as a deprecated spelling of ``new`` (the action that
    ``parser.add_argument("--data", ...)`` returned). ``parser`` may be an argument group.
    A required ``new`` is refused: argparse would still demand the new spelling."""
    if new.required:
        raise ValueError(f"{old}: a deprecated alias of the required option {new.option_strings} "
                         "would not satisfy it")
    if not old.startswith("--"):
        raise ValueError(f"{old}: an alias must be a long option")
    return parser.add_argument(
        old, dest=new.dest, action=DeprecatedAlias, new=new, nargs=new.nargs, const=new.const,
        type=new.type, choices=new.choices, metavar=new.metavar, help=argparse.SUPPRESS,
        default=argparse.SUPPRESS)


def deprecated_aliases(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{old spelling: new spelling}`` of every deprecated alias of ``parser``."""
    return {a.option_strings[0]: a.new_name for a in parser._actions if isinstance(a, DeprecatedAlias)}


def add_device_argument(parser) -> argparse.Action:
    """``--device``: the one default rule of every command that computes."""
    return parser.add_argument(
        "--device", default=AUTO_DEVICE, metavar="DEVICE",
        help="torch device: auto (cuda if available, else cpu), cpu, cuda or cuda:N (default: auto)")


def resolve_device(spec: str | None) -> str:
    """``--device`` value -> a torch device string. ``auto`` (or None): ``"cuda"`` if CUDA is
    available, else ``"cpu"``; anything else must parse as a torch device, and a CUDA device must
    exist. Raises :class:`raydn.errors.RaydnError` with a one-line message otherwise."""
    import torch

    if spec is None or spec == AUTO_DEVICE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise RaydnError(f"--device {spec!r}: not a torch device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RaydnError(f"--device {spec}: no CUDA device is available here (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RaydnError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(spec)


def add_trust_argument(parser) -> argparse.Action:
    """``--trust-checkpoint``: every command that loads a checkpoint reads it with
    ``torch.load(weights_only=True)`` unless this is given (see :mod:`raydn.safe_load`)."""
    return parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="load checkpoint files with full unpickling (torch.load weights_only=False), e.g. an "
             "official .pth whose 'meta' holds Python objects: only for files you trust")


def add_progress_argument(parser) -> argparse.Action:
    """``--no-progress``: every command with a progress bar spells and explains it the same way."""
    return parser.add_argument("--no-progress", action="store_true",
                               help="no progress bars (e.g. for log files)")


def add_tracker_arguments(p, *, default_birth: float = 0.0) -> None:
    """``--tracker memory|velocity`` and its thresholds (:mod:`raydn.engine.tracking`), the same
    wherever tracks are produced (``raydn infer``, ``raydn eval --tracking``)."""
    p.add_argument("--tracker", choices=TRACKERS, default=TRACKERS[0],
                   help="track ids: 'memory' (a track is a memory query of the model; default) or "
                        "'velocity' (CenterPoint's greedy tracker by predicted position)")
    p.add_argument("--birth-score", type=float, default=default_birth, metavar="S",
                   help="memory tracker: a track starts at its first detection with score >= S")
    p.add_argument("--keep-score", type=float, default=0.0, metavar="S",
                   help="a started track is reported while its detections score >= S "
                        "(velocity tracker: detections below S are not tracked)")
