"""The brute-force reference: every placement and every codec per used cut, priced by :func:`cost.evaluate`.

Exponential (C(S+T-1, T-1) placements times C^(used cuts) codec choices); for tests and as the benchmark's
baseline on small instances only. It shares no code with the DP beyond the problem and the reference evaluator.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Optional

from aiflow_cli.plan.cost import Evaluation, Placement, evaluate
from aiflow_cli.plan.problem import Problem

#: Two objective values closer than this (relative) are a tie: DP and reference sum in different orders.
REL_TOL = 1e-9


def all_placements(problem: Problem) -> Iterator[Placement]:
    """Every stage partition (tiers in flow order, empty ranges allowed) with every codec on each used cut."""
    T, S = problem.n_tiers, problem.n_stages
    for inner in itertools.combinations_with_replacement(range(S + 1), T - 1):
        bounds = (0, *inner, S)
        used = Placement(bounds, {}).used_cuts()
        for combo in itertools.product(range(problem.n_codecs), repeat=len(used)):
            yield Placement(bounds, {k: c for (k, _, _), c in zip(used, combo)})


def brute_force(problem: Problem) -> Optional[tuple[Placement, Evaluation]]:
    """The optimal feasible placement; for throughput, the lowest latency among the minimal bottlenecks."""
    best: Optional[tuple[tuple[float, float], Placement, Evaluation]] = None
    for pl in all_placements(problem):
        if any(not problem.available[k, c] for k, c in pl.codecs.items()):
            continue
        ev = evaluate(problem, pl)
        if not ev.feasible:
            continue
        key = (ev.objective_value(problem.objective), ev.total_ms)
        if best is None or _better(key, best[0]):
            best = (key, pl, ev)
    return None if best is None else (best[1], best[2])


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    tol = REL_TOL * max(1.0, abs(b[0]))
    if a[0] < b[0] - tol:
        return True
    return abs(a[0] - b[0]) <= tol and a[1] < b[1] - REL_TOL * max(1.0, abs(b[1]))
