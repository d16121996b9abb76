"""``aiflow bench load``: N concurrent devices against one edge + cloud pair, with and without batched decode.

One placement of a small generating model (default ``builtin:gpt2-tiny``) is served by edge and cloud ``aiflow
serve`` processes on loopback (:class:`LocalCluster`, no link emulator), twice: once with decode batching across
sessions off (``--batch-max 1``), once on (runtime/batching.py). The default split is a thin device: the device
runs only the input stage, the edge the embedding and every block but the last, the cloud the last block and the
head (``--split A,B``: device ``[0:A)``, edge ``[A:B)``, cloud ``[B:n)``). The edge then drives each generation
(it holds the embedding), so every decode step of every device meets the other devices' steps on the edge and on
the cloud, which is where a server batches. For each N in the sweep, N threads of this process are N devices, each
with its own :class:`Pipeline` (its own QUIC connection and sessions; all present the cluster's device identity,
which the edge trusts) and its own prompt. Each device opens its connection with a one-token request (untimed),
then all start together (a barrier) and run ``requests`` greedy generations of ``tokens`` tokens each.

Per N and mode: tokens/s and requests/s (all devices' tokens and requests / wall time of the phase), p50/p99
request latency, edge->cloud messages per generated token (the batched hop sends one message per batch pass,
runtime/batching.py; the count comes back in each request's timings), VmRSS of the edge and cloud processes after
the phase, and the check that no response is lost (an
error, a timeout or no tokens) or mixed (tokens other than those of the same prompt run alone: the monolithic
model's greedy output, computed once per distinct prompt in this process); batched rows add the ratio of their
tokens/s to the unbatched row's. Every tier and device runs on this CPU.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from aiflow_cli.bench.common import JsonResult
from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.bench.e2e import Goal
from aiflow_cli.errors import InputError
from aiflow_cli.models import load_stages
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.runtime.batching import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS, BatchSettings
from aiflow_cli.runtime.cluster import LocalCluster

DEFAULT_MODEL = "builtin:gpt2-tiny"
FULL_DEVICES = (1, 8, 32, 128, 256)
QUICK_DEVICES = (1, 8, 32)
#: "bounded memory": each server's RSS may grow by less than this from its start to after the largest N.
RSS_GROWTH_BOUND_BYTES = 256 << 20
#: The batching goal of issue 14: at this many devices, batched serving's tokens/s >= this x unbatched serving's.
BATCH_GOAL_DEVICES, BATCH_GOAL_SPEEDUP = 128, 4.0

#: The link whose messages per generated token the bench reports (the batched hop's effect).
LINK = "edge-cloud"

Progress = Callable[[str], None]


def prompt_of(i: int) -> str:
    """Device ``i``'s prompt (distinct per device). It ends in one of 94 printable characters, because the random
    built-ins' greedy output follows the prompt's last tokens: most devices expect tokens of their own
    (``distinct_references`` counts the distinct expected outputs), so a response delivered to another device is
    caught as mixed."""
    return f"Device {i} asks: {chr(0x21 + i % 94)}"


def rss_bytes(pid: int) -> int:
    """VmRSS of process ``pid`` (bytes), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"pid {pid}: no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, s) process ``pid`` has used, from /proc (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class LoadConfig:
    model: str = DEFAULT_MODEL
    devices: tuple[int, ...] = FULL_DEVICES
    tokens: int = 8
    requests: int = 2
    """Timed requests per device per N."""
    threads: int = 1
    split: Optional[tuple[int, int]] = None
    """Stage bounds (A, B): device [0:A), edge [A:B), cloud [B:n); None: (1, n - 2), a thin device."""
    batch_max: int = DEFAULT_MAX_BATCH
    batch_window_ms: float = DEFAULT_WINDOW_MS
    modes: tuple[bool, ...] = (False, True)
    """Batching off, on (each mode serves the whole sweep on servers of its own)."""
    timeout_s: float = 120.0
    """Per-request timeout of every device."""
    workdir: Optional[Path] = None

    @classmethod
    def quick_config(cls, **overrides: Any) -> "LoadConfig":
        base: dict[str, Any] = {"devices": QUICK_DEVICES, "tokens": 4, "requests": 1}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def check(self) -> None:
        if not self.devices or any(n < 1 for n in self.devices):
            raise InputError(
                f"devices={','.join(map(str, self.devices))}: give one or more counts >= 1", param="devices"
            )
        for name, v in (("tokens", self.tokens), ("requests", self.requests)):
            if v < 1:
                raise InputError(f"{name}={v}: must be >= 1", param=name)
        if not self.modes:
            raise InputError("modes: give batching off, on or both", param="modes")
        BatchSettings(self.batch_max, self.batch_window_ms)  # refuses bad values in one line


@dataclass
class LoadReport(JsonResult):
    model: str
    plan: str
    config: dict[str, Any]
    runs: list[dict[str, Any]]
    goals: list[Goal]
    errors: list[str]
    """The first distinct errors of lost requests (empty when none was lost)."""
    measured: str
    machine: dict[str, Any]
    wall_s: float = 0.0
    command: str = ""


@dataclass
class _Outcome:
    latencies_ms: list[float]
    tokens: int
    lost: int
    mixed: int
    errors: list[str]
    messages: int = 0
    """Messages the edge sent the cloud for this device's timed requests (a batched message counts once)."""


def _device(cluster: LocalCluster, cfg: LoadConfig, i: int, ref: torch.Tensor, barrier: threading.Barrier):
    lat: list[float] = []
    out = _Outcome(lat, 0, 0, 0, [])
    prompt = prompt_of(i)
    with cluster.pipeline(timeout_s=cfg.timeout_s) as p:
        try:
            p.run(text=prompt, max_new_tokens=1)  # opens the connection, untimed
        except Exception as e:  # noqa: BLE001 - every failure is a lost request, reported
            out.lost += 1
            out.errors.append(f"{type(e).__name__}: {e}")
        barrier.wait()
        for _ in range(cfg.requests):
            t0 = time.perf_counter()
            try:
                r = p.run(text=prompt, max_new_tokens=cfg.tokens)
            except Exception as e:  # noqa: BLE001
                out.lost += 1
                out.errors.append(f"{type(e).__name__}: {e}")
                continue
            lat.append((time.perf_counter() - t0) * 1e3)
            if r.tokens is None:
                out.lost += 1
                continue
            out.tokens += int(r.tokens.shape[1])
            link = r.timings.links.get(LINK)
            out.messages += link.messages if link is not None else 0
            if not torch.equal(r.tokens, ref):
                out.mixed += 1
    return out


def _phase(
    cluster: LocalCluster, cfg: LoadConfig, n: int, refs: list[torch.Tensor], batching: bool, start_rss: dict[str, int]
) -> tuple[dict[str, Any], list]:
    barrier = threading.Barrier(n + 1)
    pids = {"devices": os.getpid(), **{t: cluster.servers[t].ready.pid for t in ("edge", "cloud")}}
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_device, cluster, cfg, i, refs[i], barrier) for i in range(n)]
        barrier.wait()  # every device has its connection; the timed phase starts now
        t0 = time.perf_counter()
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        outs = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        cpu = {k: cpu_seconds(pid) - cpu0[k] for k, pid in pids.items()}
    lat = [x for o in outs for x in o.latencies_ms]
    tokens = sum(o.tokens for o in outs)
    row = {
        "devices": n,
        "batching": batching,
        "requests": n * cfg.requests,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
        "edge_rss_bytes": rss_bytes(cluster.servers["edge"].ready.pid),
        "cloud_rss_bytes": rss_bytes(cluster.servers["cloud"].ready.pid),
        **{f"{t}_rss_start_bytes": v for t, v in start_rss.items()},
        "lost": sum(o.lost for o in outs),
        "mixed": sum(o.mixed for o in outs),
        "edge_cloud_messages_per_token": round(sum(o.messages for o in outs) / tokens, 3) if tokens else None,
        # CPU seconds of each process during the phase (devices: this process), and per generated token (ms)
        **{f"{k}_cpu_s": round(v, 2) for k, v in cpu.items()},
        **{f"{k}_cpu_ms_per_token": round(v * 1e3 / tokens, 2) if tokens else None for k, v in cpu.items()},
    }
    return row, [e for o in outs for e in o.errors]


def add_ratios(runs: list[dict[str, Any]]) -> None:
    """Gives each batched row ``speedup``: its tokens/s / the unbatched row's at the same N (None without one)."""
    plain = {r["devices"]: r["tokens_per_s"] for r in runs if not r["batching"]}
    for r in runs:
        if r["batching"]:
            base = plain.get(r["devices"])
            r["speedup"] = round(r["tokens_per_s"] / base, 2) if base else None


def check_goals(runs: list[dict[str, Any]], bound: int = RSS_GROWTH_BOUND_BYTES) -> list[Goal]:
    """The issue's goals from measured rows (pure; batched rows carry ``speedup``, see :func:`add_ratios`)."""
    lost, mixed = sum(r["lost"] for r in runs), sum(r["mixed"] for r in runs)
    goals = [
        Goal(
            "0 lost or mixed responses",
            lost == 0 and mixed == 0,
            f"{lost} lost, {mixed} mixed of {sum(r['requests'] for r in runs)} timed requests",
        )
    ]
    growth: dict[str, int] = {}
    for mode in sorted({r["batching"] for r in runs}):
        hi = max((r for r in runs if r["batching"] == mode), key=lambda r: r["devices"])
        for t in ("edge", "cloud"):
            growth[f"{'batched' if mode else 'unbatched'} {t}"] = hi[f"{t}_rss_bytes"] - hi[f"{t}_rss_start_bytes"]
    goals.append(
        Goal(
            f"bounded memory (server RSS growth from start to after {max(r['devices'] for r in runs)} devices "
            f"< {bound / 2**20:.0f} MiB per server)",
            all(g < bound for g in growth.values()),
            ", ".join(f"{t} {g / 2**20:+.1f} MiB" for t, g in growth.items()),
            {f"{t.replace(' ', '_')}_growth_bytes": g for t, g in growth.items()},
        )
    )
    at = [r for r in runs if r["batching"] and r["devices"] == BATCH_GOAL_DEVICES]
    name = (
        f">= {BATCH_GOAL_SPEEDUP:g}x tokens/s of unbatched serving at {BATCH_GOAL_DEVICES} devices with batching, "
        "0 lost or mixed"
    )
    if not at or at[0].get("speedup") is None:
        measured = [f"{r['devices']}: {r['speedup']:.2f}x" for r in runs if r["batching"] and r.get("speedup")]
        goals.append(
            Goal(
                name,
                False,
                f"not measured: the sweep has no {BATCH_GOAL_DEVICES}-device run in both modes"
                + (f" (batched / unbatched tokens/s at {', '.join(measured)})" if measured else ""),
            )
        )
    else:
        r = at[0]
        plain = next(p for p in runs if not p["batching"] and p["devices"] == BATCH_GOAL_DEVICES)
        clean = r["lost"] == r["mixed"] == plain["lost"] == plain["mixed"] == 0
        goals.append(
            Goal(
                name,
                r["speedup"] >= BATCH_GOAL_SPEEDUP and clean,
                f"{r['tokens_per_s']:.1f} vs {plain['tokens_per_s']:.1f} tokens/s: {r['speedup']:.2f}x; "
                f"lost/mixed {r['lost']}/{r['mixed']} batched, {plain['lost']}/{plain['mixed']} unbatched",
                {"speedup": r["speedup"]},
            )
        )
    return goals


def run(cfg: LoadConfig, progress: Progress = lambda s: None, command: str = "") -> LoadReport:
    """Starts edge and cloud once per mode, sweeps the device counts; see the module docstring."""
    cfg.check()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    load_start = os.getloadavg()[0]
    n_max = max(cfg.devices)
    progress(f"greedy references of {n_max} prompts (monolithic {cfg.model}, this process)")
    full = load_stages(cfg.model)
    if not full.generates:
        raise InputError(f"model {cfg.model!r} ({full.task}) does not generate: pick a language model", param="model")
    refs = [full.generate(full.raw_input(text=prompt_of(i)), cfg.tokens) for i in range(n_max)]
    distinct = len({tuple(r.flatten().tolist()) for r in refs})
    split = cfg.split or (1, full.num_stages - 2)
    plan = fixed_plan(full, split)
    del full
    runs: list[dict[str, Any]] = []
    errors: list[str] = []
    with ExitStack() as stack:
        workdir = Path(cfg.workdir) if cfg.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        path = workdir / "plan.json"
        save_plan(plan, path)
        for batching in cfg.modes:
            settings = BatchSettings(cfg.batch_max if batching else 1, cfg.batch_window_ms)
            what = f"batching on (at most {settings.max_batch} sessions a pass)" if batching else "batching off"
            with LocalCluster(path, workdir / "cluster", threads=cfg.threads, batching=settings) as cluster:
                progress(f"edge and cloud started, {what}: {plan.summary()}")
                start_rss = {t: rss_bytes(cluster.servers[t].ready.pid) for t in ("edge", "cloud")}
                for n in sorted(cfg.devices):
                    progress(f"{n} device(s), {what}: {cfg.requests} x {cfg.tokens} tokens each")
                    row, errs = _phase(cluster, cfg, n, refs, batching, start_rss)
                    runs.append(row)
                    errors += [e for e in dict.fromkeys(errs) if e not in errors][:5]  # the first distinct ones
                    progress(
                        f"{n} device(s), {what}: {row['tokens_per_s']:.1f} tok/s, {row['requests_per_s']:.1f} req/s, "
                        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, lost {row['lost']}, mixed {row['mixed']}, "
                        f"{row['edge_cloud_messages_per_token']} edge->cloud messages/token"
                    )
    add_ratios(runs)
    load_end = os.getloadavg()[0]
    return LoadReport(
        model=cfg.model,
        plan=plan.summary(),
        config={
            "devices": list(cfg.devices),
            "tokens": cfg.tokens,
            "requests": cfg.requests,
            "threads": cfg.threads,
            "split": list(split),
            "batch_max": cfg.batch_max,
            "batch_window_ms": cfg.batch_window_ms,
            "distinct_references": distinct,
            "rss_growth_bound_bytes": RSS_GROWTH_BOUND_BYTES,
        },
        runs=runs,
        goals=check_goals(runs),
        errors=errors[:10],
        measured=(
            "real edge and cloud processes on loopback (QUIC, mutual TLS), no link emulation, started once per mode "
            "(batching off: at most 1 session a pass; on); devices are threads of this process (one Pipeline and connection "
            "each); tokens/s, requests/s, request latency, edge->cloud messages per token, CPU time of the device, edge "
            "and cloud processes during each phase, server VmRSS, and every response checked against the "
            "monolithic model's greedy output for its prompt"
        ),
        machine={
            "cores": os.cpu_count(),
            "load_avg_1min_start": load_start,
            "load_avg_1min_end": load_end,
        },
        wall_s=round(time.perf_counter() - t_start, 1),
        command=command,
    )
