"""Option checks the runtime verbs run before importing torch, loading a model or starting a server.

A bad flag, a missing file or a plan that cannot serve the role is answered in a fraction of a second, in one
line and with the exit code of its error class. The library classes (:class:`TierServer`, :class:`Pipeline`,
:class:`TierNode`) check the same again (they are called without the CLI too); these checks only come first, and
only use modules that do not import torch (the plan schema, the transport's identities, the metrics address).
``tests/test_startup.py`` keeps them so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from aiflow_cli.errors import InputError
from aiflow_cli.plan.schema import Plan, load_plan
from aiflow_cli.runtime.roles import check_next_hop, check_role, check_trust
from aiflow_cli.task import takes_image
from aiflow_cli.timing import check_speed
from aiflow_cli.transport import as_identity


def _plan(path: Path) -> Plan:
    return load_plan(path)  # SchemaError / InputError naming the file


def check_serve(
    role: str,
    plan_path: Path,
    *,
    identity: Path,
    trust: Sequence[str],
    insecure_dev: bool,
    next_addr: Optional[str],
    speed: float,
    dilation: float,
    metrics: Optional[str],
) -> None:
    """``aiflow serve`` (one process): the role, trust, metrics address, plan, speed and next tier."""
    check_role(role)
    check_trust(trust, insecure_dev)
    if metrics is not None:
        from aiflow_cli.runtime.metrics import parse_listen

        parse_listen(metrics)
    plan = _plan(plan_path)
    check_speed(speed, dilation)
    check_next_hop(plan, role, bool(next_addr), "next_addr")
    as_identity(identity)


def check_run(
    input_: str,
    plan_path: Path,
    *,
    edge: Optional[str],
    identity: Path,
    timeout_s: float,
    fallback: str,
    speed: float,
    speculate: Optional[str],
    draft: Optional[str],
) -> None:
    """``aiflow run``: the plan, the fallback, the deadline, the edge's address, the identity and the input file."""
    plan = _plan(plan_path)
    if fallback not in ("none", "local"):
        raise InputError(f"--fallback {fallback!r}: choose none or local")
    if not timeout_s > 0:
        raise InputError(f"--timeout {timeout_s}: must be > 0 seconds")
    check_speed(speed, 1.0)
    check_next_hop(plan, "device", bool(edge), "edge")
    if draft is not None and speculate is None:
        raise InputError(f"--draft {draft}: drafts are for speculation; give --speculate too")
    as_identity(identity)
    request_input(plan.task, input_)


def request_input(task: str, value: str) -> dict[str, Any]:
    """``aiflow run``'s INPUT as the pipeline takes it: an image file's path (image models), else the text."""
    if takes_image(task):
        p = Path(value)
        if not p.is_file():
            raise InputError(f"{task} models take an image file; no file {value!r}")
        return {"image": p}  # read by the pipeline: the file itself is uploaded when the device computes nothing
    return {"text": value}
