import signal

"""Errors raised for bad user input. Messages name the file/field and what was expected."""


class RaydnError(Exception):
    """Base class of the errors the CLI reports as clean one-line messages (exit code 2)."""


class DataError(RaydnError):
    """Bad or missing input data: files, calibration, boxes, info records."""


class CheckpointError(RaydnError):
    """A checkpoint that cannot be loaded or does not match the model."""


class UnknownPresetError(RaydnError, KeyError):
    """A preset name that does not exist (also a ``KeyError``, as ``get_preset`` always raised)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FolderBusyError(RaydnError):
    """An output folder another running raydn command is writing into (its lock is held)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP received (``timeout``, a scheduler, a container runtime, a closed terminal).

    Raised by the handler :func:`raydn.cli.main` installs, so that the clean-up of an interrupted
    command is the one Ctrl-C already runs (``except BaseException`` / ``finally`` blocks, loader
    workers that leave quietly on ``KeyboardInterrupt``); the CLI then exits ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name

    def __str__(self) -> str:
        return self.name


class PeerLostError(RaydnError):
    """Another process of a multi-process (DDP) run died or stopped answering within the
    collective timeout (``--dist-timeout``); the run can be resumed from its latest checkpoint."""


class ConfigError(RaydnError):
    """A run configuration (``--config`` file, ``--set``) with an unknown key or a value of the wrong
    type, or a resume whose configuration differs from the run folder's."""
