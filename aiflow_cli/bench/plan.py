"""`aiflow bench plan`: solve time of the DP on a large synthetic instance, and DP vs brute force on a small one
(the baseline ratio, measured in the same run). Timings are wall-clock medians; machines are noisy."""

from __future__ import annotations

from dataclasses import dataclass

from aiflow_cli.bench.common import JsonResult
from aiflow_cli.links import load_link
from aiflow_cli.plan.brute import brute_force
from aiflow_cli.plan.problem import Limits, build_problem
from aiflow_cli.plan.solver import solve_problem
from aiflow_cli.plan.synthetic import synthetic_profile
from aiflow_cli.timing import median_ms

TIER_SPEEDS = (("device", 0.3), ("edge", 1.0), ("cloud", 10.0))


@dataclass
class PlanBench(JsonResult):
    large_stages: int
    large_tiers: int
    large_codecs: int
    build_problem_ms: float  # profiles -> arrays (once per plan)
    solve_latency_ms: float  # median DP time, objective latency
    solve_latency_memory_ms: float  # the same with a memory limit on device and edge (windowed DP)
    solve_generate_ms: float
    solve_throughput_ms: float  # binary search over bottleneck candidates, each a DP
    small_stages: int
    small_codecs: int
    small_placements: int
    small_dp_ms: float
    small_brute_ms: float
    brute_over_dp: float
    small_agree: bool


def _problem(n_stages: int, n_codecs: int, **kw):
    profiles = {t: synthetic_profile(n_stages, n_codecs=n_codecs, seed=7, speed=s) for t, s in TIER_SPEEDS}
    links = {"device-edge": load_link("lte"), "edge-cloud": load_link("wan")}
    return build_problem(profiles, links, **kw), profiles, links


def run(*, stages: int = 1000, codecs: int = 8, repeats: int = 7, small_stages: int = 8) -> PlanBench:
    problem, profiles, links = _problem(stages, codecs)
    build_ms = median_ms(lambda: build_problem(profiles, links), 3)
    lat = median_ms(lambda: solve_problem(problem), repeats)
    mem = build_problem(profiles, links, limits=Limits(memory_bytes={"device": 2 * 2**30, "edge": 16 * 2**30}))
    lat_mem = median_ms(lambda: solve_problem(mem), repeats)
    gen = build_problem(profiles, links, objective="generate", tokens=64)
    gen_ms = median_ms(lambda: solve_problem(gen), repeats)
    thr = build_problem(profiles, links, objective="throughput")
    thr_ms = median_ms(lambda: solve_problem(thr), max(1, repeats // 2))

    small, _, _ = _problem(small_stages, 4)
    from aiflow_cli.plan.brute import all_placements

    n_placements = sum(1 for _ in all_placements(small))
    small_dp = median_ms(lambda: solve_problem(small), repeats)
    small_brute = median_ms(lambda: brute_force(small), 3)
    ref = brute_force(small)
    assert ref is not None, "the small problem has no limits: some placement is feasible"
    dp_ev, ref_ev = solve_problem(small)[1], ref[1]
    agree = abs(dp_ev.total_ms - ref_ev.total_ms) <= 1e-9 * max(1.0, ref_ev.total_ms)
    return PlanBench(
        large_stages=stages,
        large_tiers=len(TIER_SPEEDS),
        large_codecs=codecs,
        build_problem_ms=build_ms,
        solve_latency_ms=lat,
        solve_latency_memory_ms=lat_mem,
        solve_generate_ms=gen_ms,
        solve_throughput_ms=thr_ms,
        small_stages=small_stages,
        small_codecs=4,
        small_placements=n_placements,
        small_dp_ms=small_dp,
        small_brute_ms=small_brute,
        brute_over_dp=small_brute / small_dp,
        small_agree=agree,
    )
