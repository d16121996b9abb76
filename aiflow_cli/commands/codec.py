"""CLI verbs of the codec: ``aiflow codecs`` and ``aiflow bench codec``."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
