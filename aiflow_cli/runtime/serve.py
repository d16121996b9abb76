"""A server tier (`aiflow serve --role edge|cloud`): a :class:`TierNode` behind a transport server.

The process loads only its own stages, listens, prints one ``ready`` line (JSON with ``--json``: that is how
:mod:`aiflow_cli.runtime.cluster` learns the bound address), and serves until SIGTERM/SIGINT or ``duration_s``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from aiflow_cli.errors import InputError
from aiflow_cli.plan.schema import load_plan
from aiflow_cli.runtime.node import TierNode
from aiflow_cli.transport import Client, Identity, Limits, Server, as_identity

ROLES = ("edge", "cloud")


class TierServer:
    """Tier ``role`` of the plan at ``plan_path``, listening on ``listen``; ``next_addr`` is the next tier."""

    def __init__(self, role: str, plan_path: str | Path, *, listen: str, identity: Identity | str | Path,
                 trust: Sequence[str], next_addr: Optional[str] = None, speed: float = 1.0,
                 cache_limit_bytes: int = 1 << 30, timeout_s: float = 120.0, insecure_dev: bool = False,
                 limits: Optional[Limits] = None):
        if role not in ROLES:
            raise InputError(f"role={role!r}: choose edge or cloud (the device side is `aiflow run`)", param="role")
        if not trust and not insecure_dev:
            raise InputError("give `trust` FINGERPRINT for every peer (devices and the next tier); there is no "
                             "default trust (`insecure_dev` exists for local experiments only)", param="trust,insecure_dev")
        plan = load_plan(plan_path)
        ident = as_identity(identity)
        nxt = None
        if next_addr:
            nxt = Client(next_addr, identity=ident, trust=list(trust), limits=limits, timeout_s=timeout_s,
                         insecure_dev=insecure_dev)
        self.node = TierNode(plan, role, next_client=nxt, speed=speed, cache_limit_bytes=cache_limit_bytes)
        self.server = Server(listen, identity=ident, trust=list(trust), handler=self.node.handle, limits=limits,
                             insecure_dev=insecure_dev)
        self.identity = ident

    @property
    def address(self) -> str:
        return self.server.address

    def ready_info(self) -> dict[str, Any]:
        return {"event": "ready", "role": self.node.tier, "address": self.address,
                "fingerprint": self.identity.fingerprint, **self.node.describe()}

    def serve_forever(self, duration_s: Optional[float] = None, on_ready: Callable[[dict], None] | None = None) -> dict:
        """Blocks until SIGTERM/SIGINT (or ``duration_s``), then closes and returns the transport's counters."""
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if on_ready:
                on_ready(self.ready_info())
            stop.wait(duration_s)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            stats = self.server.stats()
            self.close()
        return stats

    def close(self) -> None:
        self.server.close()
        if self.node.next is not None:
            self.node.next.close()
