"""Deployments the runtime_env tests serve: they report the environment they run in.

Importable by name, so replicas import them rather than unpickle them. The
modules they import (from a working dir, or a package a pip environment
installed) exist only in the replica, never in the test process.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import trioserve as serve


@serve.deployment
class Environment:
    """Tells what it sees: an env var, its cwd, sys.path, its interpreter."""

    def __call__(self, name: str) -> dict[str, Any]:
        return {
            "value": os.environ.get(name),
            "cwd": os.getcwd(),
            "path0": sys.path[0] if sys.path else "",
            "executable": sys.executable,
            "prefix": sys.prefix,
        }


@serve.deployment
class Importer:
    """Imports the module ``name`` and returns its ``VALUE`` and where it came from."""

    def __call__(self, name: str, data_file: str = "") -> dict[str, Any]:
        module = importlib.import_module(name)
        import trioserve

        return {
            "value": getattr(module, "VALUE", None),
            "file": getattr(module, "__file__", ""),
            "data": Path(data_file).read_text() if data_file else "",
            "trioserve": trioserve.__file__,
            "executable": sys.executable,
            "pid": os.getpid(),
        }
