"""Typer options that several verbs share: the speculation family (``--speculate``, ``--draft``, ``--precheck``).

One definition each (flag, default, what the flag means); a verb adds only what the option does in it (``aiflow
run`` drafts with it, ``aiflow plan`` prices it, ``aiflow bench decode`` adds modes for it).
"""

from __future__ import annotations

from typing import Any

import typer

#: what ``--speculate K|auto`` is, wherever it is taken
SPECULATE = "K|auto: the device drafts K tokens per round with its own layers (early exit)"
#: what a draft MODEL is (``--draft``)
DRAFT_MODEL = "a draft MODEL with the same vocabulary, run on the device"
#: the draft sources ``aiflow run --draft`` accepts (runtime/drafters.py)
DRAFT_SOURCES = (
    "auto (default: the trained exit of the device's last block if `aiflow draft train` made one, else the "
    f"untrained exit) | exit | untrained | int8 (the model itself with int8 linear layers, CPU) | MODEL "
    f"({DRAFT_MODEL}); exit:N, auto:N, untrained:N draft over the N "
    "most frequent tokens only (`aiflow draft vocab` counts them; exact either way)"
)
#: what the edge pre-check does (``--precheck``; runtime/precheck.py)
PRECHECK = (
    "the edge checks each greedy round's drafts with its own exit (its last block + the head) and forwards only "
    "those up to the first it rejects, so the cloud verifies fewer positions"
)


def speculate_option(then: str) -> Any:
    """``--speculate K|auto`` (default None: off); ``then`` says what the verb does with it."""
    return typer.Option(None, "--speculate", help=f"{SPECULATE}; {then}")


def draft_option(help_: str) -> Any:
    """``--draft`` (default None); ``help_`` names what it takes here (:data:`DRAFT_SOURCES`, :data:`DRAFT_MODEL`)."""
    return typer.Option(None, "--draft", help=help_)


def precheck_option(lead: str) -> Any:
    """``--precheck`` (a switch, default off); ``lead`` says when or how the verb applies :data:`PRECHECK`."""
    return typer.Option(False, "--precheck", help=f"{lead}{PRECHECK}.")
