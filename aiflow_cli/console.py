"""Output helpers shared by the commands: rich for people (on stderr when --json owns stdout), JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

#: Tables and progress for people. Commands that print JSON send everything else here, to stderr.
console = Console()
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Prints one JSON document on stdout (the only thing a ``--json`` command prints there)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
