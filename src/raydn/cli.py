"""The ``raydn`` command: a thin dispatcher. Each subcommand lives in ``raydn/commands/<name>.py``
with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import os
import select
import sys

# OpenMP threads that spin while waiting make every parallel op cost milliseconds as soon as the
# cores are shared (data-loader workers, other processes); passive waiting avoids it. Must be set
# before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from raydn import __version__, termination  # noqa: E402  (after the OMP setting above)

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
    ("config", "raydn.commands.config"),
    ("smoke", "raydn.commands.smoke"),
)


from raydn.errors import RaydnError as UserError  # noqa: E402  (re-exported for commands)
from raydn.errors import Terminated


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
        with termination.handlers():  # SIGTERM / SIGHUP -> Terminated: the clean-up Ctrl-C runs
            rc = int(args._run(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
            return rc
    except UserError as e:
        _say(f"raydn {args._name}: error: {e}")
        return 2
    except Terminated as e:
        _say(f"raydn {args._name}: terminated ({e.name})")
        return 128 + e.signum
    except KeyboardInterrupt:
        _say(f"raydn {args._name}: interrupted")
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # the reader went away (``raydn infer ... | head``): like a tool killed by SIGPIPE, quietly;
        # stdout points to devnull so that the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _say(line: str) -> None:
    """One line on stderr (nothing if stderr is gone too, e.g. after SIGHUP)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (``poll`` reports an error on it)."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll (not POSIX), stdout without a descriptor
        return False


if __name__ == "__main__":
    sys.exit(main())
