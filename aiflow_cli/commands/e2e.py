"""CLI verb of the end-to-end benchmark: ``aiflow bench e2e``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from aiflow_cli.console import console, err_console, print_json, table
from aiflow_cli.errors import InputError


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def bench_e2e(
    model: Optional[str] = typer.Option(None, "--model", help="Model (default builtin:vit-gpt2-captioner; --quick: builtin:captioner-tiny). Also builtin:gpt2, minilm."),
    links: Optional[str] = typer.Option(None, "--links", help="Device-edge link profiles, comma-separated (default thin-uplink,3g,lte,5g,wifi,lan; --quick: lte,lan)."),
    wan: str = typer.Option("wan", "--wan", help="Edge-cloud link profile (the same for every run)."),
    device_speed: float = typer.Option(0.25, "--device-speed", help="Emulated device speed as a share of this CPU (0 < x <= 1): compute stretched by 1/x."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed requests per configuration (default 7; --quick: 5), after 2 warm-ups."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens to generate (default 16)."),
    min_fidelity: float = typer.Option(0.99, "--min-fidelity", help="Cosine floor of the aiflow plan; its measured fidelity is checked against it."),
    threads: int = typer.Option(1, "--threads", help="torch threads of each tier (three tiers share this machine)."),
    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="Seconds of timing per placement and link profile, after which rounds stop (keeping >= 3; default 60, --quick 15)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keys, cached profile, plans, server logs (default ~/.cache/aiflow/bench-e2e)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image for captioning models (default: the bundled 224x224 sample JPEG, 6.8 KB)."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write latency vs uplink bandwidth (PNG) here."),
    save: Optional[Path] = typer.Option(None, "--save", help="Also write the --json object to this file."),
    quick: bool = typer.Option(False, "--quick", help="CI-sized: tiny model, two link profiles, few repeats (< 3 min on 2 cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (tables and progress go to stderr)."),
) -> None:
    """Four strategies (device-only, cloud-only, best raw split, aiflow) on the real runtime through emulated links."""
    from aiflow_cli.bench import e2e

    names = tuple(x.strip() for x in links.split(",") if x.strip()) if links is not None else None
    if links is not None and not names:
        raise InputError("--links: give at least one link profile, e.g. --links lte,lan")
    given = {"model": model, "links": names, "repeats": repeats, "max_new_tokens": max_new_tokens, "budget_s": budget_s,
             "workdir": workdir, "image": image, "wan": wan, "device_speed": device_speed,
             "min_fidelity": min_fidelity, "threads": threads}
    if quick:
        cfg = e2e.E2EConfig.quick_config(**given)
    else:
        cfg = e2e.E2EConfig(**{k: v for k, v in given.items() if v is not None})
    out = err_console if json_out else console
    with out.status("bench e2e") as status:
        def progress(msg: str) -> None:
            out.log(msg, highlight=False)
            status.update(msg)

        result = e2e.run(cfg, progress)
    if plot_path is not None:
        e2e.plot(result, plot_path)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if json_out:
        print_json(result.to_dict())
        if plot_path is not None:
            err_console.print(f"wrote {plot_path}")
        return
    _print(result)
    if plot_path is not None:
        console.print(f"wrote {plot_path}")


def _print(result) -> None:
    metric = "agree" if result.fidelity_metric == "token_agreement" else "cosine"
    t = table(f"{result.model}: ms per request, measured p50/p90 vs predicted; payload KiB up device->edge",
              ["link", "strategy", "p50", "p90", "pred", "err", "KiB up", metric], left=2)
    plans = table("placements (stages [start:end) per tier, codec per cut)", ["link", "raw-split", "aiflow"])
    speedups = []
    for link, prof in result.profiles.items():
        rows = prof["strategies"]
        for i, (s, v) in enumerate(rows.items()):
            up = v["payload_bytes"].get("device-edge", {}).get("up")
            t.add_row(link if i == 0 else "", s, f"{v['p50_ms']:.0f}", f"{v['p90_ms']:.0f}", f"{v['predicted_ms']:.0f}",
                      f"{v['prediction_error']:+.0%}", "-" if up is None else _kib(up), f"{v['fidelity']:.4f}",
                      end_section=i == len(rows) - 1)
        plans.add_row(link, rows["raw-split"]["plan"], rows["aiflow"]["plan"])
        base = min(("device-only", "cloud-only", "raw-split"), key=lambda s: rows[s]["p50_ms"])
        speedups.append(f"{link} ({prof['link']['uplink_mbps']:g} Mbit/s up, {prof['link']['rtt_ms']:g} ms RTT): best "
                        f"baseline {base} {rows[base]['p50_ms']:.0f} ms, aiflow {rows['aiflow']['p50_ms']:.0f} ms: "
                        f"{rows[base]['p50_ms'] / rows['aiflow']['p50_ms']:.2f}x")
    console.print(t)
    first = next(iter(result.profiles.values()))["strategies"]
    console.print(f"device-only: {first['device-only']['plan']}; cloud-only: {first['cloud-only']['plan']}", highlight=False)
    console.print(plans)
    for line in speedups:
        console.print(line, highlight=False)
    inp = result.input
    what = f"image {inp['image']}" if "image" in inp else f"text {inp['text']!r}"
    console.print(f"input: {what}; uploaded raw: {inp['upload_bytes']:,} bytes (uncoded stage-0 input: "
                  f"{inp['profile_input_bytes']:,} bytes)", highlight=False)
    d = result.tiers["device"]
    speed = ("not measured" if d["measured_speed_compute"] is None else
             f"measured {d['measured_speed_compute']:.3f}x on compute, {d['measured_speed_end_to_end']:.3f}x end to end")
    console.print(f"device: {d['speed']:g}x of this CPU ({speed}); edge: {result.tiers['edge']['how']}; cloud: "
                  f"{result.tiers['cloud']['how']}", highlight=False)
    console.print("measured: latency, bytes, fidelity; emulated: links, device slowness; modelled: pred "
                  "(the planner's cost model; see --json provenance)", highlight=False)
    mc = result.machine
    busy = max(mc["load_avg_1min_start"], mc["load_avg_1min_end"]) > mc["cores"]
    console.print(f"{result.server_pairs_started} placements served (servers started once each); {result.wall_s:.0f} s; "
                  f"1-min load average {mc['load_avg_1min_start']:g} -> {mc['load_avg_1min_end']:g} on {mc['cores']} "
                  f"cores" + (" [yellow](busy machine: absolute times inflated, the planner's profile was measured "
                              "apart; strategies were interleaved, so compare them within this run)[/]" if busy else ""),
                  highlight=False)
    for g in result.goals:
        mark = "[green]PASS[/]" if g.met else "[red]MISS[/]"
        console.print(f"{mark} {g.name}: {g.detail}", highlight=False)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    bench.command("e2e")(bench_e2e)
