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
- ``spec-trained-vN-kK`` / ``spec-trained-vN-auto`` (``spec-vN-*`` without a trained exit): the same drafting over
  the model's ``N`` most frequent tokens only (``--draft exit:N``: the exit's head computes N logits, not the whole
  vocabulary's; the counted draft vocabulary of ``aiflow draft vocab``, counted first when none is cached);
- ``spec-draft-auto`` (with ``draft``): a separate draft model on the device (:mod:`aiflow_cli.runtime.drafters`);
- ``spec-precheck-kK`` / ``spec-precheck-auto`` (with ``precheck``): ``spec-kK`` / ``spec-auto`` with the edge
  pre-checking each round's drafts with its own exit (:mod:`aiflow_cli.runtime.precheck`): the cloud verifies
  only the drafts up to the first one the edge's exit rejects (``verified`` per row).

Per (RTT, mode): tokens/s (tokens generated / request time), time to first token, acceptance of the drafts,
tokens per device-edge round trip, whether the output equals the non-speculative split's token for token, and per
tier the compute milliseconds per generated token, and the bound its own measurements put on its speed-up (``bound``:
the device's time per position, the round trip's fixed part, the upstream time per position, the acceptance, the
drafts and expected tokens per round). Beside the runs, :func:`draft_costs` measures in this process what each
draft option costs and how often it is accepted (held-out prompts), and the speed-up it bounds at each RTT.
``quick`` runs fewer modes (``skipped`` says which) and trains or counts nothing (what is not cached is skipped,
with the command that makes it). Measured: times, tokens, acceptance, compute. Emulated: the
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
from functools import partial
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
from aiflow_cli.timing import work_clock

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
#: Tokens of the truncated draft vocabulary of the ``spec-*vN-*`` modes (SmolLM2: 4096 of 49152).
DEFAULT_VOCAB = 4096

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
    vocab: int = DEFAULT_VOCAB
    """Tokens of the truncated draft vocabulary of the ``spec-*vN-*`` modes (0: no such modes)."""
    quick: bool = False
    """Fewer modes (:data:`QUICK_SKIPS`), nothing trained or counted: what is not cached is skipped and said."""

    @classmethod
    def quick_config(cls, **overrides: Any) -> "DecodeConfig":
        base: dict[str, Any] = {
            "rtts_ms": QUICK_RTTS_MS,
            "tokens": 12,
            "repeats": 1,
            "warmup_tokens": 2,
            "replan_requests": 4,
            "quick": True,
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
        if isinstance(self.vocab, bool) or not isinstance(self.vocab, int) or self.vocab < 0:
            raise InputError(
                f"vocab={self.vocab!r}: tokens of the draft vocabulary, a whole number >= 0", param="vocab"
            )


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
    draft_costs: dict[str, Any] = field(default_factory=dict)
    """Per draft option: its costs, acceptance on held-out prompts and the speed-up bound per RTT (:func:`draft_costs`)."""
    draft_vocab: Optional[dict[str, Any]] = None
    """The truncated draft vocabulary of the ``spec-*vN-*`` modes: size, path, counted now or cached; or why none."""
    skipped: list[str] = field(default_factory=list)
    """What this run did not do and why (``quick``: modes left out, an exit or a vocabulary not cached)."""


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
    rounds = sum(r.speculation["rounds"] for r in rs if r.speculation)
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
        "rounds": rounds,
        "drafts_each_round": [g for r in rs if r.speculation for g in r.speculation["drafts_per_round"]],
    }


def row_bound(row: dict[str, Any], split: dict[str, Any]) -> Optional[dict[str, Any]]:
    """What a speculative row's own measurements allow (None for a mode that does not speculate): with ``c`` the
    device's time per position (its blocks + the exit), ``up`` the upstream compute per position, ``fixed`` the
    verify round trip less that compute (the RTT and serialisation), ``g`` its mean drafts per round and ``a``
    its acceptance per draft, a round takes ``(g + 1)(c + up) + fixed`` and emits ``E = 1 + a + ... + a^g``
    tokens (if acceptance were independent per draft); ``max_speedup`` is E tokens in that time against the
    split's measured time per token. Even at ``a = 1`` the speed-up is bounded by ``(g + 1)`` split tokens' time
    over a round's: speculation saves round trips, not the device's compute."""
    from aiflow_cli.runtime.speculate import expected_tokens

    pol = row.get("policy") or {}
    if not row.get("rounds") or pol.get("draft_ms_per_position") is None:
        return None
    c, up, fixed = pol["draft_ms_per_position"], pol["upstream_ms_per_position"] or 0.0, pol["fixed_ms"] or 0.0
    g = row["drafted"] / row["rounds"]
    a = row["acceptance"] or 0.0
    each = row.get("drafts_each_round") or [round(g)]  # the rounds as they ran (auto varies g): means over them
    e = statistics.fmean(expected_tokens(a, k) for k in each)
    round_ms = statistics.fmean((k + 1) * (c + up) + fixed for k in each)
    split_ms = split["total_ms"] / max(split["tokens"], 1)
    return {
        "c_ms": c,
        "upstream_ms_per_position": up,
        "fixed_ms": fixed,
        "rtt_ms": row["rtt_ms"],
        "acceptance": a,
        "drafts_per_round": round(g, 2),
        "expected_tokens_per_round": round(e, 3),
        "measured_tokens_per_round": round((row["tokens"] - 1) * row["requests"] / row["rounds"], 3),
        "round_ms": round(round_ms, 1),
        "split_ms_per_token": round(split_ms, 1),
        "max_speedup": round(e * split_ms / round_ms, 3),
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
    if cfg.quick:
        return {
            "exit_layer": layer,
            "path": None,
            "why": f"none cached, and a quick run trains none: train it with `aiflow draft train` ({cfg.model}, exit "
            f"layer {layer}; minutes), then re-run",
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


def _draft_vocab(cfg: DecodeConfig, model: StagedModel, progress: Progress) -> Optional[dict[str, Any]]:
    """The truncated draft vocabulary of the ``spec-*vN-*`` modes: the cached one, else counted now (timed apart;
    not in ``quick``); None when ``cfg.vocab`` is 0."""
    from aiflow_cli.models.exit_adapter import build_vocab, find_vocab, vocab_path

    if not cfg.vocab:
        return None
    v = int(model.adapter.config.vocab_size)
    if cfg.vocab >= v:
        return {"size": cfg.vocab, "path": None, "why": f"{cfg.vocab} tokens is not fewer than the vocabulary ({v})"}
    found = find_vocab(model.model_hash)
    if found is not None:
        return {"size": cfg.vocab, "path": str(vocab_path(model.model_hash)), "counted_now": False, **found.meta}
    if cfg.quick:
        return {
            "size": cfg.vocab,
            "path": None,
            "why": f"none cached, and a quick run counts none: count it with `aiflow draft vocab {cfg.model}` (about "
            "a minute), then re-run",
        }
    progress(f"counting the draft vocabulary of {cfg.model} (as `aiflow draft vocab` does)")
    found, path, seconds = build_vocab(cfg.model, progress=progress)
    torch.set_num_threads(cfg.threads)
    return {"size": cfg.vocab, "path": str(path), "counted_now": True, "count_s": seconds, **found.meta}


#: Modes ``quick`` leaves out (``K``: the fixed number of drafts): the untrained exit's, and auto on the whole
#: vocabulary (the truncated auto mode is kept).
QUICK_SKIPS = ("spec-kK", "spec-auto", "spec-trained-auto", "spec-vN-kK")


def spec_modes(cfg: DecodeConfig, trained: bool, vocab: bool) -> tuple[list[tuple[str, Any, str, bool]], list[str]]:
    """The speculative modes to run, as (name, K or auto, draft=, pre-check), and the names ``quick`` skips."""
    k, n = cfg.k, cfg.vocab
    modes: list[tuple[str, Any, str, bool]] = [
        (f"spec-k{k}", k, "untrained", False),
        ("spec-auto", "auto", "untrained", False),
    ]
    if trained:
        modes += [(f"spec-trained-k{k}", k, "exit", False), ("spec-trained-auto", "auto", "exit", False)]
    if vocab:
        kind, label = ("exit", "spec-trained") if trained else ("untrained", "spec")
        modes += [(f"{label}-v{n}-k{k}", k, f"{kind}:{n}", False), (f"{label}-v{n}-auto", "auto", f"{kind}:{n}", False)]
    if cfg.draft:
        modes.append(("spec-draft-auto", "auto", cfg.draft, False))
    if cfg.precheck:
        modes += [(f"spec-precheck-k{k}", k, "untrained", True), ("spec-precheck-auto", "auto", "untrained", True)]
    if not cfg.quick:
        return modes, []
    skip = {q.replace("K", str(k)).replace("N", str(n)) for q in QUICK_SKIPS}
    if not trained:  # nothing better to keep: the untrained exit's modes stay
        skip -= {f"spec-k{k}", "spec-auto"}
    return [m for m in modes if m[0] not in skip], [m[0] for m in modes if m[0] in skip]


def _costs(cfg: DecodeConfig, full: StagedModel, device_end: int) -> dict[str, Any]:
    """:func:`draft_costs` of the bench's device on the held-out calibration prompts (``quick``: 2 of them, 16
    tokens each), or why not."""
    from aiflow_cli.models.exit_adapter import HELD_OUT
    from aiflow_cli.profile.calibration import load_calibration

    if full.stages[device_end - 1].kind != "block":
        return {"why": "the device's last stage is not a block: no exit"}
    prompts = list(load_calibration().prompts[-HELD_OUT:])
    if cfg.quick:
        prompts, tokens, steps = prompts[:2], 16, 5
    else:
        tokens, steps = 32, COST_STEPS
    return draft_costs(full, device_end, prompts, tokens, cfg.rtts_ms, (cfg.vocab,) if cfg.vocab else (), steps)


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
    exit_training = _trained_exit(cfg, model, split[0], progress) if cfg.trained else None
    vocab = _draft_vocab(cfg, model, progress)
    trained, has_vocab = bool(exit_training and exit_training.get("path")), bool(vocab and vocab.get("path"))
    modes_to_run, skipped_modes = spec_modes(cfg, trained, has_vocab)
    skipped = [f"--quick: modes {', '.join(skipped_modes)}"] if skipped_modes else []
    skipped += [f"trained-exit modes: {exit_training['why']}"] if exit_training and not trained else []
    skipped += [f"truncated-vocabulary modes: {vocab['why']}"] if vocab and not has_vocab else []
    for line in skipped:
        progress(f"skipped: {line}")
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
        progress(
            "starting edge and cloud ("
            + "; ".join(f"{k} {p.summary()}" for k, p in plans.items())
            + "); meanwhile measuring the exits' acceptance in this process (every stage loaded)"
        )
        with ThreadPoolExecutor(len(clusters)) as pool:  # both placements' servers start at once, beside the costs
            started = [pool.submit(c.start) for c in clusters.values()]
            full = load_stages(cfg.model)
            exits = sorted({*range(4, n - 1, 4), split[0] - 1, n - 3})
            acceptance = exit_acceptance(full, full.prepare(text=cfg.prompt), exits, cfg.tokens)
            for f in started:
                f.result()
        progress("timing the draft options in this process (the servers idle)")
        costs = _costs(cfg, full, split[0])  # after the start: its timings do not share the CPU with it
        del full
        timeout_s = 60.0 + cfg.tokens * (10 + max(cfg.rtts_ms) / 1e3 * 4)
        modes = [
            _Mode(
                "cloud-only",
                stack.enter_context(clusters["cloud-only"].pipeline(timeout_s=timeout_s)),
                clusters["cloud-only"],
            ),
            _Mode("split", stack.enter_context(clusters["split"].pipeline(timeout_s=timeout_s)), clusters["split"]),
        ]
        for name, k, draft, precheck in modes_to_run:
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
            split_row = next(r for r in runs if r["rtt_ms"] == rtt and r["mode"] == "split")
            for row in runs:
                if row["rtt_ms"] == rtt and row["mode"].startswith("spec-"):
                    row["bound"] = row_bound(row, split_row)
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
            "vocab": cfg.vocab,
            "quick": cfg.quick,
        },
        runs=runs,
        goals=check_goals(runs) + ([replan_goal(replan)] if replan else []),
        replan=replan,
        draft_costs=costs,
        draft_vocab=vocab,
        skipped=skipped,
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


# -- what a draft costs and how often it is accepted: the bound on speculation's speed-up ------------------------
#: Truncated draft vocabularies the cost table measures (when the model has a counted one).
COST_VOCABS = (DEFAULT_VOCAB, 2 * DEFAULT_VOCAB)
#: Decode steps timed per cost (median), and the positions of the batched (verification) timing.
COST_STEPS = 12
BATCH = 5


@dataclass
class RoundCost:
    """Costs (ms) of a speculation round on one drafting option: ``seq`` per position run one at a time by the
    device (its blocks up to the exit), ``draft`` what a draft adds (the exit's head, an adapter), ``batch1`` /
    ``batch_n`` the stages run once per round on all positions at once (the device's blocks after an earlier
    exit, then the upstream tiers) for 1 and :data:`BATCH` positions (linear between and past)."""

    seq: float
    draft: float
    batch1: float
    batch_n: float

    def batched(self, positions: int) -> float:
        return self.batch1 + (positions - 1) * (self.batch_n - self.batch1) / (BATCH - 1)

    def round_ms(self, g: int, rtt_ms: float) -> float:
        return (g + 1) * self.seq + g * self.draft + self.batched(g + 1) + rtt_ms

    def bound(self, alpha: float, rtt_ms: float) -> tuple[float, int, float]:
        """(speed-up over the non-speculative split, drafts per round, expected tokens per round) at the best
        number of drafts: a round of ``g`` drafts emits ``1 + alpha + ... + alpha^g`` tokens in
        :meth:`round_ms`; the split pays ``seq + batch1 + RTT`` per token."""
        from aiflow_cli.runtime.speculate import AUTO_MAX, expected_tokens

        split = self.seq + self.batch1 + rtt_ms
        g = max(range(AUTO_MAX + 1), key=lambda g: expected_tokens(alpha, g) / self.round_ms(g, rtt_ms))
        e = expected_tokens(alpha, g)
        return e * split / self.round_ms(g, rtt_ms), g, e

    def rtt_for(self, alpha: float, speedup: float = GOAL_SPEEDUP, top_ms: float = 1e5) -> Optional[float]:
        """The least RTT (ms, to 1 %) at which :meth:`bound` reaches ``speedup``; None when not below ``top_ms``
        (the bound grows with the RTT towards the expected tokens per round)."""
        if self.bound(alpha, top_ms)[0] < speedup:
            return None
        lo, hi = 0.0, top_ms
        while hi - lo > max(0.5, 0.01 * hi):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.bound(alpha, mid)[0] < speedup else (lo, mid)
        return hi


def _median_ms(fn: Callable[[], Any], steps: int = COST_STEPS) -> float:
    """Median of ``steps`` calls after a warm one, on :func:`~aiflow_cli.timing.work_clock` (the thread's CPU time
    with one torch thread: what the work costs, whatever else the machine is running)."""
    clock = work_clock()
    fn()  # warm
    ts = []
    for _ in range(steps):
        t = clock()
        fn()
        ts.append((clock() - t) * 1e3)
    return statistics.median(ts)


@torch.inference_mode()
def draft_costs(
    full: StagedModel,
    device_end: int,
    prompts: list[str],
    tokens: int,
    rtts_ms: tuple[float, ...],
    vocabs: tuple[int, ...] = COST_VOCABS,
    steps: int = COST_STEPS,
) -> dict[str, Any]:
    """Per draft option of a device holding stages ``[0:device_end)`` of ``full`` (every stage loaded, this
    process, its torch threads): the costs of a round (:class:`RoundCost`: decode steps with a KV cache, one
    position and :data:`BATCH` at once), the teacher-forced greedy acceptance of the drafts on ``prompts`` (each
    continued ``tokens`` tokens by the full model) and the speed-up bound at each RTT. Options: the exit after
    the device's last block through the whole head, a truncated head (the counted draft vocabulary), a trained
    adapter; and earlier exits of the device's blocks (measured, not run by the bench: their verification has the
    device run its blocks after the exit on the round's positions in one pass)."""
    from aiflow_cli.models.exit_adapter import find_exit, find_vocab
    from aiflow_cli.models.quantized import int8_copy
    from aiflow_cli.runtime.drafters import ExitDrafter, device_exit_layer

    head = full.num_stages - 1
    adapter = find_exit(full.model_hash, device_exit_layer(full, device_end))
    counted = find_vocab(full.model_hash)
    subsets = {n: counted.subset(n) for n in vocabs if counted is not None and n < counted.ranking.numel()}
    blocks = [i for i in range(device_end) if full.stages[i].kind == "block"]
    early = sorted({blocks[max(0, int(len(blocks) * f) - 1)] for f in (0.5, 0.75)} - {device_end - 1})
    # teacher-forced hidden states at each exit on the full model's greedy continuations
    hs: dict[int, list[torch.Tensor]] = {}
    want: list[torch.Tensor] = []
    seqs: list[torch.Tensor] = []
    for text in prompts:
        x = full.prepare(text=text)
        gen = full.generate(x, tokens)
        seq = torch.cat([x["input_ids"], gen], dim=1)
        p = x["input_ids"].shape[1]
        state: Any = {
            "input_ids": seq,
            "attention_mask": torch.ones_like(seq),
            "position_ids": torch.arange(seq.shape[1]).unsqueeze(0),
        }
        for i in range(device_end):
            state = full.run_stage(i, state)
            if i in early or i == device_end - 1:
                hs.setdefault(i, []).append(state["hidden_states"][:, p - 1 : p - 1 + gen.shape[1]])
        want.append(gen[0])
        seqs.append(seq)
    target = torch.cat(want)

    def acceptance(stage: int, drafter: ExitDrafter) -> float:
        guess = []
        for h in hs[stage]:
            for j in range(h.shape[1]):  # one position at a time, as the drafter runs
                logits, ids = drafter.logits(full, h[:, j : j + 1])
                i = int(logits.argmax(-1))
                guess.append(i if ids is None else int(ids[i]))
        return float((torch.tensor(guess) == target).float().mean())

    # timings: decode steps after the first prompt (KV cache cropped back after each)
    x = full.prepare(text=prompts[0])
    plen = int(x["input_ids"].shape[1])
    cache = full.new_cache()
    full.run(x, range(head), cache)
    toks = [int(t) for t in target[:BATCH]]
    one = full.next_inputs(x, torch.tensor(toks[:1]))
    many = [one]
    for t in toks[1:]:
        many.append(full.next_inputs(many[-1], torch.tensor([t])))
    from aiflow_cli.runtime.speculate import join_positions

    batch = join_positions(many)
    clock = work_clock(str(full.device))

    def stages_ms(lo: int, hi: int, inputs: Any, m: StagedModel = full, kv: Any = cache) -> float:
        """Stages [lo:hi) of ``m`` on ``inputs`` (the embed stage's input; the stages before lo are run untimed),
        its KV cache ``kv`` cropped back to the prompt after each."""

        def go() -> None:
            s = m.run(inputs, range(0, lo), kv) if lo else inputs
            t = clock()
            m.run(s, range(lo, hi), kv)
            go.ms = (clock() - t) * 1e3  # type: ignore[attr-defined]
            kv.crop(plen)

        go()
        ts = []
        for _ in range(steps):
            go()
            ts.append(go.ms)  # type: ignore[attr-defined]
        return statistics.median(ts)

    up1, up_n = stages_ms(device_end, head + 1, one), stages_ms(device_end, head + 1, batch)
    h1 = hs[device_end - 1][0][:, :1]
    options: list[dict[str, Any]] = []

    def add(name: str, stage: int, drafter: ExitDrafter, cost: RoundCost, run: bool) -> None:
        add_option(name, stage, cost, run, acceptance(stage, drafter))

    def add_option(name: str, stage: int, cost: RoundCost, run: bool, alpha: float) -> None:
        bounds = {}
        for rtt in rtts_ms:
            x_, g, e = cost.bound(alpha, rtt)
            bounds[f"{rtt:g}"] = {"speedup": round(x_, 3), "drafts": g, "expected_tokens": round(e, 3)}
        rtt2 = cost.rtt_for(alpha)
        options.append(
            {"option": name, "exit_stage": stage, "run_by_bench": run, "acceptance": round(alpha, 4)}
            | {k: round(v, 3) for k, v in vars(cost).items()}
            | {"bound": bounds, "rtt_ms_for_goal": None if rtt2 is None else round(rtt2)}
        )

    c_pos = stages_ms(0, device_end, one)
    for kind, a in (("untrained", None), ("exit", adapter)):
        if kind == "exit" and a is None:
            continue
        for n, ids in [(None, None), *subsets.items()]:
            d = ExitDrafter(a, ids)
            cost = RoundCost(c_pos, _median_ms(partial(d.logits, full, h1), steps), up1, up_n)
            add(kind if n is None else f"{kind}:{n}", device_end - 1, d, cost, n is None or n == vocabs[0])
    ids = subsets.get(vocabs[0]) if vocabs else None
    for stage in early:
        d = ExitDrafter(None, ids)
        cost = RoundCost(
            stages_ms(0, stage + 1, one),
            _median_ms(partial(d.logits, full, h1), steps),
            stages_ms(stage + 1, device_end, one) + up1,
            stages_ms(stage + 1, device_end, batch) + up_n,
        )
        add(f"early-exit-stage{stage}" + (f":{ids.numel()}" if ids is not None else ""), stage, d, cost, False)
    if full.device.type == "cpu":
        # the target's own int8 copy as a draft model: it drafts all g tokens one position at a time (seq 0,
        # draft = its step), then the device runs its stages on the round's positions in one pass (batch)
        q = int8_copy(full)
        qcache = q.new_cache()
        q.run(x, range(head), qcache)
        cost = RoundCost(
            0.0,
            stages_ms(0, head + 1, one, q, qcache),
            stages_ms(0, device_end, one) + up1,
            stages_ms(0, device_end, batch) + up_n,
        )
        add_option("int8", -1, cost, False, _model_acceptance(q, seqs, want))
    return {
        "device_ms_per_position": round(c_pos, 3),
        "upstream_ms": {"1": round(up1, 3), str(BATCH): round(up_n, 3)},
        "positions": int(target.numel()),
        "prompts": len(prompts),
        "vocab": None if counted is None else counted.meta,
        "options": options,
        "how": f"decode steps with a KV cache timed in this process (median of {steps}; "
        f"{'thread CPU time' if clock is time.thread_time else 'wall time'}): the device's blocks one "
        "position "
        f"at a time (seq), the exit head (draft), the stages run once per round on 1 and {BATCH} positions "
        "(batch1, batch_n); acceptance teacher-forced on the full model's greedy continuations; bound = "
        "E(alpha, g) (seq + batch1 + RTT) / ((g + 1) seq + g draft + batch(g + 1) + RTT) at the best g, "
        "E = 1 + alpha + ... + alpha^g",
    }


def _model_acceptance(draft: StagedModel, seqs: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Teacher-forced greedy agreement of a draft model with ``want`` (each the last tokens of its ``seqs``), fed
    as it drafts: the prompt in one pass, then one position at a time with its KV cache."""
    hits = total = 0
    for seq, gen in zip(seqs, want):
        p = seq.shape[1] - gen.numel()
        kv = draft.new_cache()
        for j in range(p - 1, seq.shape[1] - 1):
            lo = 0 if j == p - 1 else j
            state = {
                "input_ids": seq[:, lo : j + 1],
                "attention_mask": torch.ones(1, j + 1, dtype=torch.long),
                "position_ids": torch.arange(lo, j + 1).unsqueeze(0),
            }
            guess = int(draft.output(draft.run(state, range(draft.num_stages), kv))[0, -1].argmax())
            hits, total = hits + (guess == int(gen[j - p + 1])), total + 1
    return hits / max(total, 1)


def describe_costs(c: dict[str, Any]) -> list[str]:
    """:func:`draft_costs` as lines: per option its acceptance, costs and the speed-up bound per RTT."""
    out = [
        f"draft options (device {c['device_ms_per_position']:.1f} ms/position, upstream "
        + ", ".join(f"{v:.1f} ms for {k} position(s)" for k, v in c["upstream_ms"].items())
        + f"; acceptance over {c['positions']} held-out positions):"
    ]
    for o in c["options"]:
        b = "; ".join(
            f"RTT {r} ms: <= {v['speedup']:.2f}x (g={v['drafts']}, E={v['expected_tokens']:.2f} tok/round)"
            for r, v in o["bound"].items()
        )
        out.append(
            f"  {o['option']:<24} accept {o['acceptance']:.1%}  seq {o['seq']:.1f} + draft {o['draft']:.2f} ms; "
            f"batch {o['batch1']:.1f}/{o['batch_n']:.1f} ms; {b}; {GOAL_SPEEDUP:g}x from RTT "
            + (f"{o['rtt_ms_for_goal']} ms" if o.get("rtt_ms_for_goal") is not None else "never (< 100 s)")
            + ("" if o["run_by_bench"] else " (not run)")
        )
    out.append(f"  ({c['how']})")
    return out


def describe_bounds(report: "DecodeReport") -> list[str]:
    """The lines ``aiflow bench decode`` prints after its table: why each speculative row got the speed-up it got
    (its measured bound), the draft options' costs and bounds, the vocabulary and what was skipped."""
    out = []
    for r in report.runs:
        b = r.get("bound")
        if b:
            out.append(
                f"{r['mode']} at {r['rtt_ms']:g} ms: c {b['c_ms']:.1f} ms/position on the device, upstream "
                f"{b['upstream_ms_per_position']:.1f} ms/position, round trip's fixed part {b['fixed_ms']:.0f} ms, "
                f"acceptance {b['acceptance']:.0%}, {b['drafts_per_round']:.1f} drafts/round -> E "
                f"{b['expected_tokens_per_round']:.2f} tokens/round (measured {b['measured_tokens_per_round']:.2f}); "
                f"round {b['round_ms']:.0f} ms vs split {b['split_ms_per_token']:.0f} ms/token: bound "
                f"{b['max_speedup']:.2f}x"
            )
    if report.draft_costs.get("options"):
        out += describe_costs(report.draft_costs)
    elif report.draft_costs:
        out.append(f"draft options not measured: {report.draft_costs.get('why')}")
    v = report.draft_vocab
    if v and v.get("path"):
        cover = v.get("held_out_coverage", {}).get(str(v["size"]))
        out.append(
            f"draft vocabulary: the {v['size']} most frequent of {v['vocab_size']} tokens"
            + (f" (held-out greedy tokens inside: {cover:.1%})" if cover is not None else "")
            + (f", counted in this run in {v['count_s']:.0f} s" if v.get("counted_now") else ", cached")
            + f" ({v['path']})"
        )
    out += [f"skipped: {s}" for s in report.skipped]
    return out
