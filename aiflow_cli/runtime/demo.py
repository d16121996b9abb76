"""`aiflow demo`: the whole story on one machine, offline, in one command.

keygen for three nodes -> the runtime's fixed costs (calibrated once per machine) -> profile the model (cached
per model hash) -> plan every strategy of :mod:`aiflow_cli.plan.strategies` for the chosen tiers and links ->
for each placement, cloud and edge as real subprocesses behind link emulators on loopback, the device in this
process: one cold request (connections opened), one warm-up, then warm requests timed -> agreement with the
monolithic model.

Tiers: a weak device, the edge and a fast cloud (default 0.25x, 1x and 4x this CPU; chosen so that the demo
finishes in a few minutes on 2 cores: the device is stretched by dilation / speed = 16x, and a device-only
request of the real LLM costs about 16x its CPU time in real time). Speeds above this CPU's are
emulated by time dilation (:mod:`aiflow_cli.runtime.dilation`): with ``D`` = the fastest speed, the cloud runs
at this CPU's real speed, the others are stretched, links are slowed by ``D``, and every time reported is the
measured time divided by ``D``. The cloud's speed is an assumption (:data:`CLOUD_SPEED_NOTE`), not a
measurement: no GPU was available to profile.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from aiflow_cli.errors import PlanError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.models import load_model, load_stages
from aiflow_cli.plan.problem import Overheads
from aiflow_cli.plan.schema import Plan, save_plan
from aiflow_cli.plan.strategies import OPTIMAL, STRATEGIES, solve_strategies
from aiflow_cli.profile import load_profile, profile_model, save_profile
from aiflow_cli.profile.schema import ModelProfile
from aiflow_cli.runtime.calibrate import calibrate
from aiflow_cli.runtime.cluster import LocalCluster, device_pipeline, identities
from aiflow_cli.runtime.dilation import Dilation, TierSpeeds
from aiflow_cli.runtime.pipeline import Pipeline, RunResult
from aiflow_cli.task import generates, takes_image

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample.jpg"
SAMPLE_TEXT = "AI flow splits one model across device, edge and cloud"
SAMPLE_PROMPT = "What is the capital of France?"
DEFAULT_MODEL = "smollm2"
#: Fidelity in the demo's and the benchmark's profile: the first items of the calibration set, every few cuts
#: (every cut and all items would take most of an hour for the LLM on 2 cores; a plan's codecs are still
#: verified end to end before it is accepted, docs/planner.md).
PROFILE_FIDELITY = {"calibration_items": 4, "calibration_tokens": 8, "fidelity_cuts": "every:4"}
#: Bumped when what a cached profile measures changes (2: stage times in thread CPU time, bench/common.py; 3:
#: profile schema 3, stage 0 input.prepare and the raw input's boundary).
PROFILE_CACHE_VERSION = 3
#: Untimed warm requests after the cold one (connections are up by then; oneDNN has seen the shapes).
WARMUP_REQUESTS = 1
CLOUD_SPEED_NOTE = (
    "assumed, not measured (no GPU here): a datacenter GPU decoding a ~100M-parameter model at batch 1 is bound "
    "by kernel launches, not arithmetic, so it is taken conservatively as a few times one core of this CPU "
    "(README: where the figure comes from)"
)


@dataclass
class DemoConfig(TierSpeeds):
    model: str = DEFAULT_MODEL
    uplink: str = "lte"
    wan: str = "wan"
    device_speed: float = 0.25
    edge_speed: float = 1.0
    cloud_speed: float = 4.0
    headroom: float = 1.0
    """Extra dilation (>= 1): every tier, the fastest included, stretched at least this much (loaded machines)."""
    max_new_tokens: int = 8
    """smollm2 answers the default prompt in 8 tokens (its end-of-sequence token included)."""
    repeats: int = 3
    """Warm requests timed per placement (the median is reported)."""
    min_fidelity: Optional[float] = 0.99
    workdir: Path = field(default_factory=lambda: Path.home() / ".cache" / "aiflow" / "demo")
    input_path: Optional[Path] = None
    text: Optional[str] = None
    threads: int = 1
    """torch threads of every tier (and of the profile): three tiers share this machine's cores."""
    private: bool = True
    """For language models, also measure the split that keeps the prompt on the device, with and without the
    device drafting (:func:`private_runs`)."""


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def profile_cache_dir() -> Path:
    """Where the demo and the benchmark keep this machine's profiles: ``$AIFLOW_CACHE_DIR/profiles`` (default
    ``~/.cache/aiflow/profiles``), shared, so that a model is profiled once for both."""
    return Path(os.environ.get("AIFLOW_CACHE_DIR", Path.home() / ".cache" / "aiflow")) / "profiles"


def cached_profile(
    model: str, log: Callable[[str], None], inputs: Optional[dict[str, Any]] = None, max_new_tokens: int = 0
) -> ModelProfile:
    """This machine's profile of ``model`` at the current torch thread count, measured once per model hash,
    thread count and request shape and kept in :func:`profile_cache_dir`. For a text request (``inputs``), the
    prefill is profiled at the prompt's length and the decode step at the KV length half-way through the
    ``max_new_tokens`` generated: prefill time grows with the prompt, so a profile at another length would
    mispredict it."""
    stages = load_stages(model, [])
    seq_len = decode_tokens = None
    if inputs and "text" in inputs:
        seq_len = int(stages.prepare(text=inputs["text"])["input_ids"].shape[1])
        if stages.generates:
            decode_tokens = seq_len + max(max_new_tokens // 2, 1)
    shape = "" if seq_len is None else f"-s{seq_len}" + ("" if decode_tokens is None else f"d{decode_tokens}")
    path = profile_cache_dir() / (
        f"{_safe(model)}-{stages.model_hash[:12]}-t{torch.get_num_threads()}{shape}-v{PROFILE_CACHE_VERSION}.json"
    )
    if path.is_file():
        log(f"profile: cached {path}")
        return load_profile(str(path))
    log(f"profile: measuring {model} on this CPU (once; cached in {path.parent})")
    prof = profile_model(
        model, repeats=3, label="this-cpu", seq_len=seq_len, decode_tokens=decode_tokens, **PROFILE_FIDELITY
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, path)
    return prof


def request_input(task: str, cfg: DemoConfig) -> dict[str, Any]:
    """The demo's request: the image file's path (uploaded as is when the device computes nothing), or text."""
    if takes_image(task):
        return {"image": Path(cfg.input_path or SAMPLE_IMAGE)}
    return {"text": cfg.text or (SAMPLE_PROMPT if task == "generate" else SAMPLE_TEXT)}


def upload_bytes(inputs: dict[str, Any]) -> Optional[int]:
    """Upload size of a request's raw input when it is a file (None: use the profile's figure)."""
    image = inputs.get("image")
    return Path(image).stat().st_size if isinstance(image, (str, Path)) else None


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of generated positions where two token sequences agree (a sequence that stopped early at its
    end-of-sequence token disagrees at every position it did not generate)."""
    n = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t, (0, n - t.shape[1]), value=-1) for t in (a, b))
    return float((a == b).float().mean())


def placement_key(plan: Plan) -> tuple:
    """What the runtime does with a plan: the stage range of each tier and the codec of each cut."""
    return (tuple((t.name, t.start, t.end) for t in plan.tiers), tuple((c.after_stage, c.codec) for c in plan.cuts))


def runs_locally(plan: Plan) -> bool:
    return not plan.tiers_behind(plan.tiers[0].name)


def device_drives(plan: Plan, decode_start: int) -> bool:
    """Whether the device runs the first decode stage (``decode_start``), so it has the first token before the
    request ends (:class:`aiflow_cli.runtime.node.TierNode` drives generation from there)."""
    dev = plan.tiers[0]
    return plan.prediction.tokens > 0 and dev.start <= decode_start < dev.end


def predicted_ttft_ms(plan: Plan, decode_start: int) -> float:
    """Time to the first token: the prefill when the device drives generation, else the whole request (the
    tokens come back together)."""
    p = plan.prediction
    return p.prefill_ms if device_drives(plan, decode_start) else p.total_ms


def predicted_ms(plan: Plan, tokens: Optional[int] = None) -> float:
    """The plan's prediction of a warm request that generated ``tokens`` tokens (a model may stop at its
    end-of-sequence token before the number planned for): the prefill and ``tokens - 1`` decode steps."""
    p = plan.prediction
    if not p.tokens or tokens is None:
        return p.total_ms
    return p.prefill_ms + max(tokens - 1, 0) * p.per_token_ms


def predicted_cold_ms(plan: Plan, tokens: Optional[int] = None) -> float:
    """The first request on new connections: the warm request plus each connection's set-up."""
    return predicted_ms(plan, tokens) + sum(plan.prediction.handshake_ms.values())


@dataclass
class Timed:
    """One request as reported (emulated ms: divided by the dilation) and its time to first token."""

    result: RunResult
    ttft_ms: float


def timed_request(p: Pipeline, inputs: dict[str, Any], n: Optional[int], dilation: Dilation) -> Timed:
    p.node.first_token_at = None
    r = p.run(**inputs, max_new_tokens=n)
    end = time.perf_counter()
    first = p.node.first_token_at
    ttft = r.total_ms - (end - first) * 1e3 if first is not None and n and n > 1 else r.total_ms
    return Timed(dilation.result(r), dilation.ms(ttft))


@dataclass
class PlacementRun:
    """A placement measured: the cold first request, then warm requests."""

    plan: Plan
    cold: Timed
    warm: list[Timed]
    tiers: list[dict[str, Any]]

    @property
    def median(self) -> Timed:
        order = sorted(self.warm, key=lambda t: t.result.total_ms)
        return order[len(order) // 2]

    @property
    def warm_ms(self) -> float:
        return float(statistics.median(t.result.total_ms for t in self.warm))


def run_placement(
    name: str,
    plan: Plan,
    cfg: DemoConfig,
    inputs: dict[str, Any],
    links: dict[str, LinkProfile],
    log: Callable[[str], None],
    speculate: Sequence[Optional[str]] = (None,),
) -> list[PlacementRun]:
    """Starts the tiers ``plan`` needs (none when the device runs every stage) once, and measures one device per
    entry of ``speculate`` on them, one after the other (None: one round trip per token; ``"auto"``: the device
    drafts, :mod:`aiflow_cli.runtime.speculate`). Each device opens its own connections: one cold request, one
    warm-up and ``cfg.repeats`` warm requests."""
    d = cfg.dilation
    plan_path = cfg.workdir / "plans" / f"{_safe(name)}.json"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    save_plan(plan, plan_path)
    n = cfg.max_new_tokens if generates(plan.task) else None
    timeout_s = max(120.0, 20 * d.factor * predicted_cold_ms(plan) / 1e3)

    def measure(p: Pipeline, tiers: Callable[[], list[dict[str, Any]]]) -> PlacementRun:
        cold = timed_request(p, inputs, n, d)
        for _ in range(WARMUP_REQUESTS if p.node.next is not None else 0):  # the cold request warmed a local one
            p.run(**inputs, max_new_tokens=n)
        warm = [timed_request(p, inputs, n, d) for _ in range(cfg.repeats)]
        return PlacementRun(plan, cold, warm, tiers())

    if runs_locally(plan):
        log(f"{name}: the device runs every stage ({d.factor / cfg.device_speed:g}x stretched)")
        out = []
        for k in speculate:
            with device_pipeline(
                plan, cfg.workdir, speed=cfg.device_speed, dilation=d.factor, timeout_s=timeout_s, speculate=k
            ) as p:
                out.append(measure(p, lambda: [p.node.describe()]))
        return out
    log(f"{name}: starting edge and cloud for {plan.summary()}")
    with LocalCluster(
        plan_path, cfg.workdir, links=d.links(links), speeds=cfg.speeds, threads=cfg.threads, dilation=d.factor
    ) as c:
        out = []
        for k in speculate:
            with c.pipeline(timeout_s=timeout_s, speculate=k) as p:
                log(
                    f"{name}{'' if k is None else f' (speculate {k})'}: cold request, warm-up, {cfg.repeats} warm requests"
                )
                out.append(measure(p, p.hello))
        return out


def overheads_for(cfg: DemoConfig, log: Callable[[str], None]) -> Overheads:
    """The calibrated per-message and per-connection costs (every demo link is emulated), under dilation."""
    return calibrate(log=log).overheads(emulated=True, dilation=cfg.dilation.factor)


def _reference(full, inputs: dict[str, Any], n: int):
    raw = full.raw_input(**inputs)  # the raw input, as every strategy's device holds it (stage 0 prepares it)
    if full.generates:
        return full.generate(raw, n)
    return full.output(full.run(raw))


def strategy_entry(
    plan: Plan,
    run: PlacementRun,
    reference: Optional[torch.Tensor],
    floor: Optional[float],
    measured_as: Optional[str],
    decode_start: int,
) -> dict[str, Any]:
    """One strategy of the JSON: measured (emulated ms) beside predicted."""
    m = run.median
    r = m.result
    warm = run.warm_ms
    n = r.tokens.shape[1] if r.tokens is not None else 0
    links = {k: {"up": v.bytes_up, "down": v.bytes_down, "messages": v.messages} for k, v in r.timings.links.items()}
    e: dict[str, Any] = {
        "plan": plan.summary(),
        "measured_as": measured_as,
        "warm_ms": round(warm, 2),
        "samples_ms": [round(t.result.total_ms, 2) for t in run.warm],
        "predicted_ms": round(predicted_ms(plan, n or None), 2),
        "prediction_error": round((predicted_ms(plan, n or None) - warm) / warm, 4),
        "ttft_ms": round(m.ttft_ms, 2),
        "predicted_ttft_ms": round(predicted_ttft_ms(plan, decode_start), 2),
        "tokens_per_s": round(n / (warm / 1e3), 2) if n else None,
        "cold_ms": round(run.cold.result.total_ms, 2),
        "predicted_cold_ms": round(predicted_cold_ms(plan, n or None), 2),
        "links": links,
        "timings": r.timings.to_json(),
        "tiers": run.tiers,
    }
    if r.tokens is not None:
        e["tokens"] = r.tokens.tolist()
        e["text"] = r.text
        if reference is not None:
            e["agreement"] = agreement(r.tokens, reference)
    elif r.output is not None and reference is not None:
        e["agreement"] = float(
            torch.nn.functional.cosine_similarity(r.output.flatten().double(), reference.flatten().double(), dim=0)
        )
    if floor is not None and "agreement" in e:
        e["below_floor"] = e["agreement"] < floor
    return e


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the demo; returns everything it measured (the CLI prints it). Times are emulated ms."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    keys = identities(cfg.workdir)
    log("keys: " + ", ".join(f"{t} {k.fingerprint[:12]}" for t, k in keys.items()))
    overheads = overheads_for(cfg, log)
    full = load_model(cfg.model)
    inputs = request_input(full.task, cfg)
    prof = cached_profile(cfg.model, log, inputs, cfg.max_new_tokens)
    links = {"device-edge": load_link(cfg.uplink), "edge-cloud": load_link(cfg.wan)}
    solved = solve_strategies(
        prof,
        links,
        cfg.speeds,
        tokens=cfg.max_new_tokens,
        input_bytes=upload_bytes(inputs),
        overheads=overheads,
        min_fidelity=cfg.min_fidelity,
    )
    plans = {k: v for k, v in solved.items() if isinstance(v, Plan)}
    if OPTIMAL not in plans:
        err = solved.get(OPTIMAL)
        raise err if isinstance(err, PlanError) else PlanError("no aiflow plan")
    log(
        f"plan ({cfg.uplink} to the edge, {cfg.wan} to the cloud; tiers {cfg.device_speed:g}x / {cfg.edge_speed:g}x "
        f"/ {cfg.cloud_speed:g}x, {cfg.dilation.label()}): {plans[OPTIMAL].summary()}"
    )
    runs: dict[tuple, PlacementRun] = {}
    first: dict[tuple, str] = {}
    for name, plan in plans.items():
        key = placement_key(plan)
        if key not in runs:
            runs[key] = run_placement(name, plan, cfg, inputs, links, log)[0]
            first[key] = name
        else:
            log(f"{name}: same placement as {first[key]} (measured once)")
    reference = _reference(full, inputs, cfg.max_new_tokens)
    out: dict[str, Any] = {
        "model": cfg.model,
        "task": full.task,
        "has_tokenizer": full.has_tokenizer,
        "input": {k: str(v) for k, v in inputs.items()},
        "links": {"device-edge": cfg.uplink, "edge-cloud": cfg.wan},
        "speeds": cfg.speeds,
        "dilation": cfg.dilation.factor,
        "time": "emulated ms: measured / dilation" if cfg.dilation.active else "ms",
        "cloud_speed_note": CLOUD_SPEED_NOTE if cfg.cloud_speed > 1 else "",
        "max_new_tokens": cfg.max_new_tokens,
        "min_fidelity": cfg.min_fidelity,
        "overheads": {
            "message_ms": overheads.message_ms,
            "handshake_ms": overheads.handshake_ms,
            "source": overheads.source,
        },
        "strategies": {},
        "infeasible": {k: str(v) for k, v in solved.items() if not isinstance(v, Plan)},
    }
    for name, plan in plans.items():
        key = placement_key(plan)
        note = None if first[key] == name else f"same placement as {first[key]}"
        out["strategies"][name] = strategy_entry(plan, runs[key], reference, cfg.min_fidelity, note, full.decode_start)
    out["verdict"] = verdict(out["strategies"])
    if cfg.private and full.generates:
        out["private"] = private_runs(cfg, full, prof, links, inputs, overheads, runs, first, reference, log)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


PRIVATE = "private"
PRIVATE_SPEC = "private+spec"


def private_runs(
    cfg: DemoConfig,
    full,
    prof: ModelProfile,
    links: dict[str, LinkProfile],
    inputs: dict[str, Any],
    overheads: Overheads,
    runs: dict[tuple, PlacementRun],
    first: dict[tuple, str],
    reference: Optional[torch.Tensor],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The split that keeps the prompt on the device (the planner's best placement with ``require=device``: the
    device runs a model stage itself, so only activations leave it), measured as it is and with the device
    drafting (``speculate="auto"``); beside the strategies, not in the verdict (a constrained placement, and
    the plan's prediction does not model speculation)."""
    from aiflow_cli.plan.problem import Limits
    from aiflow_cli.plan.solver import solve_variants
    from aiflow_cli.runtime.speculate import unsupported

    solved = solve_variants(
        prof,
        links,
        cfg.speeds,
        {PRIVATE: Limits(require=frozenset({"device"}), min_fidelity=cfg.min_fidelity)},
        tokens=cfg.max_new_tokens,
        overheads=overheads,
        model=full,
    )
    plan = solved[PRIVATE]
    out: dict[str, Any] = {"definition": "the best placement whose device runs a model stage: the prompt stays"}
    why = unsupported(full) or (
        "the device runs every stage: nothing to verify upstream" if runs_locally(plan) else None
    )
    key = placement_key(plan)
    spec_run: Optional[PlacementRun] = None
    if key in runs:
        log(f"{PRIVATE}: same placement as {first[key]} (measured once)")
        run = runs[key]
        note: Optional[str] = f"same placement as {first[key]}"
        if not why:
            spec_run = run_placement(PRIVATE_SPEC, plan, cfg, inputs, links, log, speculate=("auto",))[0]
    else:  # plainly, then drafting: two devices on the same edge and cloud
        run, *drafting = run_placement(
            PRIVATE, plan, cfg, inputs, links, log, speculate=(None,) if why else (None, "auto")
        )
        spec_run = drafting[0] if drafting else None
        note = None
    out[PRIVATE] = strategy_entry(plan, run, reference, cfg.min_fidelity, note, full.decode_start)
    if spec_run is None:
        out[PRIVATE_SPEC] = {"skipped": why}
        return out
    e = strategy_entry(plan, spec_run, reference, cfg.min_fidelity, None, full.decode_start)
    e["speculation"] = spec_run.median.result.speculation
    e["predicted_note"] = "the plan's prediction, without speculation"
    out[PRIVATE_SPEC] = e
    return out


def verdict(strategies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether aiflow measured fastest, or tied within the noise of the warm samples (the larger of 5 % and the
    spread of either run's samples)."""
    a = strategies[OPTIMAL]
    others = {
        k: v for k, v in strategies.items() if k != OPTIMAL and v.get("measured_as") != f"same placement as {OPTIMAL}"
    }
    if not others:
        return {"fastest": True, "detail": "every strategy is the aiflow placement"}
    best_name = min(others, key=lambda k: others[k]["warm_ms"])
    b = others[best_name]
    spread = max(max(v["samples_ms"]) - min(v["samples_ms"]) for v in (a, b))
    tol = max(0.05 * b["warm_ms"], spread)
    ok = a["warm_ms"] <= b["warm_ms"] + tol
    return {
        "fastest": ok,
        "best_other": best_name,
        "aiflow_ms": a["warm_ms"],
        "best_other_ms": b["warm_ms"],
        "tolerance_ms": round(tol, 2),
        "detail": (
            f"aiflow {a['warm_ms']:.0f} ms vs best other ({best_name}) {b['warm_ms']:.0f} ms, "
            f"noise {tol:.0f} ms: " + ("fastest or tied" if ok else "SLOWER: the cost model is wrong")
        ),
    }


STRATEGY_ORDER = [s.name for s in STRATEGIES]
