"""Benchmarks: each measures aiflow against a baseline in the same run and prints ratios.

The baselines' own packages (gRPC, python-zstandard) and the real weights the codec's fidelity is measured on
are the ``bench`` extra (``pip install 'aiflow[bench]'``), not dependencies of aiflow itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from aiflow_cli.errors import InputError


def require_extra(module: str, package: str, extra: str = "bench") -> ModuleType:
    """Imports ``module`` (from the PyPI package ``package``, part of aiflow's ``extra``) or raises an
    :class:`InputError` that says which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"this benchmark needs {package} (module {module}), which aiflow installs with its "
            f"{extra!r} extra: pip install 'aiflow[{extra}]'"
        ) from None
