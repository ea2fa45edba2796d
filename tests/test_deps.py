"""tests/_deps.py ``require``: a package that .ci/run installs is skipped where absent, except under
CI, where its absence fails (a broken install step cannot pass green)."""
from __future__ import annotations

import pytest

import _deps

MISSING = "raydn_test_no_such_module"


@pytest.fixture
def missing_is_ci_installed(monkeypatch):
    monkeypatch.setitem(_deps.CI_INSTALLED, MISSING, "extra [test]")


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_under_ci_a_missing_package_fails_naming_the_install_step(monkeypatch, missing_is_ci_installed, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception,
                       match=rf"{MISSING} \(extra \[test\]\) is installed by \.ci/run: the install step is broken "
                             r"\(ModuleNotFoundError: "):
        _deps.require(MISSING)


@pytest.mark.parametrize("value", [None, "", "0", "false"])
def test_elsewhere_a_missing_package_skips(monkeypatch, missing_is_ci_installed, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception):
        _deps.require(MISSING)


@pytest.mark.parametrize("ci", [True, False])
def test_an_installed_module_is_returned(monkeypatch, ci):
    monkeypatch.setenv("CI", "true" if ci else "")
    mod = _deps.require("raydn.geometry")
    assert mod.__name__ == "raydn.geometry" and hasattr(mod, "CAMERA_NAMES")


def test_a_package_ci_does_not_install_is_refused():
    with pytest.raises(ValueError, match=r"'cupy' is not installed by \.ci/run"):
        _deps.require("cupy")
