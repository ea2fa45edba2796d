"""raydn: RayDN (ECCV 2024) multi-view streaming 3D object detection in pure PyTorch."""
__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "list_presets", "get_preset"]


def build_model(preset="r50_raydn", *, options=None, **overrides):
    """Build a detector from a preset name (see :func:`list_presets`) or a ``Preset``;
    ``options``: :class:`raydn.models.options.RuntimeOptions` (speed/backend choices)."""
    from raydn.presets import build_model as _build
    return _build(preset, options=options, **overrides)


def list_presets():
    from raydn.presets import list_presets as _list
    return _list()


def get_preset(name):
    from raydn.presets import get_preset as _get
    return _get(name)
