"""The ``raydn`` command: a thin dispatcher. Each subcommand lives in ``raydn/commands/<name>.py``
with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP threads that spin while waiting make every parallel op cost milliseconds as soon as the
# cores are shared (data-loader workers, other processes); passive waiting avoids it. Must be set
# before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from raydn import __version__

#: (subcommand, module) in the order shown by ``raydn --help``.
COMMANDS = (
    ("demo", "raydn.commands.demo"),
    ("synth", "raydn.commands.synth"),
    ("prepare", "raydn.commands.prepare"),
    ("train", "raydn.commands.train"),
    ("eval", "raydn.commands.eval"),
    ("infer", "raydn.commands.infer"),
    ("convert", "raydn.commands.convert"),
    ("export", "raydn.commands.export"),
    ("presets", "raydn.commands.presets"),
    ("smoke", "raydn.commands.smoke"),
)


from raydn.errors import RaydnError as UserError  # noqa: E402  (re-exported for commands)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (unknown command, bad option): ``raydn: error: ...``,
    exit code 2, the full usage left to ``--help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="raydn",
        description="RayDN multi-view streaming 3D object detection (pure PyTorch).")
    parser.add_argument("--version", action="version", version=f"raydn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _name=name)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"raydn {args._name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raydn {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
