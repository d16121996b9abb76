"""`aiflow demo`: the whole story on one machine, offline, in one command.

keygen for three nodes -> profile the model (cached per model hash) -> plan for the chosen links -> cloud and
edge as real subprocesses behind link emulators on loopback -> the device runs one request -> the same request
device-only and cloud-only (each measured the same way) -> token agreement with the monolithic model.

The device is slowed to ``device_speed`` of this CPU (compute stretched, see :class:`TierNode`); edge and cloud
run at this CPU's speed. Link delay, rate and loss are emulated in userspace (:mod:`aiflow_cli.netem`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from aiflow_cli.links import load_link
from aiflow_cli.models import load_model, load_stages
from aiflow_cli.models.inputs import decode_image_file, image_file_tensor
from aiflow_cli.plan import Limits
from aiflow_cli.plan.solver import solve_variants
from aiflow_cli.plan.schema import Plan, save_plan
from aiflow_cli.profile import load_profile, profile_model, save_profile
from aiflow_cli.profile.schema import ModelProfile
from aiflow_cli.runtime.cluster import LocalCluster, identities
from aiflow_cli.runtime.pipeline import Pipeline, RunResult

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample.jpg"
SAMPLE_TEXT = "AI flow splits one model across device, edge and cloud"
#: Untimed requests before the measured one (the first requests of a new shape are several times slower).
WARMUP_REQUESTS = 2


@dataclass
class DemoConfig:
    model: str = "builtin:vit-gpt2-captioner"
    uplink: str = "lte"
    wan: str = "wan"
    device_speed: float = 0.25
    max_new_tokens: int = 16
    workdir: Path = field(default_factory=lambda: Path.home() / ".cache" / "aiflow" / "demo")
    input_path: Optional[Path] = None
    text: Optional[str] = None
    threads: int = 1
    """torch threads of every tier (and of the profile): three tiers share this machine's cores."""


@dataclass
class StrategyRun:
    name: str
    plan: Plan
    result: RunResult
    tiers: list[dict[str, Any]]
    link_stats: dict[str, Any] = field(default_factory=dict)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cached_profile(model: str, workdir: Path, log: Callable[[str], None]) -> ModelProfile:
    """This machine's profile of ``model`` at the current torch thread count, measured once per model hash and
    thread count and kept in ``workdir/profiles``."""
    model_hash = load_stages(model, []).model_hash
    path = workdir / "profiles" / f"{_safe(model)}-{model_hash[:12]}-t{torch.get_num_threads()}.json"
    if path.is_file():
        log(f"profile: cached {path}")
        return load_profile(str(path))
    log(f"profile: measuring {model} on this CPU (once; cached in {path.parent})")
    prof = profile_model(model, repeats=3, label="this-cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_profile(prof, path)
    return prof


def make_plans(prof: ModelProfile, cfg: DemoConfig, input_bytes: Optional[int] = None) -> dict[str, Plan]:
    """The planned split, the two baselines and the best three-tier split, solved on the same profile, links and
    speeds. ``input_bytes``:
    what the request's raw input costs to upload (the image file's size; default: the profile's input)."""
    links = {"device-edge": load_link(cfg.uplink), "edge-cloud": load_link(cfg.wan)}
    speeds = {"device": cfg.device_speed, "edge": 1.0, "cloud": 1.0}
    variants = {
        "aiflow": Limits(),
        "device-only": Limits(skip=frozenset({"edge", "cloud"})),
        "cloud-only": Limits(skip=frozenset({"device", "edge"})),
        # the best plan that runs stages on every tier: shows activations crossing both links, and what the
        # planner's choice saves over it
        "3-tier split": Limits(require=frozenset({"device", "edge", "cloud"})),
    }
    return solve_variants(prof, links, speeds, variants, tokens=cfg.max_new_tokens, input_bytes=input_bytes)


def request_input(task: str, cfg: DemoConfig) -> dict[str, Any]:
    """The demo's request: the image file's path (uploaded as is when the device computes nothing), or text."""
    if task in ("caption", "classify"):
        return {"image": Path(cfg.input_path or SAMPLE_IMAGE)}
    return {"text": cfg.text or SAMPLE_TEXT}


def upload_bytes(inputs: dict[str, Any]) -> Optional[int]:
    """Upload size of a request's raw input when it is a file (None: use the profile's figure)."""
    image = inputs.get("image")
    return Path(image).stat().st_size if isinstance(image, (str, Path)) else None


def run_strategy(name: str, plan: Plan, cfg: DemoConfig, inputs: dict[str, Any], log: Callable[[str], None]) -> StrategyRun:
    """Starts the tiers ``plan`` needs (none for device-only), runs one warm-up and one measured request."""
    plan_path = cfg.workdir / "plans" / f"{name}.json"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    save_plan(plan, plan_path)
    n = cfg.max_new_tokens if plan.task in ("generate", "caption") else None
    if not any(t.end > t.start for t in plan.tiers[1:]):
        keys = identities(cfg.workdir)
        with Pipeline(plan, edge=None, identity=keys["device"], trust=[], speed=cfg.device_speed) as p:
            log(f"{name}: device runs every stage")
            for _ in range(WARMUP_REQUESTS):
                p.run(**inputs, max_new_tokens=n)
            return StrategyRun(name, plan, p.run(**inputs, max_new_tokens=n), [p.node.describe()])
    links = {"device-edge": cfg.uplink, "edge-cloud": cfg.wan}
    log(f"{name}: starting cloud and edge ({plan.summary()})")
    with LocalCluster(plan_path, cfg.workdir, links=links, speeds={"device": cfg.device_speed},
                      threads=cfg.threads) as c:
        with c.pipeline(timeout_s=300) as p:
            tiers = p.hello()
            log(f"{name}: running the request")
            for _ in range(WARMUP_REQUESTS):  # connections, allocator, oneDNN's per-shape set-up
                p.run(**inputs, max_new_tokens=n)
            result = p.run(**inputs, max_new_tokens=n)
            return StrategyRun(name, plan, result, tiers, c.link_stats())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of generated positions where two token sequences agree (a sequence that stopped early at its
    end-of-sequence token disagrees at every position it did not generate)."""
    n = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t, (0, n - t.shape[1]), value=-1) for t in (a, b))
    return float((a == b).float().mean())


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the demo; returns everything it measured (the CLI prints it)."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    keys = identities(cfg.workdir)
    log("keys: " + ", ".join(f"{t} {k.fingerprint[:12]}" for t, k in keys.items()))
    prof = cached_profile(cfg.model, cfg.workdir, log)
    full = load_model(cfg.model)
    inputs = request_input(full.task, cfg)
    plans = make_plans(prof, cfg, upload_bytes(inputs))
    log(f"plan ({cfg.uplink} to the edge, {cfg.wan} to the cloud, device at {cfg.device_speed:g}x): {plans['aiflow'].summary()}")
    runs = {name: run_strategy(name, plan, cfg, inputs, log) for name, plan in plans.items()}
    local = {k: decode_image_file(image_file_tensor(v)) if k == "image" else v for k, v in inputs.items()}
    if full.generates:
        reference = full.generate(full.prepare(**local), cfg.max_new_tokens)
    else:
        reference = full.output(full.run(full.prepare(**local)))
    out: dict[str, Any] = {"model": cfg.model, "links": {"device-edge": cfg.uplink, "edge-cloud": cfg.wan},
                           "device_speed": cfg.device_speed, "has_tokenizer": full.has_tokenizer, "strategies": {}}
    for name, r in runs.items():
        entry = {"plan": r.plan.summary(), "predicted_ms": r.plan.prediction.total_ms, **r.result.to_json(),
                 "tiers": r.tiers}
        if reference is not None and r.result.tokens is not None:
            entry["token_agreement"] = agreement(r.result.tokens, reference)
        elif reference is not None and r.result.output is not None:
            entry["cosine"] = float(torch.nn.functional.cosine_similarity(r.result.output.flatten(), reference.flatten(), dim=0))
        out["strategies"][name] = entry
    out["wall_s"] = time.perf_counter() - t0
    out["_runs"] = runs
    return out
