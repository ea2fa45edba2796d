"""Loading ``.pt`` / ``.pth`` files with ``torch.load(weights_only=True)`` and explaining failures.

A failed safe load can mean four different things, and the advice differs:

* the file is not a PyTorch checkpoint at all (random bytes, an image, a text file, a plain pickle):
  say so, and never suggest unsafe loading;
* the file is a checkpoint whose extra entries need other Python classes (e.g. numpy scalars or an
  mmcv ``Config`` in ``meta``): ``--trust-checkpoint`` (full unpickling) is the way out, for trusted files;
* the file asks to import and call something that no checkpoint needs (``os.system``,
  ``subprocess.*``, ``builtins.eval``, ...): refuse it -- nothing was executed -- without that advice;
* the file is truncated or corrupt (an interrupted copy or save).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from raydn.errors import CheckpointError

#: Objects no checkpoint needs: importing them from a pickle means running commands or code.
_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
                      "pty", "code", "ctypes", "pickle", "marshal", "webbrowser", "multiprocessing",
                      "asyncio", "signal", "pdb", "timeit", "platform")
_DANGEROUS_BUILTINS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "open", "input",
                       "breakpoint", "globals", "locals", "vars", "delattr")
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _kind_of_file(path: Path) -> str:
    """'zip' (torch.save), 'pickle', 'empty' or 'other', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "other"


def explain_load_error(path: Path, exc: BaseException, trust_flag: str = "--trust-checkpoint") -> str:
    """A one-paragraph explanation of why ``torch.load(path, weights_only=True)`` failed."""
    kind = _kind_of_file(path)
    size = path.stat().st_size
    if kind == "empty":
        return f"{path}: empty file (0 bytes); expected a PyTorch checkpoint"
    if kind == "other":
        with open(path, "rb") as f:
            head = f.read(4)
        return (f"{path}: not a PyTorch checkpoint ({size} bytes starting with {head.hex()}; "
                f"expected a torch.save zip archive or a pickle)")
    text = str(exc)
    found = _GLOBAL_RE.search(text)
    if found:
        name = found.group(1)
        module, _, attr = name.partition(".")
        base = (f"{path}: refused to load: the file asks to import {name!r}, which safe loading "
                f"(torch.load weights_only=True) does not do -- nothing was executed")
        if module in _DANGEROUS_MODULES or (module == "builtins" and attr in _DANGEROUS_BUILTINS):
            return (f"{base}. No checkpoint needs {name!r} (it runs commands or code): this file is not a "
                    f"checkpoint to load, with or without {trust_flag}")
        return (f"{base}. The checkpoint needs unsafe unpickling: it stores Python objects besides tensors "
                f"(e.g. in 'meta'); re-save its 'state_dict' only, or pass {trust_flag} if you trust the file")
    if kind == "pickle":
        return (f"{path}: not a PyTorch checkpoint: a Python pickle that safe loading cannot read "
                f"({type(exc).__name__}: {text.strip().splitlines()[-1][:200] if text.strip() else ''}); "
                f"expected a file written by torch.save")
    return (f"{path}: corrupt or truncated checkpoint ({size} bytes; {type(exc).__name__}: "
            f"{text.strip().splitlines()[0][:200] if text.strip() else ''})")


def load_weights_only(path: str | os.PathLike, map_location="cpu", trust: bool = False,
                      trust_flag: str = "--trust-checkpoint"):
    """``torch.load`` with ``weights_only=not trust``; every failure becomes a :class:`CheckpointError`
    that names the file and says what kind of problem it is (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError,
            AttributeError, TypeError, IndexError) as e:
        raise CheckpointError(explain_load_error(path, e, trust_flag)) from None


__all__ = ["explain_load_error", "load_weights_only"]
