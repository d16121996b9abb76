"""CLI verbs of the runtime: ``aiflow serve --role edge|cloud``, ``aiflow run`` (the device) and ``aiflow demo``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Optional

import typer

from aiflow_cli.commands.checks import check_run, check_serve, request_input
from aiflow_cli.commands.options import DRAFT_SOURCES, draft_option, precheck_option, speculate_option
from aiflow_cli.console import console, err_console, print_json
from aiflow_cli.errors import InputError


def _threads() -> None:
    """Applies ``AIFLOW_THREADS`` (torch intra-op threads), so several tiers on one machine do not oversubscribe."""
    n = os.environ.get("AIFLOW_THREADS")
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def serve(
    role: str = typer.Option(..., "--role", help="edge or cloud."),
    plan: Path = typer.Option(..., "--plan", help="Plan JSON from `aiflow plan --out` (the same file on every tier)."),
    listen: str = typer.Option("127.0.0.1:4433", "--listen", help="UDP address to listen on (port 0: any free)."),
    next_addr: Optional[str] = typer.Option(
        None, "--next", help="Next tier's address (edge -> cloud); A,B,...: a pool of replicas (docs/scale.md)."
    ),
    identity: Path = typer.Option(..., "--identity", help="Directory with node.key/node.crt (aiflow keygen)."),
    trust: list[str] = typer.Option(
        [], "--trust", help="Fingerprint of a peer to accept (repeat): devices, edges, the next tier."
    ),
    speed: float = typer.Option(
        1.0,
        "--speed",
        help="Emulate a machine SPEED x this CPU: compute stretched by DILATION/SPEED (0 < SPEED <= DILATION).",
    ),
    dilation: float = typer.Option(
        1.0,
        "--dilation",
        help="Time dilation factor D >= 1 (docs/runtime.md): lets SPEED reach D; every tier of a run must use the same D.",
    ),
    cache_mib: int = typer.Option(
        1024, "--cache-mib", min=1, help="KV-cache memory for all sessions; least recently used are evicted."
    ),
    duration_s: Optional[float] = typer.Option(None, "--duration-s", min=0, help="Stop after this many seconds."),
    insecure_dev: bool = typer.Option(
        False, "--insecure-dev", help="Accept any peer certificate (local experiments only)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the ready line and final counters as JSON lines."),
    metrics: Optional[str] = typer.Option(
        None, "--metrics", help="Serve Prometheus metrics on HOST:PORT (/metrics; docs/metrics.md). Off by default."
    ),
    replicas: int = typer.Option(
        1, "--replicas", min=1, help="Run the tier as a pool of N replicas on Ray (docs/scale.md); 1: one process."
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", help="Ray to run the pool on: local (a private one; the default), auto, or HOST:PORT."
    ),
    max_replicas: Optional[int] = typer.Option(
        None, "--max-replicas", min=1, help="Autoscale the pool between --replicas and this on active sessions."
    ),
    target_sessions: int = typer.Option(8, "--target-sessions", min=1, help="Active sessions per replica to aim at."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0.01, help="CPUs Ray reserves per replica."),
    batch_max: int = typer.Option(
        128, "--batch-max", help="Most sessions whose steps (decode, prefill) run as one forward pass (1: no batching)."
    ),
    batch_window_ms: float = typer.Option(
        0.0, "--batch-window-ms", help="How long a batch waits for more sessions' steps (0: those already waiting)."
    ),
) -> None:
    """Serve one tier of a plan: load only its stages, run them for every device, forward to the next tier."""
    import json
    import sys

    if replicas > 1 or ray_address is not None or max_replicas is not None:  # a pool on Ray (commands/pool.py)
        from aiflow_cli.commands.pool import serve_pool_cli

        _threads()
        return serve_pool_cli(
            role, plan, listen, next_addr, identity, trust, speed, dilation, cache_mib, duration_s, insecure_dev,
            json_out, metrics, replicas=replicas, ray_address=ray_address, max_replicas=max_replicas,
            target_sessions=target_sessions, cpus=replica_cpus, batch_max=batch_max, batch_window_ms=batch_window_ms,
        )  # fmt: skip
    # (after the pool's branch: it checks its options before anything imports torch)
    check_serve(
        role, plan, identity=identity, trust=trust, insecure_dev=insecure_dev, next_addr=next_addr, speed=speed,
        dilation=dilation, metrics=metrics,
    )  # fmt: skip
    _threads()
    from aiflow_cli.runtime.batching import BatchSettings
    from aiflow_cli.runtime.serve import TierServer

    srv = TierServer(
        role,
        plan,
        listen=listen,
        identity=identity,
        trust=trust,
        next_addr=next_addr,
        speed=speed,
        cache_limit_bytes=cache_mib << 20,
        insecure_dev=insecure_dev,
        dilation=dilation,
        metrics=metrics,
        batching=BatchSettings(batch_max, batch_window_ms),
    )

    def ready(info: dict[str, Any]) -> None:
        if json_out:
            sys.stdout.write(json.dumps(info) + "\n")
            sys.stdout.flush()
        else:
            lo, hi = info["stages"]
            err_console.print(
                f"{role} ready on {info['address']} (fingerprint {info['fingerprint'][:16]}..): stages "
                f"{'none (relay)' if hi == lo else f'[{lo}:{hi})'}, weights {info['loaded_param_bytes'] / 2**20:.1f} MiB, "
                f"RSS {info['rss_bytes'] / 2**20:.0f} MiB"
                + (f", metrics on http://{info['metrics']}/metrics" if "metrics" in info else "")
                + ("" if duration_s else "; Ctrl-C to stop"),
                highlight=False,
            )

    stats = srv.serve_forever(duration_s, on_ready=ready)
    if json_out:
        sys.stdout.write(json.dumps({"event": "stopped", "stats": stats}) + "\n")
    else:
        err_console.print(f"{role} stopped: {stats}", highlight=False)


def run(
    input_: str = typer.Argument(
        ..., metavar="INPUT", help="Text prompt / sentence, or an image file (caption, classify)."
    ),
    plan: Path = typer.Option(..., "--plan", help="Plan JSON (the same file the edge and cloud serve)."),
    edge: Optional[str] = typer.Option(
        None,
        "--edge",
        help="Edge address HOST:PORT, or HOST:PORT,HOST:PORT,... for a pool (needed unless the device runs everything).",
    ),
    identity: Path = typer.Option(..., "--identity", help="Directory with this device's node.key/node.crt."),
    trust: list[str] = typer.Option([], "--trust", help="Fingerprint of the edge to accept (repeat)."),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", min=1, help="Tokens to generate (default: the plan's, else 16)."
    ),
    timeout_s: float = typer.Option(60.0, "--timeout", help="Deadline of the whole request, seconds."),
    fallback: str = typer.Option(
        "none", "--fallback", help="none | local: finish on the device if the upper tiers fail."
    ),
    speed: float = typer.Option(1.0, "--speed", help="Emulate a slower device (0 < SPEED <= 1)."),
    speculate: Optional[str] = speculate_option(
        "verified upstream in one round trip; auto adapts K to acceptance and RTT. Greedy output unchanged; sampled "
        "output keeps the full model's distribution (rejection rule)."
    ),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (default); > 0: sample."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the K most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample among the most likely tokens up to this mass (1: all)."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Seed of the draws (default: a random one, printed); the same seed, the same answer."
    ),
    draft: Optional[str] = draft_option(f"With --speculate: {DRAFT_SOURCES}."),
    replan: bool = typer.Option(
        False,
        "--replan/--no-replan",
        help="Measure the device's link and switch every tier to a better plan between requests when it changed "
        "(docs/runtime.md, Re-planning). One request only measures: the JSON reports the estimate. Default off.",
    ),
    precheck: bool = precheck_option("With --speculate: "),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run one request as the device: own stages here, the rest on the edge and cloud, as the plan says."""
    check_run(
        input_, plan, edge=edge, identity=identity, timeout_s=timeout_s, fallback=fallback, speed=speed,
        speculate=speculate, draft=draft,
    )  # fmt: skip
    from aiflow_cli.models.sampling import Sampling
    from aiflow_cli.runtime.pipeline import Pipeline
    from aiflow_cli.runtime.report import flow_table

    _threads()
    if seed is None:
        seed = secrets.randbits(63) if temperature else 0
    sampling = Sampling(temperature, top_k, top_p, seed)
    with Pipeline(
        plan,
        edge=edge,
        identity=identity,
        trust=trust,
        timeout_s=timeout_s,
        fallback=fallback,  # type: ignore[arg-type]  # Pipeline checks it
        speed=speed,
        speculate=speculate,
        draft=draft,
        replan=replan,
        precheck=precheck,
    ) as p:
        chain = p.hello() if p.node.next is not None else [p.node.describe()]
        result = p.run(**request_input(p.plan.task, input_), max_new_tokens=max_new_tokens, sampling=sampling)
    sampled = None if sampling.greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    if json_out:
        print_json({**result.to_json(p.plan), "sampling": sampled, "plan": p.plan.summary(), "tiers": chain})
        return
    if result.text is not None and result.tokens is not None:
        console.print("\n".join(result.text), highlight=False, markup=False)
        console.print(f"({result.tokens.shape[1]} tokens: {result.tokens.tolist()})", highlight=False)
        if sampled:
            console.print(f"sampled: {sampled} (the same seed gives the same answer)", highlight=False)
    elif result.output is not None:
        console.print(
            f"output: shape {list(result.output.shape)}, first values "
            f"{[round(v, 4) for v in result.output.flatten()[:6].tolist()]}",
            highlight=False,
        )
    if result.fallback:
        err_console.print(f"[yellow]finished locally[/]: {result.fallback}")
    if result.speculation is not None:
        s = result.speculation
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.0%}"
        console.print(
            f"speculation: {s['rounds']} verify rounds, {s['accepted']}/{s['drafted']} drafts accepted ({acc}), "
            + (f"{s['verified']} verified by the output tier (edge pre-check), " if precheck else "")
            + f"{s['tokens_per_round'] or 0:.2f} tokens per round; draft: {s['policy'].get('draft_model') or s['policy'].get('draft')}",
            highlight=False,
        )
    if result.replan is not None:
        est = result.replan.get("estimate") or {}
        console.print(
            f"link as measured: rtt {est.get('rtt_ms', '-')} ms, uplink {est.get('uplink_mbps') or '-'} Mbit/s "
            f"(QUIC srtt {est.get('path_rtt_ms') or '-'} ms); switch: {result.replan.get('switch') or 'none'}",
            highlight=False,
        )
    console.print(flow_table(p.plan, result))
    for d in chain:
        console.print(
            f"{d['tier']}: stages {d['stages']}, weights {d['loaded_param_bytes'] / 2**20:.1f} MiB, "
            f"RSS {d['rss_bytes'] / 2**20:.0f} MiB",
            highlight=False,
        )


def demo(
    model: str = typer.Option(
        "smollm2", "--model", help="Model to split (aiflow models lists them), e.g. builtin:vit-gpt2-captioner."
    ),
    link: str = typer.Option("lte", "--link", help="Device-to-edge link profile (profiles/links/, or a .toml path)."),
    wan: str = typer.Option("wan", "--wan", help="Edge-to-cloud link profile."),
    device_speed: float = typer.Option(0.25, "--device-speed", help="Device speed as a multiple of this CPU."),
    edge_speed: float = typer.Option(1.0, "--edge-speed", help="Edge speed as a multiple of this CPU."),
    cloud_speed: float = typer.Option(
        4.0,
        "--cloud-speed",
        help="Cloud speed as a multiple of this CPU (an assumption; above 1 emulated by time dilation).",
    ),
    headroom: float = typer.Option(
        1.0,
        "--headroom",
        help="Extra time dilation H >= 1: every tier stretched at least H-fold, so a machine loaded less than H-fold does not show (runs H times longer).",
    ),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, help="Tokens to generate (captioning / LMs)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Warm requests timed per strategy (median reported)."),
    min_fidelity: float = typer.Option(
        0.99, "--min-fidelity", help="Fidelity floor of the aiflow plan; measured agreement below it is flagged."
    ),
    input_: Optional[Path] = typer.Option(
        None, "--image", help="Image to caption/classify (default: the bundled sample)."
    ),
    text: Optional[str] = typer.Option(None, "--text", help="Prompt or sentence for text models."),
    private: bool = typer.Option(
        True,
        "--private/--no-private",
        help="Language models: also measure the split that keeps the prompt on the device, with and without the "
        "device drafting (speculation).",
    ),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="Keys, cached profile, plans, logs (default ~/.cache/aiflow/demo)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The main job: device, edge and cloud on loopback through emulated links, one model split as planned."""
    for name, v in (("--device-speed", device_speed), ("--edge-speed", edge_speed), ("--cloud-speed", cloud_speed)):
        if not v > 0:
            raise InputError(f"{name} {v}: must be > 0 (a multiple of this CPU's speed)")
    if not 0 < min_fidelity <= 1:
        raise InputError(f"--min-fidelity {min_fidelity}: must be in (0, 1]")
    if not headroom >= 1:
        raise InputError(f"--headroom {headroom}: must be >= 1")
    if input_ is not None and not input_.is_file():
        raise InputError(f"--image {input_}: no such file")
    from aiflow_cli.links import load_link

    for name in (link, wan):  # an unknown link profile, before torch and the model load
        load_link(name)
    from rich.live import Live
    from rich.table import Table

    from aiflow_cli.runtime.demo import DemoConfig, run_demo
    from aiflow_cli.runtime.report import print_demo

    cfg = DemoConfig(
        model=model,
        uplink=link,
        wan=wan,
        device_speed=device_speed,
        edge_speed=edge_speed,
        cloud_speed=cloud_speed,
        headroom=headroom,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        min_fidelity=min_fidelity,
        input_path=input_,
        text=text,
        private=private,
    )
    if workdir is not None:
        cfg.workdir = workdir
    steps: list[str] = []
    finished: list[bool] = []
    out_console = err_console if json_out else console

    def view() -> Table:
        t = Table.grid(padding=(0, 1))
        for i, s in enumerate(steps):
            t.add_row("[green]✓[/]" if i < len(steps) - 1 or finished else "[yellow]…[/]", s)
        return t

    with Live(view(), console=out_console, refresh_per_second=4, transient=False) as live:

        def log(msg: str) -> None:
            steps.append(msg)
            live.update(view())

        out = run_demo(cfg, log)
        steps.append(f"done in {out['wall_s']:.1f} s")
        finished.append(True)
        live.update(view())
    out_console.print()
    if json_out:
        print_json(out)
        return
    print_demo(out, console)


def bench_runtime(
    model: list[str] = typer.Option([], "--model", help="Model(s) to measure (default: gpt2, the captioner, minilm)."),
    tokens: int = typer.Option(16, "--tokens", min=1, help="Tokens generated per request (generating models)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, help="Timed requests per configuration."),
    quick: bool = typer.Option(False, "--quick", help="Tiny models, 8 tokens, 3 repeats (about a minute)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Runtime overhead: device -> edge -> cloud on loopback (raw codec) vs the monolithic model, same run."""
    from rich.table import Table

    from aiflow_cli.bench.runtime import GOAL_RATIO, run_bench

    rows = run_bench(
        model or None, quick=quick, tokens=tokens, repeats=repeats, log=lambda s: err_console.print(s, highlight=False)
    )
    if json_out:
        print_json({"goal_ratio_without_round_trips": GOAL_RATIO, "rows": [r.to_dict() for r in rows]})
        return
    t = Table(
        title="runtime overhead (3 processes on loopback, raw codec) vs monolithic, medians", title_justify="left"
    )
    for col in ("model", "tokens", "mono ms", "runtime ms", "ratio", "msgs", "rtt ms", "w/o rtts", f"<={GOAL_RATIO}x"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(
            r.model,
            str(r.tokens),
            f"{r.monolithic_ms:.1f}",
            f"{r.runtime_ms:.1f}",
            f"{r.ratio:.2f}x",
            str(r.messages),
            f"{r.loopback_rtt_ms:.2f}",
            f"{r.ratio_without_round_trips:.2f}x",
            "PASS" if r.goal_met else "MISS",
        )
    console.print(t)
    for r in rows:
        console.print(f"{r.model}: {r.plan}", highlight=False)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("serve")(serve)
    app.command("run")(run)
    app.command("demo")(demo)
    bench.command("runtime")(bench_runtime)
