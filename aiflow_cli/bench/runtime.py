"""``aiflow bench runtime``: what the three-tier runtime costs over the monolithic model in one process.

For each model, in one run: the monolithic model (every stage loaded in this process, the same stage code,
greedy generation with a KV cache for generating models; its blocks build the attention mask once per step, as
the library's forward does, where each tier builds it once for its own range) against the same request through device -> edge ->
cloud, where edge and cloud are real `aiflow serve` processes on loopback, no link emulation, ``raw`` codec on
every cut and a plan that puts stages on all three tiers. Reported: medians, their ratio, the number of
messages per request, the loopback round trip of an empty hello measured in the same run, and the ratio once
``messages x round trip`` is taken off (the issue's goal: <= 1.10x plus round trips). Every process, this one
included, uses one torch thread (three tiers share the machine's cores).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from aiflow_cli.bench.common import JsonResult
from aiflow_cli.links import load_link
from aiflow_cli.models import load_model
from aiflow_cli.plan import Limits, solve
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.profile import profile_model
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.task import generates, takes_image

MODELS = ["builtin:gpt2", "builtin:vit-gpt2-captioner", "minilm"]
QUICK_MODELS = ["builtin:gpt2-tiny", "builtin:captioner-tiny", "builtin:bert-tiny"]
GOAL_RATIO = 1.10
#: Untimed calls first, on both sides: oneDNN sets up each new shape over the first few calls.
WARMUP = 3
THREADS = 1
TEXT = "the runtime should cost little more than the model itself"


@dataclass
class RuntimeRow(JsonResult):
    model: str
    plan: str
    tokens: int
    monolithic_ms: float
    runtime_ms: float
    ratio: float
    messages: int
    loopback_rtt_ms: float
    ratio_without_round_trips: float
    goal_met: bool


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _three_tier_raw_plan(model: str, path: Path, tokens: int):
    prof = profile_model(model, repeats=1, warmup=0, codecs=["raw"])
    objective = "generate" if generates(prof.task) else "latency"
    plan = solve(
        {"*": prof},
        {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")},
        objective=objective,
        tokens=tokens if objective == "generate" else 0,
        limits=Limits(require=frozenset({"device", "edge", "cloud"}), codecs=("raw",)),
        speeds={"device": 1.0, "edge": 1.0, "cloud": 1.0},
    )
    save_plan(plan, path)
    return plan


def bench_model(
    model: str, *, tokens: int, repeats: int, workdir: Path, log: Callable[[str], None] = lambda s: None
) -> RuntimeRow:
    from PIL import Image

    from aiflow_cli.runtime.demo import SAMPLE_IMAGE

    full = load_model(model)
    request = {"image": Image.open(SAMPLE_IMAGE).convert("RGB")} if takes_image(full.task) else {"text": TEXT}
    inputs = full.prepare(**request)
    n = tokens if full.generates else 0

    def monolithic():
        return full.generate(inputs, n) if full.generates else full.output(full.run(inputs))

    for _ in range(WARMUP):
        monolithic()
    mono = _median_ms(monolithic, repeats)
    log(f"{model}: monolithic {mono:.1f} ms; planning and starting edge + cloud")
    plan = _three_tier_raw_plan(model, workdir / "plan.json", tokens)
    with LocalCluster(workdir / "plan.json", workdir) as c, c.pipeline(timeout_s=600) as p:
        p.hello()
        rtt = _median_ms(p.hello, max(5, repeats))
        for _ in range(WARMUP):
            r = p.run(inputs=inputs, max_new_tokens=n or None)
        rt = _median_ms(lambda: p.run(inputs=inputs, max_new_tokens=n or None), repeats)
    # a hello crosses both links (device -> edge -> cloud), like every runtime message
    messages = r.timings.links["device-edge"].messages
    adjusted = max(rt - messages * rtt, 0.0)
    return RuntimeRow(
        model=model,
        plan=plan.summary(),
        tokens=n,
        monolithic_ms=mono,
        runtime_ms=rt,
        ratio=rt / mono,
        messages=messages,
        loopback_rtt_ms=rtt,
        ratio_without_round_trips=adjusted / mono,
        goal_met=adjusted / mono <= GOAL_RATIO,
    )


def run_bench(
    models: Optional[list[str]] = None,
    *,
    quick: bool = False,
    tokens: int = 16,
    repeats: Optional[int] = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[RuntimeRow]:
    models = models or (QUICK_MODELS if quick else MODELS)
    repeats = repeats or (3 if quick else 5)
    import torch

    torch.set_num_threads(THREADS)  # the servers get the same (LocalCluster's default): a fair comparison
    rows = []
    for m in models:
        with tempfile.TemporaryDirectory(prefix="aiflow-bench-runtime-") as d:
            rows.append(bench_model(m, tokens=8 if quick else tokens, repeats=repeats, workdir=Path(d), log=log))
    return rows
