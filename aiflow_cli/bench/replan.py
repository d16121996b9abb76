"""The re-planning half of ``aiflow bench decode``: a generation workload whose uplink drops 10x halfway, run
once on the plan solved for the link before the drop (static) and once with re-planning on (the device measures
its link and switches every tier to a new plan between requests: aiflow_cli/runtime/replan.py).

The emulated situation, where re-planning matters honestly: the prompt must stay on the device (the plan is
solved with ``require device``), the device is a slower machine (``DEVICE_SPEED`` x this CPU, emulated), and its
uplink is a modest cellular link (``FAT``: 0.7 Mbit/s up, 20 ms: a weak cellular uplink). There the planner hands the embeddings up after
the device's first stage and lets the edge generate (a round trip per token, the prompt's hidden states once:
about 2.3 kB per prompt token for SmolLM2). When the uplink falls to 0.07 Mbit/s (``THIN``, the same link 10x
thinner: a phone walking out of coverage) every prompt costs seconds of upload and every token a round trip
of 100 ms of serialisation: keeping every stage on the (slower) device is then better, which is what the
re-planned run switches to once it has measured the new link.

Measured: the wall time of the whole workload (warm connections; the switch, with the stages the device loads
for its new plan, counts in the re-planned time), the plan switch (when, from what to what, the link as measured
against the one assumed), and whether every answer equals the static run's token for token. Emulated: both links
(userspace link emulator), the device's speed (its compute stretched), the edge-cloud link (``lan``).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from aiflow_cli.bench.e2e import Goal
from aiflow_cli.errors import TransportError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.plan.problem import Limits, Problem, build_problem
from aiflow_cli.plan.schema import Plan, save_plan
from aiflow_cli.plan.solver import solve_plan, solve_problem
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.linkwatch import ReplanPolicy
from aiflow_cli.runtime.pipeline import Pipeline
from aiflow_cli.runtime.replan import ReplanConfig, send_replan
from aiflow_cli.transport import Client

#: The device-edge link before the drop: a modest cellular uplink (queue large enough that a prompt's upload is
#: queued, not dropped).
FAT = LinkProfile(
    name="cell-2mbit",
    source="aiflow bench decode: the re-planning run's link before the drop",
    uplink_mbps=0.7,
    downlink_mbps=7.0,
    rtt_ms=20.0,
    queue_ms=5000.0,
)
#: The same link after the uplink drops 10x.
THIN = FAT.model_copy(update={"name": "cell-0.07mbit", "uplink_mbps": FAT.uplink_mbps / 10, "queue_ms": 20000.0})
#: The device's speed (x this CPU), emulated; edge and cloud run at this CPU's speed.
DEVICE_SPEED = 0.25
#: The goal: the re-planned workload finishes at least this many times sooner than the static one.
GOAL_SPEEDUP = 1.5
#: The policy of the re-planned run: one large message (a prompt upload) measured on the new link is evidence
#: enough, no wait after a switch; a new plan must be predicted 20 % better.
POLICY = ReplanPolicy(margin=0.2, change=0.5, min_samples=1, min_interval_s=0.0)

Progress = Callable[[str], None]


@dataclass
class ReplanSetup:
    """The workload: ``requests`` prompts (the calibration set's, in turn) of ``tokens`` generated tokens each;
    the uplink drops after ``requests // 2``."""

    model: str
    requests: int = 8
    tokens: int = 4
    threads: int = 1


def _profile(model: str):
    """The model's measured profile: the shipped one of this machine when there is one, else measured here
    (quick settings: built-in models take seconds)."""
    from aiflow_cli.profile import load_profile, profile_model
    from aiflow_cli.shipped import PROFILES_DIR

    shipped = PROFILES_DIR / "hardware" / f"cpu-2core-{model.removeprefix('builtin:')}.json"
    if shipped.is_file():
        return load_profile(str(shipped)), str(shipped)
    return profile_model(model, repeats=1, warmup=0, codecs=["raw"], calibration_items=1, calibration_tokens=2), None


def problem(model: str, tokens: int) -> tuple[Problem, Optional[str]]:
    """The planning problem of the run (see the module docstring) and the profile's path (None: measured here)."""
    prof, path = _profile(model)
    return (
        build_problem(
            {"*": prof},
            {"device-edge": FAT, "edge-cloud": load_link("lan")},
            objective="generate",
            tokens=tokens,
            limits=Limits(require=frozenset({"device"}), codecs=("raw",)),
            speeds={"device": DEVICE_SPEED, "edge": 1.0, "cloud": 1.0},
        ),
        path,
    )


def _prompts(n: int) -> list[str]:
    from aiflow_cli.profile.calibration import load_calibration

    prompts = load_calibration().prompts
    return [prompts[i % len(prompts)] for i in range(n)]


def _workload(c: LocalCluster, p: Any, prompts: list[str], tokens: int, progress: Progress, label: str) -> dict:
    """Runs the prompts in turn, the uplink dropping to THIN halfway; returns times, answers, switch events."""
    c.set_link("device-edge", FAT)
    p.close()  # a fresh connection through the new emulator
    r = p.run(text=prompts[0], max_new_tokens=2)  # untimed: opens the connections (not measured by the watch)
    switch = {**r.replan["switch"], "after_request": 0} if r.replan and r.replan.get("switch") else None
    drop = len(prompts) // 2
    per_request, answers, retries = [], [], []
    t0 = time.perf_counter()
    for i, text in enumerate(prompts):
        if i == drop:
            c.set_link("device-edge", THIN)
            p.close()  # the phone's new network: the next request reconnects (its handshake is timed)
        t1 = time.perf_counter()
        try:
            r = p.run(text=text, max_new_tokens=tokens)
        except TransportError as e:  # a connection lost on the thin link: retried once, the lost time counted
            retries.append(f"request {i + 1}: {e}")
            progress(f"replan bench, {label}: request {i + 1} failed ({e}); retrying")
            p.close()
            r = p.run(text=text, max_new_tokens=tokens)
        per_request.append(round(time.perf_counter() - t1, 3))
        answers.append(r.tokens)
        if r.replan and r.replan.get("switch") and switch is None:
            switch = {**r.replan["switch"], "after_request": i + 1}
        progress(f"replan bench, {label}: request {i + 1}/{len(prompts)} {per_request[-1]:.2f} s")
    return {
        "total_s": round(time.perf_counter() - t0, 3),
        "per_request_s": per_request,
        "answers": answers,
        "switch": switch,
        "retries": retries,
    }


def run_replan(
    setup: ReplanSetup, workdir: Path, progress: Progress = lambda s: None, cluster: Optional[LocalCluster] = None
) -> dict[str, Any]:
    """The static and the re-planned run of the workload on one cluster (the static one first; the servers keep
    both plans), and what the report needs (``static_s``, ``replanned_s``, ...). ``cluster``: a running
    :class:`LocalCluster` of the same model with a device-edge emulator and ``lan`` behind the edge (the decode
    sweep's), switched to this run's plan by a ``Replan`` message; default: one started here."""
    prob, profile_path = problem(setup.model, setup.tokens)
    plan, _ = solve_plan(prob, verify=False, sources={"*": profile_path} if profile_path else None)
    thin_pl, thin_ev = solve_problem(prob.with_link(0, THIN))
    from aiflow_cli.plan.explain import placement_summary

    thin_summary = placement_summary(prob, thin_pl)
    out: dict[str, Any] = {
        "model": setup.model,
        "requests": setup.requests,
        "tokens": setup.tokens,
        "drop_after_request": setup.requests // 2,
        "links": {"before": _link(FAT), "after": _link(THIN), "edge-cloud": "lan"},
        "device_speed": DEVICE_SPEED,
        "plan_before": plan.summary(),
        "planned_for_after": thin_summary,
        "policy": {"margin": POLICY.margin, "change": POLICY.change, "min_samples": POLICY.min_samples},
    }
    if thin_summary == placement_summary(prob, _placement(plan, prob)):
        out.update(static_s=None, replanned_s=None, speedup=None, identical=None, switched_at=None)
        out["note"] = f"the planner keeps {thin_summary} on both links for {setup.model}: nothing to re-plan"
        return out
    path = workdir / "replan-plan.json"
    save_plan(plan, path)
    prompts = _prompts(setup.requests)
    timeout_s = 120.0 + setup.tokens * 10
    with ExitStack() as stack:
        c = cluster
        if c is None:
            progress(f"replan bench: starting edge and cloud for {plan.summary()} (device at {DEVICE_SPEED:g}x)")
            links = {"device-edge": FAT, "edge-cloud": load_link("lan")}
            c = stack.enter_context(LocalCluster(path, workdir / "replan", links=links, threads=setup.threads))
        else:  # a running cluster (same model, a device-edge emulator, lan behind): switch it to this plan
            progress(f"replan bench: switching the running edge and cloud to {plan.summary()}")
            c.set_link("device-edge", FAT)
            with _client(c, timeout_s) as client:
                send_replan(client, "", plan, "device", timeout_s)

        def pipeline(**kw: Any) -> Pipeline:
            return stack.enter_context(
                Pipeline(
                    plan,
                    edge=c.addresses["edge"],
                    identity=c.keys["device"],
                    trust=c.fingerprints(),
                    timeout_s=timeout_s,
                    speed=DEVICE_SPEED,
                    **kw,
                )
            )

        first = pipeline()
        static = _workload(c, first, prompts, setup.tokens, progress, "static plan")
        first.close()
        p = pipeline(replan=ReplanConfig(POLICY, problem=prob))
        replanned = _workload(c, p, prompts, setup.tokens, progress, "re-planning")
        final = p.plan.summary()
    identical = all(torch.equal(a, b) for a, b in zip(static["answers"], replanned["answers"]))
    sw = replanned["switch"]
    out.update(
        static_s=static["total_s"],
        replanned_s=replanned["total_s"],
        speedup=round(static["total_s"] / replanned["total_s"], 3),
        identical=identical,
        switched_at=sw["after_request"] if sw else None,
        plan_after=final,
        switch=sw,
        per_request_s={"static": static["per_request_s"], "replanned": replanned["per_request_s"]},
        retries={"static": static["retries"], "replanned": replanned["retries"]},
        predicted_after_drop_ms={
            "static": round(_ev_ms(prob, plan, THIN), 1),
            "re-planned": round(thin_ev.total_ms, 1),
        },
    )
    return out


def _client(c: LocalCluster, timeout_s: float) -> Client:
    return Client(c.addresses["edge"], identity=c.keys["device"], trust=c.fingerprints(), timeout_s=timeout_s)


def _placement(plan: Plan, prob: Problem):
    from aiflow_cli.runtime.replan import placement_of

    return placement_of(plan, prob)


def _ev_ms(prob: Problem, plan: Plan, link: LinkProfile) -> float:
    from aiflow_cli.plan.cost import evaluate

    return evaluate(prob.with_link(0, link), _placement(plan, prob)).total_ms


def _link(lk: LinkProfile) -> dict[str, float]:
    return {"uplink_mbps": lk.uplink_mbps, "downlink_mbps": lk.downlink_mbps, "rtt_ms": lk.rtt_ms}


def goal(replan: dict[str, Any]) -> Goal:
    """The issue's goal: the re-planned run finishes >= 1.5x sooner than the static plan, same answers."""
    name = f"re-planned run finishes >= {GOAL_SPEEDUP:g}x sooner than the static plan (uplink drops 10x halfway)"
    if replan.get("speedup") is None:
        return Goal(name, False, replan.get("note", "not run"))
    met = replan["speedup"] >= GOAL_SPEEDUP and bool(replan["identical"]) and replan["switched_at"] is not None
    return Goal(
        name,
        met,
        f"static {replan['static_s']:.1f} s, re-planned {replan['replanned_s']:.1f} s ({replan['speedup']:.2f}x); "
        f"switched after request {replan['switched_at']} of {replan['requests']} "
        f"({replan['plan_before']} -> {replan.get('plan_after')}); answers identical: {replan['identical']}",
    )


EMULATED = (
    f"re-planning run: device-edge {FAT.uplink_mbps:g} Mbit/s up, {FAT.downlink_mbps:g} down, {FAT.rtt_ms:g} ms, "
    f"uplink dropping to {THIN.uplink_mbps:g} Mbit/s halfway; device at {DEVICE_SPEED:g}x this CPU; prompt kept on "
    "the device"
)


def replan_run(cfg: Any, progress: Progress = lambda s: None, cluster: Optional[LocalCluster] = None) -> dict[str, Any]:
    """The re-planning run of ``aiflow bench decode`` (its :class:`DecodeConfig`: model, threads, workdir,
    ``replan_requests``; 0: skipped, ``{}``). Tokens per request: 4, so that the prompts' upload, which the drop
    hurts most, is a visible part of each request, as in a chat's short answers."""
    if not cfg.replan_requests:
        return {}
    import tempfile

    setup = ReplanSetup(cfg.model, requests=max(2, cfg.replan_requests), tokens=4, threads=cfg.threads)
    if cfg.workdir:
        return run_replan(setup, Path(cfg.workdir), progress, cluster)
    with tempfile.TemporaryDirectory() as d:
        return run_replan(setup, Path(d), progress, cluster)


def describe(replan: dict[str, Any]) -> str:
    """The lines ``aiflow bench decode`` prints for the re-planning run."""
    if replan.get("speedup") is None:
        return f"re-planning run: {replan.get('note', 'not run')}"
    sw = replan.get("switch") or {}
    lines = [
        f"re-planning run ({replan['requests']} requests of {replan['tokens']} tokens, uplink "
        f"{replan['links']['before']['uplink_mbps']:g} -> {replan['links']['after']['uplink_mbps']:g} Mbit/s after "
        f"request {replan['drop_after_request']}): static {replan['static_s']:.1f} s, re-planned "
        f"{replan['replanned_s']:.1f} s ({replan['speedup']:.2f}x), answers identical: {replan['identical']}",
        f"  plan {replan['plan_before']} -> {replan.get('plan_after')}"
        + (
            f", switched after request {replan['switched_at']} (measured uplink "
            f"{sw['measured_link']['uplink_mbps']:g} Mbit/s, rtt {sw['measured_link']['rtt_ms']:g} ms; assumed "
            f"{sw['assumed_link']['uplink_mbps']:g} Mbit/s, {sw['assumed_link']['rtt_ms']:g} ms; switch "
            f"{sw.get('switch_ms', 0):.0f} ms)"
            if sw
            else ", no switch"
        ),
    ]
    return "\n".join(lines)
