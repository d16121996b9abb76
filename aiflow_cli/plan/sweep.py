"""Bandwidth sweeps: how the optimal plan and each strategy's cost move as one link gets faster.

The swept link's uplink takes each value on a log grid; its downlink keeps the profile's down/up ratio. Where
two neighbouring grid points have different optimal plans, a bisection (in log bandwidth) finds the switch
point to within ``rel_tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from aiflow_cli.errors import InputError, PlanError
from aiflow_cli.plan.explain import OPTIMAL, Strategy, placement_summary, strategies
from aiflow_cli.plan.problem import Problem
from aiflow_cli.plan.solver import solve_problem


@dataclass
class SweepPoint:
    uplink_mbps: float
    strategies: list[Strategy]

    @property
    def optimal(self) -> Strategy:
        return next(s for s in self.strategies if s.name == OPTIMAL)


@dataclass
class Change:
    """The optimal plan switches from ``before`` to ``after`` when the uplink passes ``at_mbps``."""

    at_mbps: float
    before: str
    after: str


@dataclass
class Sweep:
    link: str
    points: list[SweepPoint]
    changes: list[Change] = field(default_factory=list)

    def to_dict(self, problem: Problem) -> dict:
        return {
            "link": self.link,
            "points": [
                {"uplink_mbps": p.uplink_mbps, "strategies": [s.to_dict(problem) for s in p.strategies]}
                for p in self.points
            ],
            "changes": [c.__dict__ for c in self.changes],
        }


def parse_range(spec: str) -> tuple[str, float, float]:
    """``device-edge=1:1000`` -> (link, low Mbit/s, high Mbit/s)."""
    try:
        link, rng = spec.split("=", 1)
        lo, hi = (float(x) for x in rng.split(":"))
    except ValueError:
        raise InputError(
            f"sweep={spec!r}: expected LINK=LOW:HIGH in Mbit/s, e.g. device-edge=1:1000", param="sweep"
        ) from None
    if not (0 < lo < hi):
        raise InputError(f"sweep={spec!r}: need 0 < LOW < HIGH", param="sweep")
    return link.strip(), lo, hi


def _at(problem: Problem, index: int, mbps: float) -> Problem:
    link = problem.links[index]
    ratio = link.downlink_mbps / link.uplink_mbps
    return problem.with_link(index, link.scaled(uplink_mbps=mbps, downlink_mbps=mbps * ratio))


def _signature(problem: Problem) -> str:
    try:
        pl, _ = solve_problem(problem)
    except PlanError:
        return "infeasible"
    return placement_summary(problem, pl)


def sweep(
    problem: Problem, link: str, low_mbps: float, high_mbps: float, *, points: int = 25, rel_tol: float = 1e-3
) -> Sweep:
    """Solves every strategy at ``points`` log-spaced uplink rates and locates each change of the optimum."""
    if link not in problem.link_names:
        raise InputError(
            f"link={link!r} is not a link of this problem; its links are {', '.join(problem.link_names)}", param="link"
        )
    index = problem.link_names.index(link)
    grid = np.geomspace(low_mbps, high_mbps, max(2, points))
    pts = [SweepPoint(float(x), strategies(_at(problem, index, float(x)))) for x in grid]
    out = Sweep(link, pts)
    for a, b in zip(pts, pts[1:]):
        sa, sb = a.optimal.summary(problem), b.optimal.summary(problem)
        if sa == sb:
            continue
        lo, hi = math.log(a.uplink_mbps), math.log(b.uplink_mbps)
        while hi - lo > math.log1p(rel_tol):
            mid = (lo + hi) / 2
            if _signature(_at(problem, index, math.exp(mid))) == sa:
                lo = mid
            else:
                hi = mid
        out.changes.append(Change(at_mbps=math.exp(hi), before=sa, after=_signature(_at(problem, index, math.exp(hi)))))
    return out
