"""Why this plan: the optimum side by side with the plans people would try first.

The strategies and their names are those of :mod:`aiflow_cli.plan.strategies` (device-only, edge-only,
cloud-only, raw-split, aiflow). Each is priced by the same reference evaluator, so the columns are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from aiflow_cli.errors import PlanError
from aiflow_cli.plan.cost import Evaluation, Placement, evaluate
from aiflow_cli.plan.problem import Problem
from aiflow_cli.plan.solver import solve_problem
from aiflow_cli.plan.strategies import OPTIMAL, RAW_SPLIT, only


@dataclass
class Strategy:
    """One strategy's placement and predicted cost; ``reason`` says why it is infeasible (then no evaluation)."""

    name: str
    placement: Optional[Placement]
    evaluation: Optional[Evaluation]
    reason: str = ""

    def summary(self, problem: Problem) -> str:
        if self.placement is None:
            return "-"
        return placement_summary(problem, self.placement)

    def to_dict(self, problem: Problem) -> dict:
        ev = self.evaluation
        d = {
            "name": self.name,
            "feasible": ev is not None and ev.feasible,
            "reason": self.reason,
            "placement": self.summary(problem),
        }
        if ev is not None:
            d.update(
                objective_value=ev.objective_value(problem.objective),
                total_ms=ev.total_ms,
                compute_ms=sum(ev.compute_ms.values()),
                codec_ms=sum(ev.codec_ms.values()),
                transfer_ms=sum(ev.transfer_ms.values()),
                rtt_ms=sum(ev.propagation_ms.values()),
                bottleneck_ms=ev.bottleneck_ms,
                bottleneck=ev.bottleneck,
                speculation=ev.speculation,
            )
        return d


def placement_summary(problem: Problem, pl: Placement) -> str:
    """e.g. ``device[0:4] -int8-> cloud[4:14]``."""
    parts = []
    cuts = {a: problem.codecs[pl.codecs[k]] for k, a, _ in pl.used_cuts()}
    for t in pl.computing():
        parts.append(f"{problem.tiers[t]}[{pl.bounds[t]}:{pl.bounds[t + 1]}]")
        if t in cuts:
            parts.append(f"-{cuts[t]}->")
    return " ".join(parts)


def single_tier(problem: Problem, tier: int) -> Placement:
    S = problem.n_stages
    raw_input = {0: problem.codecs.index("raw")} if tier else {}  # a device that computes nothing sends it raw
    return Placement(tuple(0 if i <= tier else S for i in range(problem.n_tiers + 1)), raw_input)


def strategies(problem: Problem) -> list[Strategy]:
    """Every tier alone, the best raw-codec placement and the optimum, in that order."""
    out = []
    for t, name in enumerate(problem.tiers):
        pl = single_tier(problem, t)
        ev = evaluate(problem, pl)
        out.append(Strategy(only(name), pl, ev, "; ".join(ev.violations)))
    for name, prob in ((RAW_SPLIT, problem.with_codecs(["raw"])), (OPTIMAL, problem)):
        try:
            pl, ev = solve_problem(prob)
            out.append(Strategy(name, pl, ev))
        except PlanError as e:
            out.append(Strategy(name, None, None, str(e)))
    return out


def ships_input(strategy: Strategy) -> bool:
    """Whether the device computes nothing in this (feasible) strategy, so the raw input (boundary 0) crosses the
    first link as profiled, ``raw`` (``Problem.input_bytes``)."""
    pl, ev = strategy.placement, strategy.evaluation
    return pl is not None and ev is not None and ev.feasible and pl.bounds[1] == 0
