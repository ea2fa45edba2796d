"""Reference weights shipped inside the package, with their metadata (torchvision-style).

A reference model is the weights of a preset trained with a recorded recipe far past the demo's
budget: what the same recipe gives with more compute. Each is two files in this folder:
``<file>.pt`` (a raydn model file, :func:`raydn.interop.convert.save_model_file`, weights only,
floating tensors stored in fp16) and ``<file>.json``, its metadata: the preset, the exact command
that trained it, iterations, seed, CPU-hours, the metric on synthetic ``mini_val`` and on the small
regression set of the tests (``tests/models/test_reference_model.py``), and the sha256 of the
``.pt``. The files are made once by ``tools/reference_model.py ship`` and replaced only when the
recipe changes.

Everything that takes ``--checkpoint`` takes a reference model's name too
(:func:`resolve_checkpoint`: an existing path wins; ``raydn presets`` lists the names). The file's
sha256 is checked against the metadata before it is read.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from raydn.core.files import file_sha256
from raydn.errors import CheckpointError

__all__ = [
    "WEIGHTS_DIR",
    "ReferenceModel",
    "get_reference_model",
    "list_reference_models",
    "resolve_checkpoint",
]

#: this folder: the shipped ``.pt`` / ``.json`` pairs
WEIGHTS_DIR = Path(__file__).resolve().parent

#: registered reference models: name -> file stem in :data:`WEIGHTS_DIR`
_REGISTRY = {"demo_raydn-reference": "demo_raydn_reference"}


@dataclass(frozen=True)
class ReferenceModel:
    """One shipped reference model: ``name`` (what ``--checkpoint`` accepts), ``path`` of the
    ``.pt`` file and its ``meta`` (the ``.json``: preset, command, iterations, seed, metrics,
    sha256, ...)."""

    name: str
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def preset(self) -> str:
        return str(self.meta.get("preset"))

    def verify(self) -> Path:
        """The ``.pt`` path after checking its sha256 against the metadata (raises
        :class:`CheckpointError` on a missing or altered file)."""
        if not self.path.is_file():
            raise CheckpointError(f"reference model {self.name!r}: {self.path} is missing (a broken "
                                  "installation? reinstall raydn)")
        want = self.meta.get("sha256")
        got = file_sha256(self.path)
        if want != got:
            raise CheckpointError(f"reference model {self.name!r}: {self.path} has sha256 {got}, its "
                                  f"metadata records {want} (altered or truncated file)")
        return self.path


def list_reference_models() -> list[str]:
    """Names of the reference models whose files are present in the package."""
    return [n for n, stem in _REGISTRY.items() if (WEIGHTS_DIR / f"{stem}.json").is_file()]


def get_reference_model(name: str) -> ReferenceModel:
    """The registered reference model ``name`` (metadata read, file not yet verified)."""
    if name not in _REGISTRY:
        raise CheckpointError(f"unknown reference model {name!r}; shipped: "
                              f"{', '.join(list_reference_models()) or 'none'}")
    stem = _REGISTRY[name]
    meta_path = WEIGHTS_DIR / f"{stem}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"reference model {name!r}: {meta_path} is missing (not shipped in this "
                              "installation)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"reference model {name!r}: {meta_path} is not valid JSON ({e})") from None
    return ReferenceModel(name=name, path=WEIGHTS_DIR / f"{stem}.pt", meta=meta)


def resolve_checkpoint(path_or_name: str | os.PathLike) -> str:
    """A checkpoint argument -> a file path: an existing path as given, else a reference model's
    name -> its verified packaged file; anything else is returned unchanged (the loader then names
    the missing file)."""
    s = os.fspath(path_or_name)
    if os.path.exists(s) or s not in _REGISTRY:
        return s
    return os.fspath(get_reference_model(s).verify())
