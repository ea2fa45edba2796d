"""Re-export (documented Python API): :class:`FrameBatch` lives in :mod:`raydn.core.batch`."""
from raydn.core.batch import FrameBatch

__all__ = ["FrameBatch"]
