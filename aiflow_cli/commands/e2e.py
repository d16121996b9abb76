"""CLI verb of the end-to-end benchmark: ``aiflow bench e2e``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from aiflow_cli.console import console, err_console, print_json
from aiflow_cli.errors import InputError


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def bench_e2e(
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Model(s), comma-separated (default builtin:vit-gpt2-captioner,smollm2; --quick: builtin:captioner-tiny,smollm2).",
    ),
    links: Optional[str] = typer.Option(
        None,
        "--links",
        help="Device-edge link profiles, comma-separated (default 100kbps,thin-uplink,3g,lte,5g,wifi,lan; --quick: 100kbps,lte).",
    ),
    wan: str = typer.Option("wan", "--wan", help="Edge-cloud link profile (the same for every run)."),
    device_speed: float = typer.Option(0.25, "--device-speed", help="Device speed as a multiple of this CPU."),
    edge_speed: float = typer.Option(1.0, "--edge-speed", help="Edge speed as a multiple of this CPU."),
    cloud_speed: float = typer.Option(
        1.0,
        "--cloud-speed",
        help="Cloud speed as a multiple of this CPU; above 1 by time dilation (an assumption, see docs).",
    ),
    headroom: float = typer.Option(
        1.0,
        "--headroom",
        help="Extra time dilation H >= 1: every tier stretched at least H-fold, so a machine loaded less than H-fold does not show (runs H times longer).",
    ),
    repeats: Optional[int] = typer.Option(
        None,
        "--repeats",
        help="Timed warm requests per configuration (default 7; --quick: 4), after a cold one and a warm-up.",
    ),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", help="Tokens to generate (default 16; --quick: 4)."
    ),
    min_fidelity: float = typer.Option(
        0.99, "--min-fidelity", help="Fidelity floor of the aiflow plan; its measured fidelity is checked against it."
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads of each tier (three tiers share this machine)."),
    budget_s: Optional[float] = typer.Option(
        None,
        "--budget-s",
        help="Seconds of timing per placement and link profile, after which rounds stop (keeping >= 3; default 60, --quick 8).",
    ),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="Keys, cached profile, plans, server logs (default ~/.cache/aiflow/bench-e2e)."
    ),
    image: Optional[Path] = typer.Option(
        None, "--image", help="Image for captioning models (default: the bundled 224x224 sample JPEG, 6.8 KB)."
    ),
    plot_path: Optional[Path] = typer.Option(
        None, "--plot", help="Write latency vs uplink bandwidth (PNG) here (first model)."
    ),
    save: Optional[Path] = typer.Option(None, "--save", help="Also write the --json object to this file."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="CI-sized: tiny captioner and the LLM, two link profiles, few repeats (< 3 min on 2 cores).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (tables and progress go to stderr)."),
) -> None:
    """Four strategies (device-only, cloud-only, raw-split, aiflow) on the real runtime through emulated links."""
    import sys

    from aiflow_cli.links import load_link

    names = tuple(x.strip() for x in links.split(",") if x.strip()) if links is not None else None
    if links is not None and not names:
        raise InputError("--links: give at least one link profile, e.g. --links lte,lan")
    for name in (*(names or ()), wan):  # unknown link profiles and a missing image, before torch is imported
        load_link(name)
    if image is not None and not image.is_file():
        raise InputError(f"--image {image}: no such file")
    from aiflow_cli.bench import e2e

    models = (
        [m.strip() for m in model.split(",") if m.strip()]
        if model
        else list(e2e.QUICK_MODELS if quick else e2e.DEFAULT_MODELS)
    )
    if not models:
        raise InputError("--model: give at least one model")
    cfgs = []
    for m in models:
        given = {
            "model": m,
            "link_names": names,
            "repeats": repeats,
            "max_new_tokens": max_new_tokens,
            "budget_s": budget_s,
            "workdir": workdir,
            "image": image,
            "wan": wan,
            "device_speed": device_speed,
            "edge_speed": edge_speed,
            "cloud_speed": cloud_speed,
            "headroom": headroom,
            "min_fidelity": min_fidelity,
            "threads": threads,
        }
        cfg = (
            e2e.E2EConfig.quick_config(**given)
            if quick
            else e2e.E2EConfig(**{k: v for k, v in given.items() if v is not None})
        )
        cfgs.append(cfg)
    out = err_console if json_out else console
    with out.status("bench e2e") as status:

        def progress(msg: str) -> None:
            out.log(msg, highlight=False)
            status.update(msg)

        report = e2e.run_models(cfgs, progress, command="aiflow " + " ".join(sys.argv[1:]))
    if plot_path is not None:
        e2e.plot(report.runs[0], plot_path)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if json_out:
        print_json(report.to_dict())
        if plot_path is not None:
            err_console.print(f"wrote {plot_path}")
        return
    for r in report.runs:
        _print(r)
    console.print(f"[bold]over all {len(report.runs)} model(s)[/] ({report.wall_s:.0f} s):", highlight=False)
    _print_goals(report.goals)
    if plot_path is not None:
        console.print(f"wrote {plot_path}")


def _print_goals(goals) -> None:
    for g in goals:
        mark = "[green]PASS[/]" if g.met else "[red]MISS[/]"
        console.print(f"{mark} {g.name}: {g.detail}", highlight=False)


def _print(result) -> None:
    from rich import box
    from rich.table import Table

    gen = result.fidelity_metric == "token_agreement"
    metric = "agree" if gen else "cosine"
    d = result.tiers.get("dilation", {}).get("factor", 1)
    unit = f"ms (dilated x{d:g})" if d > 1 else "ms"

    def new_table(title: str, cols: list[str]) -> Table:
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i < 2 else "right", no_wrap=True)
        return t

    t = new_table(
        f"{result.model}: warm requests, {unit}, measured p50/p90 vs predicted",
        ["link", "strategy", "p50", "p90", "pred", "err", metric],
    )
    t2 = new_table(
        f"{result.model}: "
        + ("time to first token, tokens/s, " if gen else "")
        + "cold first request (ms), payload KiB up device->edge",
        ["link", "strategy"] + (["ttft", "pred", "tok/s"] if gen else []) + ["cold", "pred", "KiB up"],
    )
    speedups = []
    for link, prof in result.profiles.items():
        rows = prof["strategies"]
        for i, (s, v) in enumerate(rows.items()):
            up = v["payload_bytes"].get("device-edge", {}).get("up")
            first, last = link if i == 0 else "", i == len(rows) - 1
            t.add_row(
                first,
                s,
                f"{v['p50_ms']:.0f}",
                f"{v['p90_ms']:.0f}",
                f"{v['predicted_ms']:.0f}",
                f"{v['prediction_error']:+.0%}",
                f"{v['fidelity']:.3f}" + ("[red]<floor[/]" if v["fidelity"] < result.config["min_fidelity"] else ""),
                end_section=last,
            )
            cells = [first, s]
            if gen:
                cells += [f"{v['ttft_ms']:.0f}", f"{v['predicted_ttft_ms']:.0f}", f"{v['tokens_per_s']:.1f}"]
            cells += [
                "-" if v.get("cold_ms") is None else f"{v['cold_ms']:.0f}",
                f"{v['predicted_cold_ms']:.0f}",
                "-" if up is None else _kib(up),
            ]
            t2.add_row(*cells, end_section=last)
        base = min(("device-only", "cloud-only", "raw-split"), key=lambda s: rows[s]["p50_ms"])
        speedups.append(
            f"{link} ({prof['link']['uplink_mbps']:g} Mbit/s up, {prof['link']['rtt_ms']:g} ms RTT): "
            f"best baseline {base} {rows[base]['p50_ms']:.0f} ms, aiflow {rows['aiflow']['p50_ms']:.0f} "
            f"ms: {rows[base]['p50_ms'] / rows['aiflow']['p50_ms']:.2f}x"
        )
    console.print(t)
    console.print(t2)
    console.print("placements:", highlight=False)
    first = next(iter(result.profiles.values()))["strategies"]
    console.print(
        f"  device-only: {first['device-only']['plan']}; cloud-only: {first['cloud-only']['plan']}", highlight=False
    )
    for link, prof in result.profiles.items():
        rows = prof["strategies"]
        console.print(
            f"  {link}: raw-split {rows['raw-split']['plan']}; aiflow {rows['aiflow']['plan']}", highlight=False
        )
    for line in speedups:
        console.print(line, highlight=False)
    inp = result.input
    what = f"image {inp['image']}" if "image" in inp else f"text {inp['text']!r}"
    console.print(
        f"input: {what}; uploaded raw: {inp['upload_bytes']:,} bytes (the profile's raw input, before stage 0: "
        f"{inp['profile_input_bytes']:,} bytes)",
        highlight=False,
    )
    dv = result.tiers["device"]
    speed = (
        "not measured"
        if dv["measured_speed_compute"] is None
        else f"measured {dv['measured_speed_compute']:.3f}x on compute, {dv['measured_speed_end_to_end']:.3f}x end to end"
    )
    console.print(
        f"device: {dv['speed']:g}x of this CPU ({speed}); edge: {result.tiers['edge']['how']}; cloud: "
        f"{result.tiers['cloud']['how']}",
        highlight=False,
    )
    console.print(
        "measured: latency, bytes, fidelity; emulated: links, tier speeds; modelled: pred "
        "(the planner's cost model; see --json provenance); cold: first request on new connections",
        highlight=False,
    )
    mc = result.machine
    busy = max(mc["load_avg_1min_start"], mc["load_avg_1min_end"]) > mc["cores"]
    console.print(
        f"{result.server_pairs_started} placements served (servers started once each); {result.wall_s:.0f} s; "
        f"1-min load average {mc['load_avg_1min_start']:g} -> {mc['load_avg_1min_end']:g} on {mc['cores']} "
        f"cores"
        + (
            " [yellow](busy machine: absolute times inflated, the planner's profile was measured "
            "apart; strategies were interleaved, so compare them within this run)[/]"
            if busy
            else ""
        ),
        highlight=False,
    )
    _print_goals(result.goals)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    bench.command("e2e")(bench_e2e)
