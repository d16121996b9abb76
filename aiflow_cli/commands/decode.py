"""CLI verb of the decoding benchmark: ``aiflow bench decode`` (speculative vs plain decoding over an RTT sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from aiflow_cli.commands.e2e import _print_goals
from aiflow_cli.commands.options import DRAFT_MODEL, draft_option, precheck_option
from aiflow_cli.console import console, err_console, print_json
from aiflow_cli.errors import InputError


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{what} {text!r}: give comma-separated numbers, e.g. 40,100", param=what) from None


def bench_decode(
    model: Optional[str] = typer.Option(None, "--model", help="Language model (default smollm2, real weights)."),
    rtt: Optional[str] = typer.Option(
        None, "--rtt", help="Device-edge RTTs to sweep, ms, comma-separated (default 10,40,100,200; --quick: 40,100)."
    ),
    tokens: Optional[int] = typer.Option(
        None, "--tokens", help="Tokens generated per request (default 32; --quick 12)."
    ),
    repeats: Optional[int] = typer.Option(
        None, "--repeats", help="Timed requests per mode and RTT, after a warm-up (default 3; --quick 1)."
    ),
    k: Optional[int] = typer.Option(None, "--k", help="Drafts per round of the fixed-K speculative mode (default 4)."),
    split: Optional[str] = typer.Option(
        None,
        "--split",
        help="A,B: the device runs stages [0:A), the edge [A:B), the cloud the rest (default: the device every "
        "block but the last, the edge the last block, the cloud the head).",
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", help="The prompt every request generates from (default: the sky-is-blue question)."
    ),
    draft: Optional[str] = draft_option(f"Add a spec-draft-auto mode: {DRAFT_MODEL}."),
    trained: bool = typer.Option(
        True,
        "--trained/--no-trained",
        help="Run the spec-trained-* modes with the trained exit of the device's last block (trained first when "
        "none is cached: `aiflow draft train`).",
    ),
    precheck: bool = precheck_option("Add spec-precheck-kK and spec-precheck-auto: "),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keys, plans, server logs (default: a temp dir)."),
    replan_requests: Optional[int] = typer.Option(
        None,
        "--replan-requests",
        min=0,
        help="Requests of the re-planning run (uplink drops 10x halfway; default 10, --quick 4; 0: skip it).",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Two RTTs, 12 tokens, one timed request each, fewer modes, nothing trained (< 3 min)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)."),
) -> None:
    """Decoding over a split LM: cloud-only, split, self-speculation (fixed K and auto; untrained and trained
    exit; a draft model with --draft) over an RTT sweep."""
    from aiflow_cli.bench import decode

    bounds = None
    if split is not None:
        parts = _floats(split, "--split")
        if len(parts) != 2 or any(p != int(p) for p in parts):
            raise InputError(f"--split {split!r}: give two stage indices A,B", param="split")
        bounds = (int(parts[0]), int(parts[1]))
    given: dict[str, Any] = {
        "model": model,
        "rtts_ms": _floats(rtt, "--rtt") if rtt is not None else None,
        "tokens": tokens,
        "repeats": repeats,
        "k": k,
        "split": bounds,
        "workdir": workdir,
        "draft": draft,
        "trained": trained,
        "prompt": prompt,
        "replan_requests": replan_requests,
        "precheck": precheck or None,
    }
    cfg = (
        decode.DecodeConfig.quick_config(**given)
        if quick
        else decode.DecodeConfig(**{key: v for key, v in given.items() if v is not None})
    )
    run_bench("bench decode", decode.run, cfg, json_out, _print)


def run_bench(label: str, run: Callable[..., Any], cfg: Any, json_out: bool, show: Callable[[Any], None]) -> None:
    """Runs a benchmark ``run(cfg, progress, command=...)`` under a status line (on stderr with ``--json``), then
    prints its report as JSON or with ``show``."""
    import sys

    out = err_console if json_out else console
    with out.status(label) as status:

        def progress(msg: str) -> None:
            out.log(msg, highlight=False)
            status.update(msg)

        report = run(cfg, progress, command="aiflow " + " ".join(sys.argv[1:]))
    if json_out:
        print_json(report.to_dict())
        return
    show(report)


def print_machine(report: Any) -> None:
    """The run's wall time and the machine's load average (flags a busy machine)."""
    mc = report.machine
    console.print(
        f"{report.wall_s:.0f} s; 1-min load average {mc['load_avg_1min_start']:.1f} -> {mc['load_avg_1min_end']:.1f} "
        f"on {mc['cores']} cores"
        + (" (busy machine: absolute times inflated)" if mc["load_avg_1min_end"] > (mc["cores"] or 1) else ""),
        highlight=False,
    )


def _print(report) -> None:
    from rich import box
    from rich.table import Table

    from aiflow_cli.bench import decode

    t = Table(
        title=f"{report.model}: greedy decoding, {report.config['tokens']} tokens, medians of "
        f"{report.config['repeats']} request(s)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    cols = ["rtt ms", "mode", "tok/s", "vs split", "ttft ms", "accept", "tok/rtrip", "same", "compute ms/token d/e/c"]
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 1 else "right", no_wrap=True)
    split = {r["rtt_ms"]: r["tokens_per_s"] for r in report.runs if r["mode"] == "split"}
    for i, r in enumerate(report.runs):
        last = i == len(report.runs) - 1 or report.runs[i + 1]["rtt_ms"] != r["rtt_ms"]
        c = r["compute_ms_per_token"]
        t.add_row(
            f"{r['rtt_ms']:g}",
            r["mode"],
            f"{r['tokens_per_s']:.2f}",
            f"{r['tokens_per_s'] / split[r['rtt_ms']]:.2f}x" if split.get(r["rtt_ms"]) else "-",
            f"{r['ttft_ms']:.0f}",
            "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}",
            "-" if r["tokens_per_round_trip"] is None else f"{r['tokens_per_round_trip']:.2f}",
            "yes" if r["identical"] else "[red]NO[/]",
            f"{c['device']:.1f}/{c['edge']:.1f}/{c['cloud']:.1f}",
            end_section=last,
        )
    console.print(t)
    for r in report.runs:
        if r["mode"].startswith("spec-precheck-") and r.get("drafted"):
            base = next(
                (
                    b
                    for b in report.runs
                    if b["rtt_ms"] == r["rtt_ms"] and b["mode"] == r["mode"].replace("precheck-", "")
                ),
                None,
            )
            console.print(
                f"edge pre-check, {r['mode']} at {r['rtt_ms']:g} ms: the cloud verified {r['verified']} of "
                f"{r['drafted']} drafts; edge-cloud {r['edge_cloud_bytes_per_token']} B/token"
                + (f" ({base['mode']}: {base['edge_cloud_bytes_per_token']})" if base else ""),
                highlight=False,
            )
    console.print(
        "early-exit acceptance by exit stage (teacher-forced on the prompt; the split's exit is stage "
        f"{report.config['split'][0] - 1}): " + ", ".join(f"{k}: {v:.2f}" for k, v in report.exit_acceptance.items()),
        highlight=False,
    )
    ex = report.exit_training
    if ex and ex.get("path"):
        console.print(
            f"trained exit after block {ex['exit_layer']}: held-out acceptance {ex['acceptance_before']:.2f} "
            f"untrained -> {ex['acceptance_after']:.2f} trained; "
            + (f"trained in this run in {ex['train_s']:.0f} s" if ex.get("trained_now") else "cached")
            + f" ({ex['path']})",
            highlight=False,
        )
    elif ex:
        console.print(f"no trained-exit modes: {ex['why']}", highlight=False)
    for line in decode.describe_bounds(report):
        console.print(line, highlight=False)
    for name, summary in report.plans.items():
        console.print(f"{name}: {summary}", highlight=False)
    if report.replan:
        from aiflow_cli.bench.replan import describe

        console.print(describe(report.replan), highlight=False)
    console.print(f"measured: {report.measured}", highlight=False)
    console.print(f"emulated: {report.emulated}", highlight=False)
    print_machine(report)
    _print_goals(report.goals)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    bench.command("decode")(bench_decode)
