"""Re-export: :class:`TemporalState` lives in :mod:`raydn.core.state` (the bottom layer)."""
from raydn.core.state import TemporalState

__all__ = ["TemporalState"]
