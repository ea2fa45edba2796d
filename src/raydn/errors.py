"""Errors raised for bad user input. Messages name the file/field and what was expected."""


class RaydnError(Exception):
    """Base class of the errors the CLI reports as clean one-line messages (exit code 2)."""


class DataError(RaydnError):
    """Bad or missing input data: files, calibration, boxes, info records."""


class CheckpointError(RaydnError):
    """A checkpoint that cannot be loaded or does not match the model."""
