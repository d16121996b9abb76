"""When a tier pool grows or shrinks: on the tier's own load signal, its active sessions per replica (each holds a
KV cache and a share of every decode batch), not on HTTP request counts (docs/scale.md). No I/O: the pool
(aiflow_cli/runtime/ray_pool.py) polls each replica's ``load()`` and applies :meth:`Autoscaler.decide`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiflow_cli.errors import InputError


@dataclass(frozen=True)
class ScalePolicy:
    """``min_replicas`` <= replicas <= ``max_replicas``, aiming at ``target_sessions`` active sessions per
    replica. Scale up at once (a waiting device notices); scale down only after ``down_after`` consecutive polls
    agree (sessions come and go between steps), and only replicas that hold no session (their caches would be
    lost, and rebuilt elsewhere at a cost)."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_sessions: int = 8
    down_after: int = 3

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise InputError(f"min_replicas={self.min_replicas}: must be >= 1", param="min_replicas")
        if self.max_replicas < self.min_replicas:
            raise InputError(
                f"max_replicas={self.max_replicas}: must be >= min_replicas ({self.min_replicas})",
                param="max_replicas",
            )
        if self.target_sessions < 1:
            raise InputError(f"target_sessions={self.target_sessions}: must be >= 1", param="target_sessions")
        if self.down_after < 1:
            raise InputError(f"down_after={self.down_after}: must be >= 1", param="down_after")


@dataclass(frozen=True)
class Decision:
    """What to do now: ``target`` replicas; ``remove`` names idle replicas to stop (scale down); ``reason``."""

    target: int
    remove: tuple[str, ...] = ()
    reason: str = ""


class Autoscaler:
    """:meth:`decide` from the live replicas' active sessions; keeps the scale-down streak between polls."""

    def __init__(self, policy: ScalePolicy):
        self.policy = policy
        self._low_polls = 0

    def want(self, total_sessions: int) -> int:
        """Replicas that carry ``total_sessions`` at the target, within [min, max]."""
        p = self.policy
        return max(p.min_replicas, min(p.max_replicas, math.ceil(total_sessions / p.target_sessions)))

    def decide(self, sessions: dict[str, int]) -> Decision:
        """``sessions``: active sessions of each live replica (name -> count)."""
        alive, total = len(sessions), sum(sessions.values())
        want = self.want(total)
        if want > alive:
            self._low_polls = 0
            return Decision(want, reason=f"{total} sessions on {alive} replicas > {self.policy.target_sessions} each")
        if want == alive:
            self._low_polls = 0
            return Decision(alive, reason="at target")
        self._low_polls += 1
        if self._low_polls < self.policy.down_after:
            return Decision(alive, reason=f"low for {self._low_polls}/{self.policy.down_after} polls")
        idle = sorted((name for name, n in sessions.items() if n == 0), reverse=True)[: alive - want]
        if not idle:
            return Decision(alive, reason="low, but every replica holds sessions")
        self._low_polls = 0
        return Decision(alive - len(idle), tuple(idle), f"{total} sessions need {want} replicas")
