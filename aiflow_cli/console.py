"""Output helpers shared by the commands: rich for people (on stderr when --json owns stdout), JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

#: Tables and progress for people. Commands that print JSON send everything else here, to stderr.
console = Console()
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Prints one JSON document on stdout (the only thing a ``--json`` command prints there)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_default) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: Iterable[Iterable[str]] = (), *, left: int = 1) -> Table:
    """A table whose first ``left`` columns (names) align left and the rest (numbers) right, with ``rows``."""
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        t.add_row(*row)
    return t


def goals_table(targets: dict[str, dict]) -> Table:
    """A benchmark's goals: ``{goal: {"measured_<what>": value, ..., "met": bool}}``, one row each."""
    t = Table(title="goals")
    for col in ["goal", "measured", "met"]:
        t.add_column(col)
    for name, v in targets.items():
        # Cosines near 1 need six places: at three, 0.9989 would read as 0.999 and pass for meeting a 0.999 floor.
        measured = ", ".join(
            f"{k.removeprefix('measured_')}={val:{'.6f' if 'cosine' in k else '.3f'}}"
            for k, val in v.items()
            if k != "met"
        )
        t.add_row(name, measured, "yes" if v["met"] else "[red]no[/]")
    return t


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
