"""Shared pytest fixtures.

``shared_dir``: the ``../shared`` folder beside the checkout (override with RAYDN_SHARED). Parity
tests need it; they are skipped where it is absent, except under CI (CI=true) where that fails.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RAYDN_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "official"


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not FIXTURES.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"official fixtures not found at {FIXTURES}")
        pytest.skip(f"official fixtures not found at {FIXTURES}")
    return FIXTURES


def load_fixture(name: str):
    """Load ``../shared/fixtures/official/<name>`` safely (weights_only)."""
    path = FIXTURES / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"official fixture missing: {path}")
        pytest.skip(f"official fixture missing: {path}")
    return torch.load(path, weights_only=True, map_location="cpu")
