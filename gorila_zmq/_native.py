"""Chooses between the compiled Cython kernels (gorila_zmq._ext.*) and their NumPy fallbacks.

`GORILA_PUREPYTHON=1` selects the NumPy implementations everywhere (as msgpack's MSGPACK_PUREPYTHON);
the test suite runs in both modes. Without it, a missing compiled module is an error that says how
to build it, never a silent slowdown.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType


def pure_python() -> bool:
    return os.environ.get("GORILA_PUREPYTHON", "") not in ("", "0")


def load_ext(name: str) -> ModuleType | None:
    """The compiled module `gorila_zmq._ext.<name>`, or None in pure-Python mode."""
    if pure_python():
        return None
    try:
        return importlib.import_module(f"gorila_zmq._ext.{name}")
    except ImportError as e:
        raise ImportError(
            f"gorila-zmq: compiled kernel '{name}' is not built ({e}). Run `make build` "
            f"(or `python setup.py build_ext --inplace`), or set GORILA_PUREPYTHON=1 for the NumPy fallback."
        ) from e


def try_load_ext(name: str) -> ModuleType | None:
    """The compiled module if it is importable, else None (for benchmarks that compare both)."""
    try:
        return importlib.import_module(f"gorila_zmq._ext.{name}")
    except ImportError:
        return None
