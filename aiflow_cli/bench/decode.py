"""``aiflow bench decode``: token generation over a split model, with and without self-speculation, over an RTT
sweep of the device-edge link.

Modes, each on the real runtime (:class:`LocalCluster`: edge and cloud are ``aiflow serve`` processes on loopback
behind the userspace link emulator, the device is this process):

- ``cloud-only``: the device uploads the prompt, the cloud runs every stage and generates (one round trip);
- ``split``: the device holds stages ``[0:a)``, the edge ``[a:b)``, the cloud ``[b:n)``; one round trip per token;
- ``spec-kK``: the same placement, the device drafts K tokens per round with its own layers + the head (the
  untrained early exit), the edge and cloud verify them in one message per link
  (:mod:`aiflow_cli.runtime.speculate`);
- ``spec-auto``: the same, K chosen each round from the acceptance and round-trip time observed so far;
- ``spec-trained-kK`` / ``spec-trained-auto``: the same with the trained exit of the device's last block
  (:mod:`aiflow_cli.models.exit_adapter`; trained first when none is cached, the training time reported apart);
- ``spec-draft-auto`` (with ``draft``): a separate draft model on the device (:mod:`aiflow_cli.runtime.drafters`);
- ``spec-precheck-kK`` / ``spec-precheck-auto`` (with ``precheck``): ``spec-kK`` / ``spec-auto`` with the edge
  pre-checking each round's drafts with its own exit (:mod:`aiflow_cli.runtime.precheck`): the cloud verifies
  only the drafts up to the first one the edge's exit rejects (``verified`` per row).

Per (RTT, mode): tokens/s (tokens generated / request time), time to first token, acceptance of the drafts,
tokens per device-edge round trip, whether the output equals the non-speculative split's token for token, and per
tier the compute milliseconds per generated token. Measured: times, tokens, acceptance, compute. Emulated: the
device-edge link (RTT swept, rate fixed) and the edge-cloud link (``lan``); every tier runs on this CPU at its
real speed (one torch thread each). Modes are interleaved within each RTT, so other load falls on all alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from aiflow_cli.bench.common import JsonResult
from aiflow_cli.bench.e2e import Goal
from aiflow_cli.bench.replan import EMULATED as REPLAN_EMULATED
from aiflow_cli.bench.replan import goal as replan_goal
from aiflow_cli.bench.replan import replan_run
from aiflow_cli.errors import InputError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.models import StagedModel, load_stages
from aiflow_cli.plan import Limits, solve
from aiflow_cli.plan.schema import Plan, save_plan
from aiflow_cli.plan.synthetic import synthetic_profile
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.pipeline import Pipeline, RunResult
from aiflow_cli.runtime.speculate import exit_acceptance

TIERS = ("device", "edge", "cloud")
DEFAULT_MODEL = "smollm2"
FULL_RTTS_MS = (10.0, 40.0, 100.0, 200.0)
QUICK_RTTS_MS = (40.0, 100.0)
PROMPT = "Explain in a few sentences why the sky is blue."
#: The goal: at every swept RTT >= GOAL_RTT_MS, speculation gives >= GOAL_SPEEDUP x the split's tokens/s.
GOAL_RTT_MS = 40.0
GOAL_SPEEDUP = 2.0
#: Rates of the emulated device-edge link (Mbit/s): a good cellular/Wi-Fi link; the sweep varies only its RTT.
UPLINK_MBPS, DOWNLINK_MBPS = 50.0, 100.0

Progress = Callable[[str], None]


def fixed_plan(model: StagedModel, bounds: tuple[int, int], codec: str = "raw") -> Plan:
    """A plan of ``model`` with fixed stage ranges: device ``[0:a)``, edge ``[a:b)``, cloud ``[b:n)`` for
    ``bounds = (a, b)`` (``(0, 0)``: cloud-only). Its prediction is of a synthetic profile (the runtime reads only
    the stage ranges and codecs)."""
    a, b = bounds
    n = model.num_stages
    if not 0 <= a <= b < n or (0 < a == b):
        raise InputError(
            f"split={a},{b}: need 0 < device end < edge end < {n} (stages of {model.name}), or 0,0 for cloud-only",
            param="split",
        )
    prof = synthetic_profile(n, n_codecs=1, model_hash=model.model_hash).model_copy(
        update={"model": model.name, "family": model.family, "task": model.task}
    )
    ranges = dict(zip(TIERS, ((0, a), (a, b), (b, n))))
    computing = {t for t, (lo, hi) in ranges.items() if hi > lo}
    plan = solve(
        {"*": prof},
        {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")},
        objective="generate",
        tokens=4,
        limits=Limits(require=frozenset(computing), skip=frozenset(TIERS) - computing, codecs=(codec,)),
        speeds={t: 1 for t in TIERS},
    )
    d = plan.model_dump(mode="json")
    for t in d["tiers"]:
        t["start"], t["end"] = ranges[t["name"]]
        t["stages"] = model.stage_names[t["start"] : t["end"]]
    ends = {t["name"]: t["end"] for t in d["tiers"]}
    for c in d["cuts"]:
        c["after_stage"] = ends[c["from_tier"]] - 1
    d["stage_names"] = model.stage_names
    return Plan.model_validate(d)


def rtt_link(rtt_ms: float) -> LinkProfile:
    """The emulated device-edge link of one sweep point."""
    return LinkProfile(
        name=f"rtt{rtt_ms:g}ms",
        source="aiflow bench decode: RTT sweep point",
        uplink_mbps=UPLINK_MBPS,
        downlink_mbps=DOWNLINK_MBPS,
        rtt_ms=rtt_ms,
    )


@dataclass
class DecodeConfig:
    """What to run; times in ms. ``split``: (device end, edge end) stage indices (default: the device holds every
    block but the last, the edge the last block, the cloud the head)."""

    model: str = DEFAULT_MODEL
    rtts_ms: tuple[float, ...] = FULL_RTTS_MS
    tokens: int = 32
    repeats: int = 3
    k: int = 4
    split: Optional[tuple[int, int]] = None
    prompt: str = PROMPT
    threads: int = 1
    workdir: Optional[Path] = None
    warmup_tokens: Optional[int] = None
    """Tokens of the untimed request per mode and RTT that opens the connections (default: ``tokens``)."""
    trained: bool = True
    """Run the trained-exit modes (training the exit of the device's last block first if none is cached)."""
    train_steps: int = 300
    draft: Optional[str] = None
    """A draft model for the ``spec-draft-auto`` mode (same vocabulary as ``model``)."""
    replan_requests: int = 10
    """Requests of the re-planning run (aiflow_cli/bench/replan.py; the uplink drops halfway); 0: no such run."""
    precheck: bool = False
    """Run the ``spec-precheck-*`` modes (the edge pre-checks drafts with its own exit)."""

    @classmethod
    def quick_config(cls, **overrides: Any) -> "DecodeConfig":
        base: dict[str, Any] = {
            "rtts_ms": QUICK_RTTS_MS,
            "tokens": 12,
            "repeats": 1,
            "warmup_tokens": 4,
            "replan_requests": 4,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def check(self) -> None:
        if not self.rtts_ms or any(not r >= 0 for r in self.rtts_ms):
            rtts = ",".join(f"{r:g}" for r in self.rtts_ms)
            raise InputError(f"rtts_ms={rtts}: give one or more RTTs >= 0 ms", param="rtts_ms")
        for name, v in (("tokens", self.tokens), ("repeats", self.repeats), ("k", self.k)):
            if v < 1:
                raise InputError(f"{name}={v}: must be >= 1", param=name)


@dataclass
class DecodeReport(JsonResult):
    model: str
    plans: dict[str, str]
    exit_acceptance: dict[str, float]
    """Exit stage -> share of the full model's greedy tokens the early exit there predicts (teacher-forced)."""
    exit_training: Optional[dict[str, Any]]
    """The trained exit the ``spec-trained-*`` modes use: layer, path, whether this run trained it and how long it
    took (s), loss and held-out acceptance before/after; or why there is none."""
    config: dict[str, Any]
    runs: list[dict[str, Any]]
    goals: list[Goal]
    measured: str
    emulated: str
    machine: dict[str, Any]
    wall_s: float = 0.0
    command: str = ""
    replan: dict[str, Any] = field(default_factory=dict)
    """The run whose uplink drops 10x halfway, static plan vs re-planning (aiflow_cli/bench/replan.py)."""


@dataclass
class _Mode:
    name: str
    pipeline: Pipeline
    cluster: LocalCluster
    results: list[RunResult] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)


def _timed(p: Pipeline, prompt: str, n: int) -> tuple[RunResult, float]:
    p.node.first_token_at = None
    r = p.run(text=prompt, max_new_tokens=n)
    end = time.perf_counter()
    first = p.node.first_token_at
    ttft = r.total_ms - (end - first) * 1e3 if first is not None and r.tokens is not None and n > 1 else r.total_ms
    return r, ttft


def _summary(rtt_ms: float, m: _Mode, reference: torch.Tensor) -> dict[str, Any]:
    rs = m.results
    total_ms = statistics.median(r.total_ms for r in rs)
    tokens = rs[0].tokens.shape[1] if rs[0].tokens is not None else 0
    drafted = sum(r.speculation["drafted"] for r in rs if r.speculation)
    verified = sum(r.speculation["verified"] for r in rs if r.speculation)
    accepted = sum(r.speculation["accepted"] for r in rs if r.speculation)
    messages = sum(r.timings.links["device-edge"].messages for r in rs) if "device-edge" in rs[0].timings.links else 0
    n_tokens = sum(r.tokens.shape[1] for r in rs if r.tokens is not None)
    compute = {
        t: round(sum(r.timings.tiers[t].compute_ms for r in rs if t in r.timings.tiers) / max(n_tokens, 1), 3)
        for t in TIERS
    }
    return {
        "rtt_ms": rtt_ms,
        "mode": m.name,
        "tokens": tokens,
        "total_ms": round(total_ms, 1),
        "tokens_per_s": round(tokens / (total_ms / 1e3), 3),
        "ttft_ms": round(statistics.median(m.ttft_ms), 1),
        "acceptance": round(accepted / drafted, 4) if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "verified": verified,
        "edge_cloud_bytes_per_token": round(
            sum(r.timings.links["edge-cloud"].bytes_up for r in rs if "edge-cloud" in r.timings.links)
            / max(n_tokens, 1)
        ),
        "tokens_per_round_trip": round(n_tokens / messages, 3) if messages else None,
        "round_trips": round(messages / len(rs), 2),
        "identical": all(r.tokens is not None and torch.equal(r.tokens, reference) for r in rs),
        "compute_ms_per_token": compute,
        "requests": len(rs),
        "policy": rs[-1].speculation["policy"] if rs[-1].speculation else None,
    }


def check_goals(runs: list[dict[str, Any]]) -> list[Goal]:
    """The issue's goals from measured rows (pure): speculation >= 2x the split's tokens/s at every RTT >= 40 ms
    (the better speculative mode of each RTT), and every run's greedy output identical to the split's."""
    by_rtt: dict[float, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_rtt.setdefault(r["rtt_ms"], {})[r["mode"]] = r
    points = []
    for rtt, rows in sorted(by_rtt.items()):
        if rtt < GOAL_RTT_MS or "split" not in rows:
            continue
        spec = [v for k, v in rows.items() if k.startswith("spec-")]
        if not spec:
            continue
        best = max(spec, key=lambda v: v["tokens_per_s"])
        points.append((rtt, best, best["tokens_per_s"] / rows["split"]["tokens_per_s"]))
    goals = []
    if points:
        worst = min(points, key=lambda p: p[2])
        goals.append(
            Goal(
                f"speculation >= {GOAL_SPEEDUP:g}x the tokens/s of the non-speculative split at RTT >= "
                f"{GOAL_RTT_MS:g} ms",
                all(p[2] >= GOAL_SPEEDUP for p in points),
                "; ".join(f"{rtt:g} ms: {b['mode']} {s:.2f}x" for rtt, b, s in points)
                + f" (lowest {worst[2]:.2f}x at {worst[0]:g} ms)",
            )
        )
    else:
        goals.append(Goal(f"speculation >= {GOAL_SPEEDUP:g}x at RTT >= {GOAL_RTT_MS:g} ms", False, "no RTT >= 40 ms"))
    differ = [f"{r['mode']}@{r['rtt_ms']:g}ms" for r in runs if not r["identical"]]
    goals.append(
        Goal(
            "greedy output identical to the non-speculative split in every run",
            not differ,
            "all identical" if not differ else "differs: " + ", ".join(differ),
        )
    )
    return goals


def _trained_exit(cfg: DecodeConfig, model: StagedModel, device_end: int, progress: Progress) -> dict[str, Any]:
    """The trained exit of the device's last block: the cached one, else trained now (timed apart)."""
    from aiflow_cli.models.exit_adapter import exit_layers, exit_path, find_exit, train_exit
    from aiflow_cli.runtime.drafters import device_exit_layer

    layer = device_exit_layer(model, device_end)
    if layer is None or layer not in exit_layers(model):
        return {"exit_layer": layer, "path": None, "why": "the device's last stage is not a block with an exit"}
    found = find_exit(model.model_hash, layer)
    if found is not None:
        m = found.meta
        return {
            "exit_layer": layer,
            "path": str(exit_path(model.model_hash, layer)),
            "trained_now": False,
            **{
                k: m.get(k)
                for k in ("steps", "seed", "loss_before", "loss_after", "acceptance_before", "acceptance_after")
            },
        }
    progress(f"training the exit after block {layer} of {cfg.model} (as `aiflow draft train` does)")
    r = train_exit(cfg.model, layer, steps=cfg.train_steps, progress=progress)
    torch.set_num_threads(cfg.threads)
    out = {
        k: v
        for k, v in r.to_json().items()
        if k
        in ("path", "steps", "seed", "loss_before", "loss_after", "acceptance_before", "acceptance_after", "train_s")
    }
    return {"exit_layer": layer, "trained_now": True, **out}


def run(cfg: DecodeConfig, progress: Progress = lambda s: None, command: str = "") -> DecodeReport:
    """Starts the two placements once, sweeps the RTTs, measures every mode; see the module docstring."""
    cfg.check()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    load_start = os.getloadavg()[0]
    model = load_stages(cfg.model, [])  # the skeleton only: stage names, hash, tokenizer
    n = model.num_stages
    split = cfg.split or (n - 2, n - 1)
    plans = {"split": fixed_plan(model, split), "cloud-only": fixed_plan(model, (0, 0))}
    progress("measuring the early exits' acceptance in this process (teacher-forced, every stage loaded)")
    full = load_stages(cfg.model)
    exits = sorted({*range(4, n - 1, 4), split[0] - 1, n - 3})
    acceptance = exit_acceptance(full, full.prepare(text=cfg.prompt), exits, cfg.tokens)
    del full
    exit_training = _trained_exit(cfg, model, split[0], progress) if cfg.trained else None
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        workdir = Path(cfg.workdir) if cfg.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        clusters = {}
        for name, plan in plans.items():
            path = workdir / f"{name}.json"
            save_plan(plan, path)
            links = {"device-edge": rtt_link(cfg.rtts_ms[0]), "edge-cloud": load_link("lan")}
            clusters[name] = LocalCluster(path, workdir / name, links=links, threads=cfg.threads)
            stack.callback(clusters[name].close)
        progress("starting edge and cloud: " + "; ".join(f"{k} {p.summary()}" for k, p in plans.items()))
        with ThreadPoolExecutor(len(clusters)) as pool:  # both placements' servers start at once
            for f in [pool.submit(c.start) for c in clusters.values()]:
                f.result()
        timeout_s = 60.0 + cfg.tokens * (10 + max(cfg.rtts_ms) / 1e3 * 4)
        modes = [
            _Mode(
                "cloud-only",
                stack.enter_context(clusters["cloud-only"].pipeline(timeout_s=timeout_s)),
                clusters["cloud-only"],
            ),
            _Mode("split", stack.enter_context(clusters["split"].pipeline(timeout_s=timeout_s)), clusters["split"]),
        ]
        spec_modes = [(f"spec-k{cfg.k}", cfg.k, "untrained", False), ("spec-auto", "auto", "untrained", False)]
        if exit_training is not None and exit_training.get("path"):
            spec_modes += [
                (f"spec-trained-k{cfg.k}", cfg.k, "exit", False),
                ("spec-trained-auto", "auto", "exit", False),
            ]
        if cfg.draft:
            spec_modes.append(("spec-draft-auto", "auto", cfg.draft, False))
        if cfg.precheck:
            spec_modes += [(f"spec-precheck-k{cfg.k}", cfg.k, "untrained", True)]
            spec_modes += [("spec-precheck-auto", "auto", "untrained", True)]
        for name, k, draft, precheck in spec_modes:
            p = clusters["split"].pipeline(timeout_s=timeout_s, speculate=k, draft=draft, precheck=precheck)
            modes.append(_Mode(name, stack.enter_context(p), clusters["split"]))
        reference: Optional[torch.Tensor] = None
        for i, rtt in enumerate(cfg.rtts_ms):
            if i:
                for c in clusters.values():
                    c.set_link("device-edge", rtt_link(rtt))
                for m in modes:
                    m.pipeline.close()  # its connection went through the old emulator; the next request reconnects
            progress(f"RTT {rtt:g} ms: warming up {len(modes)} modes")
            for m in modes:
                m.results, m.ttft_ms = [], []
                # opens the connections (auto starts learning the link)
                _timed(m.pipeline, cfg.prompt, cfg.warmup_tokens or cfg.tokens)
            for rep in range(cfg.repeats):
                progress(f"RTT {rtt:g} ms: round {rep + 1}/{cfg.repeats}")
                order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
                for m in order:
                    r, ttft = _timed(m.pipeline, cfg.prompt, cfg.tokens)
                    m.results.append(r)
                    m.ttft_ms.append(ttft)
            if reference is None:  # the non-speculative split's first answer: what every run must equal
                reference = modes[1].results[0].tokens
            assert reference is not None
            for m in modes:
                runs.append(_summary(rtt, m, reference))
            split_tps = next(r["tokens_per_s"] for r in runs if r["rtt_ms"] == rtt and r["mode"] == "split")
            progress(
                f"RTT {rtt:g} ms: "
                + ", ".join(f"{r['mode']} {r['tokens_per_s']:.1f} tok/s" for r in runs if r["rtt_ms"] == rtt)
                + f" (split {split_tps:.1f})"
            )
        for m in modes:
            m.pipeline.close()
        replan = replan_run(cfg, progress, clusters["split"])  # the split's servers, switched (bench/replan.py)
    load_end = os.getloadavg()[0]
    return DecodeReport(
        model=cfg.model,
        plans={k: p.summary() for k, p in plans.items()},
        exit_acceptance={str(k): round(v, 4) for k, v in acceptance.items()},
        exit_training=exit_training,
        config={
            "rtts_ms": list(cfg.rtts_ms),
            "tokens": cfg.tokens,
            "repeats": cfg.repeats,
            "k": cfg.k,
            "split": list(split),
            "prompt": cfg.prompt,
            "threads": cfg.threads,
            "device_edge_mbps": [UPLINK_MBPS, DOWNLINK_MBPS],
            "edge_cloud": "lan",
            "draft": cfg.draft,
            "precheck": cfg.precheck,
        },
        runs=runs,
        goals=check_goals(runs) + ([replan_goal(replan)] if replan else []),
        replan=replan,
        measured="request time, time to first token, tokens, draft acceptance, round trips, per-tier compute; "
        "exit acceptance in this process",
        emulated=(
            "the device-edge link (RTT as swept, "
            f"{UPLINK_MBPS:g}/{DOWNLINK_MBPS:g} Mbit/s up/down) and the edge-cloud link (lan) by the userspace link "
            "emulator; the three tiers are processes on this machine at its own CPU speed"
            + (f"; {REPLAN_EMULATED}" if replan else "")
        ),
        machine={"cores": os.cpu_count(), "load_avg_1min_start": load_start, "load_avg_1min_end": load_end},
        wall_s=round(time.perf_counter() - t_start, 1),
        command=command,
    )
