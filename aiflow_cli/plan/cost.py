"""The cost model: what one placement costs, written twice on purpose.

:func:`evaluate` prices one fully specified placement term by term with plain loops; it is the reference (the
brute force and every report use it). :func:`dp_tables` precomputes the same terms as arrays for the DP. The
property tests check that the two agree on every plan the DP returns. docs/planner.md states the formulas.

Assumptions (all documented in docs/planner.md): connections are kept open (steady state; the handshake is
priced apart, per link, and never enters the objective); a one-way crossing of a link costs ``rtt_ms / 2`` plus
serialisation ``bytes * 8 / goodput``, and every message round trip over a link pays a fixed
``Overheads.message_ms`` (framing, Python hand-offs, the emulator's timer: measured on the machine by
:mod:`aiflow_cli.runtime.calibrate`); loss only lowers goodput, ``rate * (1 - loss_pct / 100)``; a tier that
runs nothing but sits between two that do forwards frames store-and-forward without re-coding; the output returns
uncoded. The raw input is boundary 0 (see :mod:`aiflow_cli.plan.problem`): when the device computes nothing it
sends it to the first tier that does, priced as every other boundary (its only codec is ``raw``). Generating N
tokens is one prefill (which yields the first token) and N - 1 decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from aiflow_cli.links import LinkProfile
from aiflow_cli.plan.problem import Overheads, Problem  # noqa: F401  (Overheads: re-exported)

#: Tolerance on the fidelity budget, so that a sum computed in another order is not refused by rounding.
FIDELITY_EPS = 1e-12


def decode_steps(problem: Problem) -> int:
    """Decode steps of one request: the prefill yields the first of ``tokens`` tokens."""
    return max(problem.tokens - 1, 0)


def goodput_mbps(link: LinkProfile, *, up: bool) -> float:
    """Useful rate of a link direction in Mbit/s: the nominal rate less the share lost to packet loss."""
    rate = link.uplink_mbps if up else link.downlink_mbps
    return rate * (1.0 - link.loss_pct / 100.0)


def serialise_ms(link: LinkProfile, n_bytes: float, *, up: bool) -> float:
    """Time to put ``n_bytes`` on the link at its goodput (ms); no propagation delay."""
    return n_bytes * 8e-3 / goodput_mbps(link, up=up)


@dataclass
class Placement:
    """Which tier runs which stages and which codec each used cut takes.

    ``bounds``: T+1 stage indices, tier ``t`` runs ``[bounds[t], bounds[t+1])`` (empty: the tier computes
    nothing). ``codecs``: boundary (the first stage the receiving tier runs; 0: the raw input) -> codec index,
    exactly for the used cuts."""

    bounds: tuple[int, ...]
    codecs: dict[int, int]

    def computing(self) -> list[int]:
        """Tiers that run at least one stage, in flow order."""
        return [t for t in range(len(self.bounds) - 1) if self.bounds[t + 1] > self.bounds[t]]

    def holders(self) -> list[int]:
        """Tiers that hold the request's state in turn: the device (it holds the raw input, computing or not),
        then every other tier that computes."""
        return [0] + [t for t in self.computing() if t > 0]

    def used_cuts(self) -> list[tuple[int, int, int]]:
        """(boundary, from_tier, to_tier) for each crossing between consecutive holders; boundary 0 (the raw
        input) when the device computes nothing."""
        h = self.holders()
        return [(self.bounds[z], a, z) for a, z in zip(h, h[1:])]

    def signature(self) -> tuple:
        return (self.bounds, tuple(sorted(self.codecs.items())))


@dataclass
class Evaluation:
    """The predicted cost of a placement, term by term (ms) and its feasibility."""

    total_ms: float = 0.0  # one warm request, end to end (all decode steps included for 'generate')
    prefill_ms: float = 0.0  # the part before the first decode step (time to the first token when the device
    # drives the generation)
    per_token_ms: float = 0.0  # one decode step ('generate')
    compute_ms: dict[str, float] = field(default_factory=dict)  # tier -> ms
    codec_ms: dict[str, float] = field(default_factory=dict)  # cut label -> encode + decode ms
    transfer_ms: dict[str, float] = field(default_factory=dict)  # link -> serialisation ms, both directions
    propagation_ms: dict[str, float] = field(default_factory=dict)  # link -> rtt/2 per crossing
    message_ms: dict[str, float] = field(default_factory=dict)  # link -> fixed cost per message round trip
    handshake_ms: dict[str, float] = field(default_factory=dict)  # link -> connection set-up (not in total_ms)
    busy_ms: dict[str, float] = field(default_factory=dict)  # pipeline resource -> ms per request
    bottleneck: str = ""
    bottleneck_ms: float = 0.0
    fidelity_loss: float = 0.0  # sum over used cuts of (1 - fidelity), the profile's metric
    violations: list[str] = field(default_factory=list)
    speculation: Optional[dict] = None  # how the decode steps were priced when speculating (Spec.to_json)

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def throughput_rps(self) -> float:
        return 1e3 / self.bottleneck_ms if self.bottleneck_ms > 0 else float("inf")

    def objective_value(self, objective: str) -> float:
        """What the solver minimises: ms per request (latency, generate) or bottleneck ms (throughput)."""
        return self.bottleneck_ms if objective == "throughput" else self.total_ms


def cut_label(problem: Problem, boundary: int, a: int, b: int) -> str:
    """``from->to@after_stage``; ``@input`` for the raw input (boundary 0)."""
    where = boundary - 1 if boundary else "input"
    return f"{problem.tiers[a]}->{problem.tiers[b]}@{where}"


def _add(d: dict[str, float], key: str, ms: float) -> None:
    d[key] = d.get(key, 0.0) + ms


def segment_memory_bytes(problem: Problem, tier: int, start: int, end: int) -> int:
    """Parameters of stages [start, end) plus the largest peak activation among them (stages run in turn)."""
    if end <= start:
        return 0
    return int(problem.param_bytes[start:end].sum() + problem.peak_bytes[tier, start:end].max())


def evaluate(problem: Problem, placement: Placement) -> Evaluation:
    """Prices ``placement`` term by term and lists every limit it breaks (see the module docstring). With
    speculation (``problem.speculate``) the decode steps are priced as speculative rounds when the placement's
    device can draft (:func:`aiflow_cli.plan.speculation.spec_for`); ``auto`` takes the best draft length."""
    from aiflow_cli.plan.speculation import AUTO, draft_lengths

    if problem.speculate == AUTO:
        import dataclasses

        # auto may also not draft (g = 0: plain decoding), as the runtime's auto policy does when drafts do not pay
        evs = [evaluate(dataclasses.replace(problem, speculate=g), placement) for g in [0, *draft_lengths(problem)]]
        return min(evs, key=lambda e: e.total_ms)
    return _evaluate(problem, placement)


def _evaluate(problem: Problem, placement: Placement) -> Evaluation:
    from aiflow_cli.plan.speculation import spec_for

    p, pl, ev = problem, placement, Evaluation()
    T, S, N = p.n_tiers, p.n_stages, decode_steps(p)
    msg, hs = p.overheads.message_ms, p.overheads.handshake_ms
    b = pl.bounds
    assert len(b) == T + 1 and b[0] == 0 and b[-1] == S and all(x <= y for x, y in zip(b, b[1:]))
    comp = pl.computing()
    names, links = p.link_names, p.links
    spec = spec_for(p, b[1]) if N else None
    ev.speculation = spec.to_json() if spec else None
    # per decode step of the plain model: rounds per token, the device's drafts per round, positions per round
    rounds, drafts, width = (spec.rounds_per_token, spec.draft, spec.draft + 1) if spec else (1.0, 1, 1)

    for t in range(T):
        lo, hi = b[t], b[t + 1]
        if hi > lo:
            if p.skip[t]:
                ev.violations.append(f"tier {p.tiers[t]} is skipped but runs stages {lo}..{hi - 1}")
            mem = segment_memory_bytes(p, t, lo, hi)
            limit = p.memory_bytes[t]
            if limit is not None and mem > limit:
                ev.violations.append(
                    f"memory on {p.tiers[t]}: needs {mem / 2**20:,.0f} MiB, limit {limit / 2**20:,.0f} MiB"
                )
        if p.require[t] and not p.runs_model_stage(lo, hi):
            ev.violations.append(f"tier {p.tiers[t]} is required but runs no stage of the model")
        prefill = float(sum(p.prefill_ms[t, s] for s in range(lo, hi)))
        decode = float(sum(p.decode_ms[t, s] for s in range(lo, hi) if p.decode_stage[s]))
        decode *= rounds * (drafts if t == 0 else 1)
        if spec and t == 0:  # each draft also runs the head (the exit) on the device
            decode += rounds * drafts * float(p.decode_ms[0, S - 1])
        ev.compute_ms[p.tiers[t]] = prefill + N * decode
        ev.prefill_ms += prefill
        ev.per_token_ms += decode
        ev.busy_ms[f"compute:{p.tiers[t]}"] = prefill

    last = comp[-1]
    for l in range(last):  # the output returns to the device
        x = serialise_ms(links[l], p.output_bytes, up=False)
        _add(ev.transfer_ms, names[l], x)
        _add(ev.propagation_ms, names[l], links[l].one_way_ms)
        ev.prefill_ms += x + links[l].one_way_ms
        ev.busy_ms[f"down:{names[l]}"] = x

    used = pl.used_cuts()
    if sorted(pl.codecs) != sorted(k for k, _, _ in used):
        raise ValueError(f"placement codecs {sorted(pl.codecs)} do not match the used cuts {[k for k, _, _ in used]}")
    per_step_cut = p.cut_decodes
    lossy = 0
    for k, a, z in used:
        c = pl.codecs[k]
        label = cut_label(p, k, a, z)
        if not p.available[k, c]:
            ev.violations.append(f"codec {p.codecs[c]} is not available at {label}")
            ev.total_ms = ev.bottleneck_ms = float("inf")
            return ev
        loss = float(p.cut_loss[k, c])
        if loss > p.fidelity_budget + FIDELITY_EPS:
            ev.violations.append(
                f"fidelity at {label}: codec {p.codecs[c]} has {p.fidelity_metric} {1 - loss:.6f} < {p.limits.min_fidelity}"
            )
        ev.fidelity_loss += loss
        lossy += loss > 0
        enc, dec = float(p.enc_ms[a, k, c]), float(p.dec_ms[z, k, c])
        _add(ev.codec_ms, label, enc + dec)
        ev.prefill_ms += enc + dec
        ev.busy_ms[f"encode:{label}"] = enc
        ev.busy_ms[f"decode:{label}"] = dec
        per_step = 0.0
        if N and per_step_cut[k]:
            step_codec = rounds * width * float(p.step_fraction[k]) * (enc + dec)
            _add(ev.codec_ms, label, N * step_codec)
            per_step += step_codec
        for l in range(a, z):
            x = serialise_ms(links[l], float(p.cut_bytes[k, c]), up=True)
            _add(ev.transfer_ms, names[l], x)
            _add(ev.propagation_ms, names[l], links[l].one_way_ms)
            _add(ev.message_ms, names[l], msg)
            ev.prefill_ms += x + links[l].one_way_ms + msg
            ev.busy_ms[f"up:{names[l]}"] = x
            if N and per_step_cut[k]:
                # one step's hidden state goes up, the sampled token comes back down to be fed in
                up = rounds * serialise_ms(links[l], width * float(p.cut_step_bytes[k, c]), up=True)
                down = rounds * serialise_ms(links[l], width * p.token_bytes, up=False)
                _add(ev.transfer_ms, names[l], N * (up + down))
                _add(ev.propagation_ms, names[l], N * rounds * 2 * links[l].one_way_ms)
                _add(ev.message_ms, names[l], N * rounds * msg)
                per_step += up + down + rounds * (2 * links[l].one_way_ms + msg)
        ev.per_token_ms += per_step
    if ev.fidelity_loss > p.fidelity_budget + FIDELITY_EPS and lossy > 1:
        ev.violations.append(
            f"end-to-end fidelity: the cuts' (1 - {p.fidelity_metric}) sum to {ev.fidelity_loss:.3g} > {p.fidelity_budget:.3g}"
        )

    if not N:
        ev.per_token_ms = 0.0  # no decode steps: keep the field honest rather than report an unused figure
    ev.total_ms = ev.prefill_ms + N * ev.per_token_ms
    for l in range(last):  # every link up to the last computing tier carries a connection
        ev.handshake_ms[names[l]] = links[l].rtt_ms + hs
    ev.bottleneck, ev.bottleneck_ms = max(ev.busy_ms.items(), key=lambda kv: kv[1])
    return ev


@dataclass
class Tables:
    """The cost terms as arrays for the DP (ms; inf where not allowed).

    ``stage_ms[t, s]``: stage s on tier t (prefill, plus N decode steps for 'generate').
    ``cut_ms[a, z, b, c]``: boundary b coded with c, sent from tier a to tier z (a < z), all steps included
    (b = 0: the raw input, which only the device sends). ``output_ms[a]``: output returning from tier a.
    ``cut_busy_ms[a, z, b, c]``: the busiest pipeline resource of that crossing (throughput).
    ``output_busy_ms[a]``: the same for the output."""

    stage_ms: np.ndarray
    prefix_ms: np.ndarray  # (T, S+1) cumulative stage_ms
    prefill_prefix_ms: np.ndarray  # (T, S+1) cumulative prefill only (throughput: tier busy time)
    cut_ms: np.ndarray
    cut_busy_ms: np.ndarray
    output_ms: np.ndarray
    output_busy_ms: np.ndarray


def dp_tables(problem: Problem, *, fidelity_mask: bool = True, spec=None) -> Tables:
    """Vectorised cost terms; a codec whose own cut breaks the fidelity floor is masked out (inf).

    ``spec`` (a :class:`aiflow_cli.plan.speculation.Spec`): the tables of the placements whose device runs
    exactly ``[0, spec.device_end)`` and speculates as ``spec`` says; every other device range is masked out."""
    p = problem
    T, S, C, N = p.n_tiers, p.n_stages, p.n_codecs, decode_steps(p)
    rounds, width = (spec.rounds_per_token, spec.draft + 1) if spec else (1.0, 1)
    per_tier = np.full((T, 1), rounds)
    if spec:
        per_tier[0] *= spec.draft  # the device drafts `draft` tokens per round
    stage = p.prefill_ms + N * per_tier * np.where(p.decode_stage[None, :], p.decode_ms, 0.0)
    prefix = np.concatenate([np.zeros((T, 1)), np.cumsum(stage, axis=1)], axis=1)
    pprefix = np.concatenate([np.zeros((T, 1)), np.cumsum(p.prefill_ms, axis=1)], axis=1)

    ok = p.available.copy()
    if fidelity_mask:
        ok &= p.cut_loss <= p.fidelity_budget + FIDELITY_EPS
    cut = np.full((T, T, S, C), np.inf)
    busy = np.full((T, T, S, C), np.inf)
    bytes_ = np.where(ok, p.cut_bytes, 0.0)
    # (S, 1) message rounds crossing the boundary (decode steps, or speculative rounds)
    per_step = np.where(p.cut_decodes, 1.0, 0.0)[:, None] * (N * rounds if N else 0)
    with np.errstate(invalid="ignore"):  # inf * 0 where a codec is unavailable; masked just below
        _fill_cuts(p, ok, bytes_, per_step, cut, busy, width)
    if spec is None and p.speculate > 0:  # a fixed K always drafts; auto may also decode plainly (g = 0)
        from aiflow_cli.plan.speculation import spec_for

        for k in range(1, S):  # device ranges that speculate are priced by their own tables (spec=...)
            if spec_for(p, k, 1) is not None:
                cut[0, :, k] = np.inf
    if spec:
        k = spec.device_end
        keep = cut[0, :, k].copy()
        cut[0] = np.inf  # the device hands over exactly at k ...
        cut[0, :, k] = keep + N * rounds * spec.draft * float(p.decode_ms[0, S - 1])  # ... and drafts with the head

    out = np.zeros(T)
    out_busy = np.zeros(T)
    for t in range(1, T):
        link = p.links[t - 1]
        xo = serialise_ms(link, p.output_bytes, up=False)
        out[t] = out[t - 1] + xo + link.one_way_ms
        out_busy[t] = max(out_busy[t - 1], xo)
    # the last computing tier may not be below a required tier (the first may not be above one: _fill_cuts)
    for t in range(T):
        if p.require[t + 1 :].any():
            out[t] = np.inf
    if spec:
        out[0] = np.inf  # tiers behind the device verify: it is not the last
    return Tables(stage, prefix, pprefix, cut, busy, out, out_busy)


def _fill_cuts(
    p: Problem,
    ok: np.ndarray,
    bytes_: np.ndarray,
    per_step: np.ndarray,
    cut: np.ndarray,
    busy: np.ndarray,
    width: int = 1,
) -> None:
    """Fills ``cut`` and ``busy`` (see :class:`Tables`) for every pair of tiers a < z; ``width``: positions per
    decode message (``draft + 1`` when speculating)."""
    T, msg = p.n_tiers, p.overheads.message_ms
    for a in range(T):
        for z in range(a + 1, T):
            # an intermediate required tier must compute, so a crossing may not jump over it
            if p.require[a + 1 : z].any():
                continue
            codec = p.enc_ms[a] + p.dec_ms[z]
            total = codec + per_step * width * p.step_fraction[:, None] * codec
            worst = np.maximum(p.enc_ms[a], p.dec_ms[z])
            for l in range(a, z):
                link = p.links[l]
                x = bytes_ * 8e-3 / goodput_mbps(link, up=True)
                step = (
                    width * p.cut_step_bytes * 8e-3 / goodput_mbps(link, up=True)
                    + width * p.token_bytes * 8e-3 / goodput_mbps(link, up=False)
                    + 2 * link.one_way_ms
                    + msg
                )
                total = total + x + link.one_way_ms + msg + per_step * step
                worst = np.maximum(worst, x)
            cut[a, z] = np.where(ok, total, np.inf)
            busy[a, z] = np.where(ok, worst, np.inf)
