"""The exact solver: dynamic programming over (stage boundary, tier, codec) with tiers in flow order.

State ``f[t, e]``: the cheapest way to run stages ``[0, e)`` with tier ``t`` the last tier that holds the state so
far (its range ends at ``e``). The device holds the raw input before any stage runs: ``f[device, 0] = 0``. Tier
``t'`` taking stages ``[b, e)`` after tier ``t`` pays ``f[t, b] + cut_ms[t, t', b, c] + P[t', e] - P[t', b]``
where ``cut_ms[.., b, ..]`` prices sending boundary ``b`` (``b = 0``: the raw input, from a device that computes
nothing; no special case) and ``P`` is the prefix sum of stage costs, so
``f[t', e] = P[t', e] + min_{b in window(e)} g[t', b]`` with ``g[t', b] = min_{t, c} f[t, b] + cut_ms - P[t', b]``.
``window(e)`` is the set of starts whose segment fits the tier's memory (and, for throughput, its time bound);
it is an interval ``[lo(e), e-1]`` with ``lo`` monotone, answered by a sparse table. Work:
O(T^2 * S * C + T * S log S), vectorised over stages.

Fidelity: a codec whose own cut breaks the floor is masked out. The end-to-end bound (the used cuts' losses
``1 - fidelity`` must sum to at most ``1 - min_fidelity``) couples cuts; when the plan above breaks it, an exact
Pareto DP over (cost, loss) takes over (slower: O(T^2 * S^2 * C * front)), so the answer stays optimal.

Throughput: minimise the busiest pipeline resource. Feasibility at a bound B is monotone in B and is the same DP
with every resource above B masked out, so a binary search over the candidate resource values finds the optimal
bottleneck B*; the plan returned is the lowest-latency plan among those with bottleneck B*.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from aiflow_cli import task
from aiflow_cli.errors import PlanError
from aiflow_cli.links import LinkProfile
from aiflow_cli.plan.cost import FIDELITY_EPS, Evaluation, Placement, Tables, dp_tables, evaluate
from aiflow_cli.plan.problem import Limits, Overheads, Problem, build_problem
from aiflow_cli.plan.speculation import draft_lengths, spec_for
from aiflow_cli.profile.schema import ModelProfile


def _windows(problem: Problem, tables: Tables, tier: int, bound_ms: Optional[float]) -> np.ndarray:
    """``lo[e]``: the smallest start b such that stages [b, e) fit the tier (memory, and the throughput bound on
    the tier's busy time). ``lo[e] == e`` means not even stage e-1 alone fits. Two pointers, O(S)."""
    S = problem.n_stages
    limit = problem.memory_bytes[tier]
    params, peak = problem.param_bytes, problem.peak_bytes[tier]
    pp = tables.prefill_prefix_ms[tier]
    lo = np.zeros(S + 1, dtype=np.int64)
    if limit is None and bound_ms is None:
        return lo
    b, psum = 0, 0
    maxq: list[int] = []  # stage indices in [b, e) with decreasing peak: the window's max is maxq[0]
    for e in range(1, S + 1):
        s = e - 1
        psum += int(params[s])
        while maxq and peak[maxq[-1]] <= peak[s]:
            maxq.pop()
        maxq.append(s)
        while b < e:
            fits = limit is None or psum + int(peak[maxq[0]]) <= limit
            fits = fits and (bound_ms is None or pp[e] - pp[b] <= bound_ms)
            if fits:
                break
            psum -= int(params[b])
            if maxq[0] == b:
                maxq.pop(0)
            b += 1
        lo[e] = b
    return lo


def _window_argmin(h: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query i: min and argmin of ``h[lo[i] .. hi[i]]`` (inclusive); empty windows give inf, -1.
    Sparse table: O(n log n) to build, O(1) per query, all vectorised."""
    n = len(h)
    table = [np.arange(n)]
    j = 1
    while (1 << j) <= n:
        prev, half, width = table[-1], 1 << (j - 1), n - (1 << j) + 1
        a, b = prev[:width], prev[half : half + width]
        table.append(np.where(h[b] < h[a], b, a))
        j += 1
    length = hi - lo + 1
    valid = length >= 1
    vals = np.full(len(lo), np.inf)
    idx = np.full(len(lo), -1, dtype=np.int64)
    if valid.any():
        L, H, n_ = lo[valid], hi[valid], length[valid]
        k = np.floor(np.log2(n_)).astype(np.int64)
        i1 = np.empty(len(L), dtype=np.int64)
        i2 = np.empty(len(L), dtype=np.int64)
        for kk in np.unique(k):  # at most log2(n) groups
            m = k == kk
            i1[m] = table[kk][L[m]]
            i2[m] = table[kk][H[m] - (1 << kk) + 1]
        best = np.where(h[i2] < h[i1], i2, i1)
        vals[valid] = h[best]
        idx[valid] = best
    return vals, idx


def _placement(problem: Problem, segments: dict[int, tuple[int, int]], codecs: dict[int, int]) -> Placement:
    bounds, cur = [], 0
    for t in range(problem.n_tiers):
        if t in segments:
            bounds.append(segments[t][0])
            cur = segments[t][1]
        else:
            bounds.append(cur)
    bounds.append(problem.n_stages)
    return Placement(tuple(bounds), codecs)


def _source(problem: Problem) -> np.ndarray:
    """``f[:, 0]``: the device holds the raw input (boundary 0) at no cost, and may send it on without computing
    unless it is required to compute."""
    f0 = np.full(problem.n_tiers, np.inf)
    if not problem.require[0]:
        f0[0] = 0.0
    return f0


def _chain_dp(
    problem: Problem, tab: Tables, cut_ms: np.ndarray, out: np.ndarray, lo: list[np.ndarray]
) -> Optional[tuple[float, Placement]]:
    """The O(T^2 S C) DP (see the module docstring); None when nothing is feasible."""
    T, S = problem.n_tiers, problem.n_stages
    P = tab.prefix_ms
    f = np.full((T, S + 1), np.inf)
    f[:, 0] = _source(problem)
    seg_start = np.zeros((T, S + 1), dtype=np.int64)
    par_t = np.full((T, S), -1, dtype=np.int64)
    par_c = np.full((T, S), -1, dtype=np.int64)
    e_idx = np.arange(1, S + 1)
    for tp in range(T):
        if problem.skip[tp]:
            continue
        g = np.full(S, np.inf)
        if tp == 0:
            g[0] = 0.0  # the device runs from stage 0 on the input it holds
        for t in range(tp):
            cc = cut_ms[t, tp]  # (S, C): boundary b for starts b = 0 .. S-1
            cbest = cc.argmin(axis=1)
            cand = f[t, :S] + cc[np.arange(S), cbest]
            better = cand < g
            g[better] = cand[better]
            par_t[tp][better] = t
            par_c[tp][better] = cbest[better]
        vals, idx = _window_argmin(g - P[tp, :S], lo[tp][1:], e_idx - 1)
        f[tp, 1:] = vals + P[tp, 1:]
        seg_start[tp, 1:] = idx
        if problem.require[tp] and problem.input_stage:
            f[tp, 1] = np.inf  # input.prepare alone is not a stage of the model
    total = f[:, S] + out
    t = int(np.argmin(total))
    if not np.isfinite(total[t]):
        return None
    segments, codecs, e = {}, {}, S
    while True:
        b = int(seg_start[t, e])
        segments[t] = (b, e)
        if par_t[t, b] < 0:  # the device, from its own input
            break
        codecs[b] = int(par_c[t, b])
        if b == 0:  # the raw input came from the device, which computes nothing
            break
        t, e = int(par_t[t, b]), b
    return float(total.min()), _placement(problem, segments, codecs)


def _prune(front: list[tuple]) -> list[tuple]:
    """Keeps the (cost, loss, ...) entries no other entry beats on both cost and loss."""
    front.sort(key=lambda x: (x[1], x[0]))
    kept, best = [], np.inf
    for x in front:
        if x[0] < best:
            kept.append(x)
            best = x[0]
    return kept


def _pareto_dp(
    problem: Problem, tab: Tables, cut_ms: np.ndarray, out: np.ndarray, lo: list[np.ndarray]
) -> Optional[tuple[float, Placement]]:
    """Exact under the end-to-end fidelity budget: each state keeps its Pareto front of (cost, loss)."""
    T, S, C = problem.n_tiers, problem.n_stages, problem.n_codecs
    P, loss, budget = tab.prefix_ms, problem.cut_loss, problem.fidelity_budget + FIDELITY_EPS
    # fronts[t][e]: entries (cost, loss, b, g_index); G[t][b]: entries (cost - P[t, b], loss, prev_t, prev_i, c)
    fronts: list[list[list[tuple]]] = [[[] for _ in range(S + 1)] for _ in range(T)]
    G: list[list[list[tuple]]] = [[[] for _ in range(S)] for _ in range(T)]
    for t, f0 in enumerate(_source(problem)):
        if np.isfinite(f0):
            fronts[t][0] = [(float(f0), 0.0, 0, -1)]
    for tp in range(T):
        if problem.skip[tp]:
            continue
        for b in range(S):
            cands = [(-P[tp, 0], 0.0, -1, -1, -1)] if b == 0 and tp == 0 else []
            for t in range(tp):
                for i, (cost, l0, _, _) in enumerate(fronts[t][b]):
                    for c in range(C):
                        cc = cut_ms[t, tp, b, c]
                        lc = l0 + loss[b, c]
                        if np.isfinite(cc) and lc <= budget:
                            cands.append((cost + cc - P[tp, b], lc, t, i, c))
            G[tp][b] = _prune(cands)
        for e in range(1, S + 1):
            if e == 1 and problem.require[tp] and problem.input_stage:
                continue  # input.prepare alone is not a stage of the model
            merged = [(x[0], x[1], b, j) for b in range(int(lo[tp][e]), e) for j, x in enumerate(G[tp][b])]
            fronts[tp][e] = [(c + P[tp, e], l, b, j) for c, l, b, j in _prune(merged)]
    best, arg = np.inf, None
    for t in range(T):
        for i, x in enumerate(fronts[t][S]):
            if x[0] + out[t] < best:
                best, arg = x[0] + out[t], (t, i)
    if arg is None:
        return None
    (t, i), e = arg, S
    segments, codecs = {}, {}
    while True:
        _, _, b, j = fronts[t][e][i]
        segments[t] = (b, e)
        _, _, pt, pi, c = G[t][b][j]
        if pt < 0:  # the device, from its own input
            break
        codecs[b] = c
        if b == 0:  # the raw input came from the device, which computes nothing
            break
        t, i, e = pt, pi, b
    return float(best), _placement(problem, segments, codecs)


def _loss(problem: Problem, pl: Placement) -> float:
    total = 0.0
    for k, _, _ in pl.used_cuts():
        total += float(problem.cut_loss[k, pl.codecs[k]])
    return total


def _min_latency(problem: Problem, tab: Tables, bound_ms: Optional[float] = None) -> Optional[tuple[float, Placement]]:
    """The lowest-cost placement (ms per request) whose every pipeline resource is at most ``bound_ms``."""
    cut_ms, out = tab.cut_ms, tab.output_ms
    if bound_ms is not None:
        cut_ms = np.where(tab.cut_busy_ms <= bound_ms, cut_ms, np.inf)
        out = np.where(tab.output_busy_ms <= bound_ms, out, np.inf)
    lo = [_windows(problem, tab, t, bound_ms) for t in range(problem.n_tiers)]
    found = _chain_dp(problem, tab, cut_ms, out, lo)
    if found is not None and _loss(problem, found[1]) > problem.fidelity_budget + FIDELITY_EPS:
        found = _pareto_dp(problem, tab, cut_ms, out, lo)
    return found


def _throughput_candidates(problem: Problem, tab: Tables) -> np.ndarray:
    """Every value a pipeline resource can take: the optimal bottleneck is one of them."""
    parts = [tab.cut_busy_ms[np.isfinite(tab.cut_busy_ms)], tab.output_busy_ms]
    for t in range(problem.n_tiers):
        if problem.skip[t]:
            continue
        pp = tab.prefill_prefix_ms[t]
        parts.append((pp[:, None] - pp[None, :])[np.triu_indices(len(pp), 1)[::-1]])  # pp[e] - pp[b], b < e
    return np.unique(np.concatenate([np.ravel(x) for x in parts]))


def _min_bottleneck(problem: Problem, tab: Tables) -> Optional[tuple[float, Placement]]:
    cands = _throughput_candidates(problem, tab)
    if _min_latency(problem, tab, float(cands[-1])) is None:
        return None
    lo_i, hi_i = 0, len(cands) - 1  # invariant: cands[hi_i] is feasible
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if _min_latency(problem, tab, float(cands[mid])) is not None:
            hi_i = mid
        else:
            lo_i = mid + 1
    return _min_latency(problem, tab, float(cands[hi_i]))


def solve_problem(problem: Problem) -> tuple[Placement, Evaluation]:
    """The optimal placement of ``problem`` and its evaluation; :class:`PlanError` naming the limit if none."""
    found = _solve_raw(problem)
    if found is None:
        raise PlanError(diagnose_infeasible(problem), param="memory_bytes,min_fidelity,codecs,skip,require")
    ev = evaluate(problem, found[1])
    return found[1], ev


def _solve_raw(problem: Problem) -> Optional[tuple[float, Placement]]:
    tab = dp_tables(problem)
    if problem.objective == "throughput":
        return _min_bottleneck(problem, tab)
    found = _min_latency(problem, tab)
    if problem.speculate:  # each (device range, draft length) that speculates: its own tables (plan/speculation.py)
        import dataclasses

        for g in draft_lengths(problem):
            fixed = dataclasses.replace(problem, speculate=g)
            for k in range(1, problem.n_stages):
                spec = spec_for(fixed, k)
                if spec is None:
                    continue
                cand = _min_latency(fixed, dp_tables(fixed, spec=spec))
                if cand is not None and (found is None or cand[0] < found[0]):
                    found = cand
    return found


def diagnose_infeasible(problem: Problem) -> str:
    """Names the limit that makes ``problem`` infeasible, by lifting the limits one at a time."""
    import dataclasses

    p = problem
    if any(m is not None for m in p.memory_bytes):
        free = dataclasses.replace(p, memory_bytes=[None] * p.n_tiers)
        if _solve_raw(free) is not None:
            need = {
                t: int(max(p.param_bytes[s] + p.peak_bytes[i, s] for s in range(p.n_stages)))
                for i, t in enumerate(p.tiers)
                if p.memory_bytes[i] is not None
            }
            limits = ", ".join(f"{t}={_gib(p.memory_bytes[p.tiers.index(t)])}" for t in need)
            whole = int(p.param_bytes.sum() + p.peak_bytes.max())
            return (
                f"no placement fits the memory limits ({limits}); the largest stage needs "
                + ", ".join(f"{_gib(v)} on {t}" for t, v in need.items())
                + f", the whole model {_gib(whole)}: raise `memory_bytes` or let more tiers run stages"
            )
    if p.limits.min_fidelity is not None:
        loose = dataclasses.replace(p, limits=dataclasses.replace(p.limits, min_fidelity=None))
        if _solve_raw(loose) is not None:
            return (
                f"no codec choice meets min_fidelity={p.limits.min_fidelity} per cut and end to end "
                f"(with the tiers that must run stages); lower `min_fidelity` or allow codec 'raw' (`codecs`)"
            )
    if p.skip.any() or p.require.any():
        return "the `skip`/`require` choices leave no placement: drop one of them"
    return "no feasible placement: every tier is skipped or no codec is available at the needed cuts"


def _gib(n: Optional[int]) -> str:
    return "none" if n is None else f"{n / 2**30:.3g}GiB"


def solve(
    profiles: dict[str, ModelProfile],
    links: dict[str, LinkProfile],
    *,
    objective: str = "latency",
    tokens: int = 0,
    limits: Optional[Limits] = None,
    speeds: Optional[dict[str, float]] = None,
    sources: Optional[dict[str, str]] = None,
    input_bytes: Optional[int] = None,
    overheads: Optional[Overheads] = None,
    model=None,
    verify: Optional[bool] = None,
):
    """Solves for the optimal plan. ``profiles``: tier -> profile (or ``{"*": profile}`` with ``speeds``);
    ``links``: ``"device-edge"`` -> link; ``sources``: optional tier -> file path, recorded in the plan;
    ``input_bytes``: upload size of the request input when known (see :func:`build_problem`); ``overheads``:
    measured fixed costs per message and connection (:class:`Overheads`; default none).
    With a fidelity floor the chosen codecs are measured end to end before the plan is accepted
    (:func:`aiflow_cli.plan.verify.solve_verified`; ``model``: the loaded model, default loaded by name;
    ``verify``: force or skip the measurement).
    Returns a :class:`aiflow_cli.plan.schema.Plan`; raises PlanError / InputError on bad or infeasible input."""
    problem = build_problem(
        profiles,
        links,
        objective=objective,
        tokens=tokens,
        limits=limits,
        speeds=speeds,
        input_bytes=input_bytes,
        overheads=overheads,
    )
    return solve_plan(problem, sources=sources, model=model, verify=verify)[0]


def solve_plan(
    problem: Problem, *, sources: Optional[dict[str, str]] = None, model=None, verify: Optional[bool] = None, log=None
):
    """The plan for a built ``problem`` (see :func:`solve`), and the problem as finally solved: with the
    (cut, codec) pairs that measured below the fidelity floor excluded, which is what reports on the plan
    (explain, sweep) must compare against. ``log``: called with progress lines of the verification."""
    from aiflow_cli.plan.schema import plan_from_solution
    from aiflow_cli.plan.verify import solve_verified

    t0 = time.perf_counter()
    v = solve_verified(problem, model=model, verify=verify, log=log)
    solve_ms = (time.perf_counter() - t0) * 1e3 - v.fidelity.measure_s * 1e3
    plan = plan_from_solution(
        v.problem, v.placement, v.evaluation, solve_ms=solve_ms, sources=sources or {}, fidelity=v.fidelity
    )
    return plan, v.problem


def solve_variants(
    profile: ModelProfile,
    links: dict[str, LinkProfile],
    speeds: dict[str, float],
    variants: dict[str, Limits],
    *,
    tokens: int = 16,
    input_bytes: Optional[int] = None,
    overheads: Optional[Overheads] = None,
    model=None,
) -> dict:
    """One plan per named set of limits (``{"device-only": Limits(skip=...), ...}``), all on the same profile,
    links, speeds and overheads; generating models are planned for ``tokens`` generated tokens, the others for
    one request. Variants with a fidelity floor are verified end to end (``model``: the loaded model, default
    loaded by name)."""
    generates = task.generates(profile.task)
    return {
        name: solve(
            {"*": profile},
            links,
            objective="generate" if generates else "latency",
            tokens=tokens if generates else 0,
            limits=lim,
            speeds=speeds,
            input_bytes=input_bytes,
            overheads=overheads,
            model=model,
        )
        for name, lim in variants.items()
    }
