"""CLI verb of the load benchmark: ``aiflow bench load`` (N concurrent devices, with and without batched decode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from aiflow_cli.commands.decode import print_machine, run_bench
from aiflow_cli.commands.e2e import _print_goals
from aiflow_cli.console import console
from aiflow_cli.errors import InputError


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--devices {text!r}: give comma-separated counts, e.g. 1,8,32", param="devices") from None


def _split(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--split {text!r}: give two stage indices A,B (e.g. 1,5)", param="split")
    return int(parts[0]), int(parts[1])


def bench_load(
    model: Optional[str] = typer.Option(None, "--model", help="Language model (default builtin:gpt2-tiny)."),
    devices: Optional[str] = typer.Option(
        None, "--devices", help="Concurrent device counts, comma-separated (default 1,8,32,128,256; --quick 1,8,32)."
    ),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Tokens per request (default 8; --quick 4)."),
    requests: Optional[int] = typer.Option(
        None, "--requests", help="Timed requests per device and count (default 2; --quick 1)."
    ),
    split: Optional[str] = typer.Option(
        None, "--split", help="Stage bounds A,B: device [0:A), edge [A:B), cloud [B:n) (default 1,n-2: a thin device)."
    ),
    batch_max: Optional[int] = typer.Option(
        None, "--batch-max", help="Most sessions per batched pass on each server in the batched runs (default 128)."
    ),
    batch_window_ms: Optional[float] = typer.Option(
        None, "--batch-window-ms", help="How long a batch waits for more steps in the batched runs (default 0)."
    ),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keys, plan, server logs (default: a temp dir)."),
    quick: bool = typer.Option(False, "--quick", help="1, 8 and 32 devices, 4 tokens, one request each (both modes)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)."),
) -> None:
    """N concurrent devices against one edge + cloud pair on loopback, with and without batched decode: throughput,
    latency, server memory, and every response checked against its prompt's monolithic output."""
    from aiflow_cli.bench import load

    given: dict[str, Any] = {
        "model": model,
        "devices": _counts(devices) if devices is not None else None,
        "tokens": tokens,
        "requests": requests,
        "workdir": workdir,
        "split": _split(split) if split is not None else None,
        "batch_max": batch_max,
        "batch_window_ms": batch_window_ms,
    }
    cfg = (
        load.LoadConfig.quick_config(**given)
        if quick
        else load.LoadConfig(**{k: v for k, v in given.items() if v is not None})
    )
    run_bench("bench load", load.run, cfg, json_out, _print)


def _print(report) -> None:
    from rich import box
    from rich.table import Table

    c = report.config
    t = Table(
        title=f"{report.model}: {report.plan}; {c['requests']} request(s) x {c['tokens']} tokens per device; "
        f"batched: at most {c['batch_max']} sessions a pass, window {c['batch_window_ms']:g} ms",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    cols = [
        "dev",
        "batch",
        "tok/s",
        "x off",
        "req/s",
        "p50 ms",
        "p99 ms",
        "e->c msg/tok",
        "CPU ms/tok d/e/c",
        "RSS e/c MiB",
        "lost",
        "mixed",
    ]
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    for r in report.runs:
        bad = r["lost"] or r["mixed"]
        t.add_row(
            str(r["devices"]),
            "on" if r["batching"] else "off",
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
            f"{r['requests_per_s']:.1f}",
            "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}",
            "-" if r["p99_ms"] is None else f"{r['p99_ms']:.0f}",
            "-" if r.get("edge_cloud_messages_per_token") is None else f"{r['edge_cloud_messages_per_token']:.2f}",
            "/".join(f"{r.get(f'{k}_cpu_ms_per_token') or 0:.1f}" for k in ("devices", "edge", "cloud")),
            f"{r['edge_rss_bytes'] / 2**20:.0f}/{r['cloud_rss_bytes'] / 2**20:.0f}",
            f"[red]{r['lost']}[/]" if bad else str(r["lost"]),
            f"[red]{r['mixed']}[/]" if bad else str(r["mixed"]),
        )
    console.print(t)
    console.print(f"measured: {report.measured}", highlight=False)
    console.print(f"distinct expected outputs among the devices: {c['distinct_references']}", highlight=False)
    for e in report.errors:
        console.print(f"[red]error[/]: {e}", highlight=False)
    print_machine(report)
    _print_goals(report.goals)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    bench.command("load")(bench_load)
