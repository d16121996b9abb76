"""``aiflow bench e2e``: the whole runtime under emulated links, four strategies side by side in one run.

For one model and a sweep of device-edge link profiles (edge-cloud fixed, ``wan``), each strategy is solved by
the planner on the same profile, then run on the real three-process runtime (:class:`LocalCluster`: edge and
cloud are ``aiflow serve`` subprocesses behind userspace link emulators, the device is this process). The
strategies are those of :mod:`aiflow_cli.plan.strategies`: ``device-only``, ``cloud-only``, ``raw-split`` and
``aiflow`` (under the ``min_fidelity`` floor). Tiers faster than this CPU (``cloud_speed`` > 1) are emulated by
time dilation (:mod:`aiflow_cli.runtime.dilation`); the planner prices the runtime's calibrated fixed costs
(:mod:`aiflow_cli.runtime.calibrate`).

Per (link profile, strategy): end-to-end latency p50/p90 of warm requests (after a cold first request on new
connections, reported apart, and a warm-up), time to first token and tokens/s for generating models, payload
bytes per link, bytes on the emulated wire, fidelity against the monolithic model (token agreement for
generating models, cosine otherwise) and the planner's prediction beside the measurement.
:func:`check_goals` turns the numbers into the issue's goals (pure: unit-tested on synthetic numbers).

Method: runs are grouped by placement (stages per tier + codec per cut); each placement's servers start once
and stay up for the whole run, moving between link profiles by swapping the device-edge emulator on the same
port (:meth:`LocalCluster.set_link`). At each link profile the placements in use are timed in interleaved rounds
(one request each per round, order rotated), so that other load on the machine falls on every strategy alike. A
placement chosen by two strategies at one profile is measured once and reported for both (``measured_as``).
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from aiflow_cli.bench.common import JsonResult
from aiflow_cli.errors import AiflowError, InputError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.models import load_model, load_stages
from aiflow_cli.plan.problem import Overheads
from aiflow_cli.plan.schema import Plan, save_plan
from aiflow_cli.plan.strategies import OPTIMAL, RAW_SPLIT, only, solve_strategies
from aiflow_cli.profile import load_profile
from aiflow_cli.profile.schema import ModelProfile
from aiflow_cli.runtime.calibrate import calibrate
from aiflow_cli.runtime.cluster import LocalCluster, device_pipeline
from aiflow_cli.runtime.demo import (
    SAMPLE_IMAGE,
    SAMPLE_PROMPT,
    SAMPLE_TEXT,
    Timed,
    agreement,
    cached_profile,
    placement_key,
    predicted_cold_ms,
    predicted_ms,
    predicted_ttft_ms,
    runs_locally,
    timed_request,
    upload_bytes,
)
from aiflow_cli.runtime.dilation import Dilation, TierSpeeds
from aiflow_cli.runtime.pipeline import Pipeline, RunResult, predicted
from aiflow_cli.shipped import HARDWARE_DIR
from aiflow_cli.task import takes_image

STRATEGIES = (only("device"), only("cloud"), RAW_SPLIT, OPTIMAL)
BASELINES = STRATEGIES[:3]
DEFAULT_MODEL = "builtin:vit-gpt2-captioner"
#: The real language model, run beside the captioner by default.
LLM_MODEL = "smollm2"
DEFAULT_MODELS = (DEFAULT_MODEL, LLM_MODEL)
#: From a 100 KB/s uplink to a LAN (profiles/links/).
FULL_LINKS = ("100kbps", "thin-uplink", "3g", "lte", "5g", "wifi", "lan")
QUICK_MODEL = "builtin:captioner-tiny"
QUICK_MODELS = (QUICK_MODEL, LLM_MODEL)
QUICK_LINKS = ("100kbps", "lte")
QUICK_TOKENS = 4
#: Untimed requests per configuration before timing: the cold one (connection handshake, first-call paths; its
#: time is reported apart) and warm-ups.
WARMUP_REQUESTS = 2
#: Share of (link, strategy) runs whose prediction must be within the tolerance (the issue's goal).
PREDICTION_SHARE = 0.9
#: Timed requests kept even when the time budget of a configuration has run out.
MIN_SAMPLES = 3

Progress = Callable[[str], None]


@dataclass
class E2EConfig(TierSpeeds):
    """What to run. Times are ms unless named ``_s``; ``device_speed`` is a share of this CPU (0 < x <= 1)."""

    model: str = DEFAULT_MODEL
    link_names: tuple[str, ...] = FULL_LINKS
    """Device-edge link profiles swept (profiles/links/)."""
    wan: str = "wan"
    device_speed: float = 0.25
    edge_speed: float = 1.0
    cloud_speed: float = 1.0
    """Tier speeds as multiples of this CPU; above 1, emulated by time dilation (D = the fastest)."""
    headroom: float = 1.0
    """Extra dilation (>= 1): every tier, the fastest included, stretched at least this much (loaded machines)."""
    repeats: int = 7
    max_new_tokens: int = 16
    min_fidelity: float = 0.99
    """Cosine floor the aiflow plan is solved under, and the floor its measured fidelity is checked against."""
    threads: int = 1
    """torch threads per tier (device, edge and cloud each get this many; they share this machine)."""
    budget_s: float = 60.0
    """Per placement: at a link profile, the interleaved rounds stop once ``budget_s`` x placements have passed
    (keeping at least MIN_SAMPLES rounds)."""
    prediction_tolerance: float = 0.15
    prediction_share: float = PREDICTION_SHARE
    speedup_goal: float = 2.0
    noise_rel: float = 0.05
    """Smallest tolerance of the 'never slower' goal, as a share of the best baseline's p50."""
    image: Optional[Path] = None
    """The image to caption/classify (default: the bundled 224x224 sample JPEG); sent as a file when uploaded."""
    quick: bool = False
    workdir: Path = field(default_factory=lambda: Path.home() / ".cache" / "aiflow" / "bench-e2e")

    @classmethod
    def quick_config(cls, **overrides: Any) -> "E2EConfig":
        """The CI-sized run: a tiny model, two link profiles, few repeats."""
        base = {
            "model": QUICK_MODEL,
            "link_names": QUICK_LINKS,
            "repeats": 4,
            "budget_s": 8.0,
            "quick": True,
            "max_new_tokens": QUICK_TOKENS,
        }
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def check(self) -> None:
        """Refuses settings that cannot run, in one line naming the parameter (the CLI shows its flag)."""
        for tier, v in self.speeds.items():
            if not v > 0:
                raise InputError(
                    f"{tier}_speed={v}: must be > 0 (a multiple of this CPU's speed)", param=f"{tier}_speed"
                )
        checks = [
            ("headroom", self.headroom >= 1, "must be >= 1"),
            ("repeats", self.repeats >= MIN_SAMPLES, f"need at least {MIN_SAMPLES} for p50/p90"),
            ("min_fidelity", 0 < self.min_fidelity <= 1, "a fidelity floor must be in (0, 1]"),
            ("threads", self.threads >= 1, "must be >= 1"),
            ("budget_s", self.budget_s > 0, "must be > 0 seconds"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InputError(f"{name}={getattr(self, name)}: {why}", param=name)
        if not self.link_names:
            raise InputError("`link_names`: give at least one link profile", param="link_names")
        if len(set(self.link_names)) != len(self.link_names):
            raise InputError(f"link_names={','.join(self.link_names)}: a profile is named twice", param="link_names")


# -- measurements -----------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """One configuration measured: latency samples (ms), bytes per request and fidelity."""

    samples_ms: list[float]
    payload_bytes: dict[str, dict[str, int]]
    """link -> {"up", "down"}: the runtime's count of frame bytes per request (what the plan's bytes model)."""
    wire_bytes: dict[str, dict[str, float]]
    """link -> {"up", "down"}: UDP payload bytes through the emulator per request (QUIC, TLS, retransmissions)."""
    fidelity: float
    """Lowest over the timed requests: token agreement (generating models) or cosine with the monolithic model."""
    breakdown: dict[str, Any]
    """Timings of the median request: compute/codec ms per tier, wire ms per link."""
    ttft_ms: list[float] = field(default_factory=list)
    """Time to first token of each timed request (generating models; the whole request when the device does
    not drive the generation, since the tokens then come back together)."""
    cold_ms: Optional[float] = None
    """The first request on new connections (handshakes, first-call paths), not in the samples."""
    tokens: int = 0

    @property
    def p50_ms(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 90))


def fidelity_of(result: RunResult, reference: torch.Tensor) -> float:
    """Token agreement (generated ids) or cosine (output tensor) of one request with the monolithic model."""
    if result.tokens is not None:
        return agreement(result.tokens, reference)
    out = result.output.flatten().double()
    return float(torch.nn.functional.cosine_similarity(out, reference.flatten().double(), dim=0))


def _breakdown(r: RunResult) -> dict[str, Any]:
    t = r.timings
    return {
        "compute_ms": {k: round(v.compute_ms, 2) for k, v in t.tiers.items()},
        "codec_ms": {k: round(v.encode_ms + v.decode_ms, 2) for k, v in t.tiers.items()},
        "wire_ms": {k: round(v.wire_ms, 2) for k, v in t.links.items()},
        "messages": {k: v.messages for k, v in t.links.items()},
    }


class Runner:
    """One placement ready to serve requests: the device pipeline, and (unless the device runs every stage) the
    edge and cloud servers behind their emulators. :meth:`use_link` swaps the device-edge emulator (``link``:
    the profile as planned; the emulator gets it dilated)."""

    def __init__(
        self,
        plan: Plan,
        pipeline: Pipeline,
        cluster: Optional[LocalCluster],
        link: Optional[str],
        dilation: Dilation = Dilation(),
    ):
        self.plan = plan
        self.pipeline = pipeline
        self.cluster = cluster
        self.link = link
        self.dilation = dilation
        self.results: list[RunResult] = []
        self.ttft: list[float] = []
        self.cold_ms: Optional[float] = None
        self.warmed = False
        self._before: dict[str, Any] = {}

    @property
    def local(self) -> bool:
        return self.cluster is None

    def use_link(self, name: str, link: LinkProfile) -> None:
        if self.cluster is not None and name != self.link:
            self.cluster.set_link("device-edge", self.dilation.link(link))
            self.pipeline.close()  # its connection went through the old emulator; the next request reconnects
            self.warmed = False
        self.link = name

    def request(self, inputs: dict[str, Any], max_new_tokens: int) -> Timed:
        """One request, in emulated time (divided by the dilation)."""
        p = self.pipeline
        return timed_request(p, inputs, max_new_tokens if p.node.generates else None, self.dilation)

    def timed(self, inputs: dict[str, Any], max_new_tokens: int) -> None:
        t = self.request(inputs, max_new_tokens)
        self.results.append(t.result)
        self.ttft.append(t.ttft_ms)

    def start_timing(self) -> None:
        self.results = []
        self.ttft = []
        self._before = {k: e.stats() for k, e in (self.cluster.emulators.items() if self.cluster else ())}

    def measurement(self, reference: torch.Tensor) -> Measurement:
        """The timed requests since :meth:`start_timing`, with wire bytes per request from the emulators."""
        results = self.results
        wire: dict[str, dict[str, float]] = {}
        for k, e in self.cluster.emulators.items() if self.cluster else ():
            after, before = e.stats(), self._before[k]
            per_request = {
                d: (after[name]["bytes_in"] - before[name]["bytes_in"]) / len(results)
                for d, name in (("up", "uplink"), ("down", "downlink"))
            }
            if any(per_request.values()):  # a link the plan does not cross stays out
                wire[k] = per_request
        samples = [r.total_ms for r in results]
        median = results[int(np.argsort(samples)[len(samples) // 2])]
        payload = {k: {"up": v.bytes_up, "down": v.bytes_down} for k, v in results[-1].timings.links.items()}
        return Measurement(
            samples_ms=samples,
            payload_bytes=payload,
            wire_bytes=wire,
            fidelity=min(fidelity_of(r, reference) for r in results),
            breakdown=_breakdown(median),
            ttft_ms=list(self.ttft),
            cold_ms=self.cold_ms,
            tokens=int(results[-1].tokens.shape[1]) if results[-1].tokens is not None else 0,
        )


# -- plans ------------------------------------------------------------------------------------------------------
def plan_strategies(
    prof: ModelProfile,
    link: LinkProfile,
    wan: LinkProfile,
    cfg: E2EConfig,
    input_bytes: Optional[int] = None,
    overheads: Optional[Overheads] = None,
) -> dict[str, Plan]:
    """The four strategies' plans for one device-edge link, solved on the same profile, links, speeds and
    overheads. ``input_bytes``: what uploading the request's raw input costs (an image file's size; None: the
    profile's)."""
    plans = solve_strategies(
        prof,
        {"device-edge": link, "edge-cloud": wan},
        cfg.speeds,
        names=list(STRATEGIES),
        tokens=cfg.max_new_tokens,
        input_bytes=input_bytes,
        overheads=overheads,
        min_fidelity=cfg.min_fidelity,
    )
    for plan in plans.values():
        if not isinstance(plan, Plan):
            raise plan
    return plans


def group_runs(plans: dict[str, dict[str, Plan]]) -> dict[tuple, dict[str, list[str]]]:
    """placement -> link profile -> strategies with that placement there (insertion order: profiles, strategies)."""
    groups: dict[tuple, dict[str, list[str]]] = {}
    for link_name, by_strategy in plans.items():
        for strategy, plan in by_strategy.items():
            groups.setdefault(placement_key(plan), {}).setdefault(link_name, []).append(strategy)
    return groups


# -- goals ------------------------------------------------------------------------------------------------------
@dataclass
class Goal:
    name: str
    met: bool
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)


def check_goals(
    rows: dict[str, dict[str, dict[str, float]]],
    *,
    min_fidelity: float,
    speedup_goal: float = 2.0,
    prediction_tolerance: float = 0.15,
    noise_rel: float = 0.05,
    prediction_share: float = PREDICTION_SHARE,
) -> list[Goal]:
    """The issue's goals from measured numbers. ``rows``: link profile -> strategy -> ``{"p50_ms", "p90_ms",
    "predicted_ms", "fidelity"}`` with every strategy of :data:`STRATEGIES` at every profile.

    - *never slower*: at every profile, aiflow's p50 <= best baseline p50 + tolerance, where tolerance =
      max(``noise_rel`` x best p50, the p90 - p50 spread of either): the run's own noise, never a constant;
    - *speedup*: somewhere, best baseline p50 / aiflow p50 >= ``speedup_goal``;
    - *fidelity*: aiflow's fidelity >= ``min_fidelity`` at every profile;
    - *prediction*: |predicted - p50| / p50 <= ``prediction_tolerance`` for at least ``prediction_share`` of the
      (profile, strategy) runs.
    """
    if not rows:
        raise InputError("no measurements to check")
    per_link = []
    for link, row in rows.items():
        a = row["aiflow"]
        base = min(BASELINES, key=lambda s: row[s]["p50_ms"])
        b = row[base]
        tol = max(noise_rel * b["p50_ms"], b["p90_ms"] - b["p50_ms"], a["p90_ms"] - a["p50_ms"])
        per_link.append(
            {
                "link": link,
                "baseline": base,
                "aiflow_p50_ms": a["p50_ms"],
                "baseline_p50_ms": b["p50_ms"],
                "tolerance_ms": tol,
                "ratio": a["p50_ms"] / b["p50_ms"] if b["p50_ms"] > 0 else float("inf"),
                "slower": a["p50_ms"] > b["p50_ms"] + tol,
            }
        )
    failed = [x for x in per_link if x["slower"]]
    w = max(failed or per_link, key=lambda x: x["ratio"])  # the worst failure, else the closest call
    s = min(per_link, key=lambda x: x["ratio"])
    speedup = 1 / s["ratio"] if s["ratio"] > 0 else float("inf")
    goals = [
        Goal(
            "aiflow never slower than the best of strategies 1-3 (within noise)",
            not failed,
            f"{len(failed)} of {len(per_link)} profiles slower; {'worst' if failed else 'closest'} at {w['link']}: "
            f"aiflow {w['aiflow_p50_ms']:.1f} ms vs {w['baseline']} {w['baseline_p50_ms']:.1f} ms (ratio "
            f"{w['ratio']:.2f}, noise tolerance {w['tolerance_ms']:.1f} ms)",
            {"profiles": per_link, "slower_at": [x["link"] for x in failed]},
        ),
        Goal(
            f"aiflow >= {speedup_goal:g}x faster than the best baseline somewhere",
            speedup >= speedup_goal,
            f"best at {s['link']}: {speedup:.2f}x (aiflow {s['aiflow_p50_ms']:.1f} ms vs {s['baseline']} "
            f"{s['baseline_p50_ms']:.1f} ms)",
            {"link": s["link"], "speedup": speedup, "baseline": s["baseline"]},
        ),
    ]
    low_link = min(rows, key=lambda k: rows[k]["aiflow"]["fidelity"])
    low = rows[low_link]["aiflow"]["fidelity"]
    goals.append(
        Goal(
            f"aiflow fidelity >= floor {min_fidelity:g}",
            low >= min_fidelity,
            f"lowest {low:.4f} at {low_link}",
            {"link": low_link, "fidelity": low, "floor": min_fidelity},
        )
    )
    errs = [
        (abs(v["predicted_ms"] - v["p50_ms"]) / v["p50_ms"], link, strat, v)
        for link, row in rows.items()
        for strat, v in row.items()
        if v["p50_ms"] > 0
    ]
    err, link, strat, v = max(errs, key=lambda e: e[0])
    within = sum(e[0] <= prediction_tolerance for e in errs)
    a_err = max((e for e in errs if e[2] == "aiflow"), key=lambda e: e[0])
    goals.append(
        Goal(
            f"prediction within {prediction_tolerance:.0%} of measurement for >= {prediction_share:.0%} of runs",
            within >= prediction_share * len(errs) - 1e-9,
            f"{within}/{len(errs)} runs within; worst {strat} at {link}: predicted {v['predicted_ms']:.1f} ms vs "
            f"measured {v['p50_ms']:.1f} ms ({err:.0%}); aiflow worst {a_err[0]:.0%} at {a_err[1]}",
            {
                "within": within,
                "runs": len(errs),
                "worst_error": err,
                "worst": f"{strat}@{link}",
                "aiflow_worst_error": a_err[0],
                "aiflow_worst_link": a_err[1],
            },
        )
    )
    return goals


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass
class E2EResult(JsonResult):
    """Everything measured; :meth:`to_dict` is what ``--json`` prints."""

    config: dict[str, Any]
    model: str
    task: str
    fidelity_metric: str
    input: dict[str, Any]
    """The request (image path or text), what uploading it raw costs (``upload_bytes``: the file's size for an
    image) and the profile's raw input (the boundary before stage 0) as uploaded."""
    tiers: dict[str, dict[str, Any]]
    provenance: dict[str, list[str]]
    profiles: dict[str, dict[str, Any]]
    goals: list[Goal]
    server_pairs_started: int
    wall_s: float
    machine: dict[str, Any] = field(default_factory=dict)
    """cores and the 1-minute load average at start and end: other work on the machine shows here."""

    def rows(self) -> dict[str, dict[str, dict[str, float]]]:
        """link -> strategy -> the numbers :func:`check_goals` reads."""
        return {
            k: {
                s: {f: v[f] for f in ("p50_ms", "p90_ms", "predicted_ms", "fidelity")}
                for s, v in p["strategies"].items()
            }
            for k, p in self.profiles.items()
        }


PROVENANCE = {
    "measured": [
        "p50_ms/p90_ms: wall clock on the device from the raw input (preprocessing included) to the result, through "
        "the real runtime: three processes, QUIC with mutual TLS, every byte through the link emulator",
        "payload_bytes: frame bytes per request per link, as the runtime counted them",
        "wire_bytes: UDP payload bytes per request through the emulator (QUIC/TLS overhead and retransmissions)",
        "fidelity: against the monolithic model on this CPU, same input",
        "breakdown: the median request's per-tier compute and codec ms and per-link wire ms",
    ],
    "emulated": [
        "links: rate, delay, jitter, loss and queue of each profile, applied in userspace on loopback",
        "tier speeds: each tier's compute and codec work is stretched to dilation/speed times its thread CPU time "
        "(a sleep after the work); above this CPU's speed by time dilation (times reported = measured / dilation)",
    ],
    "modelled": [
        "predicted_ms and predicted: the planner's cost model on the profile measured on this CPU (cached per model "
        "hash and thread count) and the runtime's fixed costs calibrated on this machine, not a measurement",
        "predicted_ttft_ms: the prefill when the device drives generation, else the whole request; "
        "predicted_cold_ms: the warm prediction plus one handshake per connection",
    ],
}


def _gpu_profiles(model_hash: str) -> list[str]:
    found = []
    for path in sorted(HARDWARE_DIR.glob("*.json")):
        try:
            prof = load_profile(str(path))
        except AiflowError:  # a broken shipped profile is not this benchmark's business
            continue
        if prof.hardware.gpu and prof.model_hash == model_hash:
            found.append(path.name)
    return found


def _inputs(task: str, cfg: E2EConfig) -> dict[str, Any]:
    """The request: an image file's path (a device that computes nothing uploads the file as it is), or text."""
    if takes_image(task):
        path = Path(cfg.image or SAMPLE_IMAGE)
        if not path.is_file():
            raise InputError(f"image={path}: no such file", param="image")
        return {"image": path}
    return {"text": SAMPLE_PROMPT if task == "generate" else SAMPLE_TEXT}


def _reference(model: str, inputs: dict[str, Any], max_new_tokens: int) -> tuple[torch.Tensor, bool, int]:
    """The monolithic model's output on the same input, whether it generates, and its first decode stage."""
    full = load_model(model)
    if "image" in inputs:
        from PIL import Image

        with Image.open(inputs["image"]) as im:
            inputs = {"image": im.convert("RGB")}
    prepared = full.prepare(**inputs)
    if full.generates:
        return full.generate(prepared, max_new_tokens), True, full.decode_start
    return full.output(full.run(prepared)), False, full.decode_start


def _rounded(d: dict[str, Any], digits: int = 2) -> dict[str, Any]:
    return {
        k: (_rounded(v, digits) if isinstance(v, dict) else round(v, digits) if isinstance(v, float) else v)
        for k, v in d.items()
    }


def _entry(plan: Plan, m: Measurement, measured_as: Optional[str], decode_start: int) -> dict[str, Any]:
    """One (link profile, strategy) of the JSON: the measurement beside the plan's prediction."""
    p50, pred_ms = m.p50_ms, predicted_ms(plan, m.tokens or None)  # for the tokens generated (EOS may stop early)
    gen: dict[str, Any] = {}
    if m.tokens:
        ttft = float(statistics.median(m.ttft_ms))
        gen = {
            "ttft_ms": round(ttft, 2),
            "predicted_ttft_ms": round(predicted_ttft_ms(plan, decode_start), 2),
            "tokens_per_s": round(m.tokens / (p50 / 1e3), 2),
            "tokens": m.tokens,
        }
    return {
        **gen,
        "cold_ms": None if m.cold_ms is None else round(m.cold_ms, 2),
        "predicted_cold_ms": round(predicted_cold_ms(plan, m.tokens or None), 2),
        "plan": plan.summary(),
        "p50_ms": round(p50, 2),
        "p90_ms": round(m.p90_ms, 2),
        "samples_ms": [round(x, 2) for x in m.samples_ms],
        "predicted_ms": round(pred_ms, 2),
        "prediction_error": round((pred_ms - p50) / p50, 4),
        "predicted": _rounded(predicted(plan)),
        "payload_bytes": m.payload_bytes,
        "wire_bytes": _rounded(m.wire_bytes, 0),
        "fidelity": round(m.fidelity, 6),
        "breakdown": m.breakdown,
        "measured_as": measured_as,
    }


def run(cfg: E2EConfig, progress: Progress = lambda s: None) -> E2EResult:
    """Profiles (cached), plans, runs every configuration and checks the goals; see the module docstring."""
    cfg.check()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    links = {name: load_link(name) for name in cfg.link_names}
    wan = load_link(cfg.wan)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the device tier gets as many threads as each server
    try:
        inputs = _inputs(load_stages(cfg.model, []).task, cfg)
        prof = cached_profile(cfg.model, progress, inputs, cfg.max_new_tokens)  # per model hash, torch threads
        # and request shape, shared with the demo
        input_bytes = upload_bytes(inputs)
        overheads = calibrate(log=progress).overheads(emulated=True, dilation=cfg.dilation.factor)
        plans = {name: plan_strategies(prof, link, wan, cfg, input_bytes, overheads) for name, link in links.items()}
        progress("reference: the monolithic model on the same input")
        reference, generates, decode_start = _reference(cfg.model, inputs, cfg.max_new_tokens)
        groups = group_runs(plans)
        with ExitStack() as stack:
            runners = _start(groups, plans, links, wan, cfg, stack, progress)
            measured: dict[tuple[str, str], tuple[Measurement, Optional[str]]] = {}
            for name, link in links.items():
                at_link = {key: by_link[name] for key, by_link in groups.items() if name in by_link}
                m = _measure_link(name, link, {k: runners[k] for k in at_link}, inputs, reference, cfg, progress)
                for key, strategies in at_link.items():
                    for i, s in enumerate(strategies):
                        note = None if i == 0 else f"shared with {strategies[0]}: same placement"
                        measured[(name, s)] = (m[key], note)
            device_speed = _device_speed(runners, inputs, reference, cfg, progress)
        profiles: dict[str, dict[str, Any]] = {}
        for name, link in links.items():
            strategies = {s: _entry(plans[name][s], *measured[(name, s)], decode_start) for s in STRATEGIES}
            profiles[name] = {
                "link": {
                    "uplink_mbps": link.uplink_mbps,
                    "downlink_mbps": link.downlink_mbps,
                    "rtt_ms": link.rtt_ms,
                    "loss_pct": link.loss_pct,
                },
                "strategies": strategies,
            }
    finally:
        torch.set_num_threads(threads_before)
    gpus = _gpu_profiles(prof.model_hash)
    d = cfg.dilation.factor
    cloud_note = (
        "profiles/hardware/ holds no GPU profile of this model"
        if not gpus
        else f"GPU profile(s) {', '.join(gpus)} exist but are not used: the cloud's speed is the cloud_speed given"
    )
    if cfg.cloud_speed > 1:
        from aiflow_cli.runtime.demo import CLOUD_SPEED_NOTE

        cloud_note += (
            f"; {cfg.cloud_speed:g}x is {CLOUD_SPEED_NOTE.removeprefix('assumed, not measured (no GPU here): ')}"
        )
    tier_desc = f"a separate process on this CPU, {cfg.threads} torch thread(s)"

    def stretch(speed: float) -> str:
        return f"compute and codec stretched to {d / speed:g}x their CPU time" if d / speed > 1 else "real speed"

    tiers = {
        "device": {
            "speed": cfg.device_speed,
            "measured_speed_compute": device_speed["compute"],
            "measured_speed_end_to_end": device_speed["end_to_end"],
            "how": f"this process, {cfg.threads} torch thread(s), {stretch(cfg.device_speed)}; "
            f"measured_speed_*: device-only at this CPU's real speed / at its speed, on the device's "
            f"compute ms and on end-to-end p50, times the dilation",
        },
        "edge": {"speed": cfg.edge_speed, "how": f"{tier_desc}, {stretch(cfg.edge_speed)}"},
        "cloud": {"speed": cfg.cloud_speed, "how": f"{tier_desc}, {stretch(cfg.cloud_speed)}; {cloud_note}"},
        "dilation": {
            "factor": d,
            "how": "times are measured / factor; links emulated with delays x factor and "
            "rates / factor (docs/runtime.md)"
            if d > 1
            else "none: real time",
        },
    }
    result = E2EResult(
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        model=cfg.model,
        task=prof.task,
        fidelity_metric="token_agreement" if generates else "cosine",
        input={
            **{k: str(v) for k, v in inputs.items()},
            "upload_bytes": input_bytes if input_bytes is not None else prof.input_bytes,
            "profile_input_bytes": prof.input_bytes,
        },
        tiers=tiers,
        provenance=PROVENANCE,
        profiles=profiles,
        goals=[],
        server_pairs_started=sum(not r.local for r in runners.values()),
        wall_s=0.0,
        machine={
            "cores": os.cpu_count(),
            "load_avg_1min_start": round(load_start[0], 2),
            "load_avg_1min_end": round(os.getloadavg()[0], 2),
        },
    )
    result.goals = check_goals(
        result.rows(),
        min_fidelity=cfg.min_fidelity,
        speedup_goal=cfg.speedup_goal,
        prediction_tolerance=cfg.prediction_tolerance,
        noise_rel=cfg.noise_rel,
        prediction_share=cfg.prediction_share,
    )
    result.wall_s = round(time.perf_counter() - t_start, 1)
    return result


def _start(
    groups: dict[tuple, dict[str, list[str]]],
    plans: dict[str, dict[str, Plan]],
    links: dict[str, LinkProfile],
    wan: LinkProfile,
    cfg: E2EConfig,
    stack: ExitStack,
    progress: Progress,
) -> dict[tuple, Runner]:
    """A :class:`Runner` per placement, all up at once (``stack`` stops them): servers start once per placement."""
    runners = {}
    for n, (key, by_link) in enumerate(groups.items()):
        first_link, first_strats = next(iter(by_link.items()))
        plan = plans[first_link][first_strats[0]]  # the runtime needs one file; same placement everywhere
        plan_path = cfg.workdir / "plans" / f"placement-{n}.json"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        save_plan(plan, plan_path)
        d = cfg.dilation
        worst_s = max(plans[k][s].prediction.total_ms for k, ss in by_link.items() for s in ss) / 1e3 * d.factor
        if runs_locally(plan):
            p = stack.enter_context(
                device_pipeline(
                    plan, cfg.workdir, speed=cfg.device_speed, dilation=d.factor, timeout_s=max(60.0, 20 * worst_s)
                )
            )
            runners[key] = Runner(plan, p, None, None, d)
            continue
        progress(f"starting edge and cloud for {plan.summary()}")
        c = stack.enter_context(
            LocalCluster(
                plan_path,
                cfg.workdir / f"placement-{n}",
                links=d.links({"device-edge": links[first_link], "edge-cloud": wan}),
                speeds=cfg.speeds,
                threads=cfg.threads,
                dilation=d.factor,
            )
        )
        p = stack.enter_context(c.pipeline(timeout_s=max(60.0, 20 * worst_s)))
        runners[key] = Runner(plan, p, c, first_link, d)
    return runners


def _measure_link(
    name: str,
    link: LinkProfile,
    runners: dict[tuple, Runner],
    inputs: dict[str, Any],
    reference: torch.Tensor,
    cfg: E2EConfig,
    progress: Progress,
) -> dict[tuple, Measurement]:
    """Every placement used at link ``name``, measured in interleaved rounds (one request each per round, the
    order rotated), so that load from elsewhere on the machine falls on all of them alike."""
    order = list(runners)
    progress(f"{name}: warming up {', '.join(runners[k].plan.summary() for k in order)}")
    for r in runners.values():
        r.use_link(name, link)
        if not (r.local and r.warmed):  # a local pipeline has no connection to warm twice
            r.cold_ms = r.request(inputs, cfg.max_new_tokens).result.total_ms  # opens the connections
            for _ in range(WARMUP_REQUESTS - 1):
                r.request(inputs, cfg.max_new_tokens)
            r.warmed = True
        r.start_timing()
    deadline = time.monotonic() + cfg.budget_s * len(order)
    for i in range(cfg.repeats):
        progress(f"{name}: round {i + 1}/{cfg.repeats} of {len(order)} placement(s)")
        for key in order[i % len(order) :] + order[: i % len(order)]:
            runners[key].timed(inputs, cfg.max_new_tokens)
        if i + 1 >= MIN_SAMPLES and time.monotonic() > deadline:
            break
    return {key: r.measurement(reference) for key, r in runners.items()}


def _device_speed(
    runners: dict[tuple, Runner], inputs: dict[str, Any], reference: torch.Tensor, cfg: E2EConfig, progress: Progress
) -> dict[str, Optional[float]]:
    """The emulated device's speed as obtained: device-only unstretched (this CPU's real speed) against its last
    measurement at ``cfg.device_speed``, on end-to-end p50 and on the device's compute ms, times the dilation."""
    local = next((r for r in runners.values() if r.local and r.results), None)
    d = cfg.dilation.factor
    if local is None or local.pipeline.node.stretch <= 1:
        return {"end_to_end": None, "compute": None}
    slow = local.measurement(reference)
    progress("device-only unstretched (to measure the emulated device speed)")
    local.pipeline.node.stretch = 1.0
    local.request(inputs, cfg.max_new_tokens)
    local.start_timing()
    for _ in range(MIN_SAMPLES):
        local.timed(inputs, cfg.max_new_tokens)
    full = local.measurement(reference)
    return {
        "end_to_end": round(d * full.p50_ms / slow.p50_ms, 4),
        "compute": round(d * full.breakdown["compute_ms"]["device"] / slow.breakdown["compute_ms"]["device"], 4),
    }


# -- the picture ------------------------------------------------------------------------------------------------
STRATEGY_STYLE = {
    "device-only": {"color": "#4c72b0", "marker": "s"},
    "cloud-only": {"color": "#55a868", "marker": "^"},
    "raw-split": {"color": "#dd8452", "marker": "D"},
    "aiflow": {"color": "black", "marker": "o", "linewidth": 2.5},
}


def plot(result: E2EResult, path: str | Path) -> None:
    """Writes a PNG: measured p50 latency (bars to p90) vs the device-edge uplink (log-log), one solid line per
    strategy, the planner's prediction dotted in the same colour; each point named by its link profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = sorted(result.profiles, key=lambda k: result.profiles[k]["link"]["uplink_mbps"])
    xs = np.array([result.profiles[k]["link"]["uplink_mbps"] for k in names])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for s in STRATEGIES:
        rows = [result.profiles[k]["strategies"][s] for k in names]
        p50 = np.array([r["p50_ms"] for r in rows])
        p90 = np.array([r["p90_ms"] for r in rows])
        style = STRATEGY_STYLE[s]
        ax.errorbar(
            xs,
            p50,
            yerr=[np.zeros_like(p50), p90 - p50],
            label=f"{s} (measured p50, bar to p90)",
            capsize=3,
            markersize=5,
            **style,
        )
        ax.plot(xs, [r["predicted_ms"] for r in rows], linestyle=":", color=style["color"], linewidth=1.2, alpha=0.8)
    ax.plot([], [], linestyle=":", color="grey", label="planner's prediction (dotted, same colour)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for x, k in zip(xs, names):
        ax.annotate(
            k,
            (x, 0.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax.set_xlabel("device-edge uplink, Mbit/s (named link profiles: RTT and loss differ too)")
    ax.set_ylabel("end-to-end latency per request, ms")
    cfg = result.config
    what = f", {cfg['max_new_tokens']} tokens" if result.fidelity_metric == "token_agreement" else ""
    ax.set_title(f"{result.model}{what}: device at {cfg['device_speed']:g}x, edge-cloud {cfg['wan']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- several models ---------------------------------------------------------------------------------------------
@dataclass
class E2EReport(JsonResult):
    """One :class:`E2EResult` per model and the goals over all of them (rows keyed ``model link``)."""

    runs: list[E2EResult]
    goals: list[Goal]
    wall_s: float
    command: str = ""


def run_models(cfgs: list[E2EConfig], progress: Progress = lambda s: None, command: str = "") -> E2EReport:
    """Runs :func:`run` for each config (one per model) and checks the goals over every (model, link) row."""
    t0 = time.perf_counter()
    for c in cfgs:
        c.check()
    runs = []
    for c in cfgs:
        progress(f"== {c.model}")
        runs.append(run(c, progress))
    rows = {f"{r.model} {link}": row for r in runs for link, row in r.rows().items()}
    c = cfgs[0]
    goals = check_goals(
        rows,
        min_fidelity=c.min_fidelity,
        speedup_goal=c.speedup_goal,
        prediction_tolerance=c.prediction_tolerance,
        noise_rel=c.noise_rel,
        prediction_share=c.prediction_share,
    )
    return E2EReport(runs=runs, goals=goals, wall_s=round(time.perf_counter() - t0, 1), command=command)
