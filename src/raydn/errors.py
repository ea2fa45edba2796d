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
