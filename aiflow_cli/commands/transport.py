"""CLI verbs of the transport: ``aiflow keygen``, ``aiflow netem`` and ``aiflow bench transport``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from aiflow_cli.console import console, err_console, goals_table, print_json, table


def keygen(
    out: Path = typer.Option(..., "--out", help="Directory for node.key and node.crt (created; never overwritten)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a node identity (key + self-signed certificate) and print its SHA-256 fingerprint to pin on peers."""
    from aiflow_cli.transport import Identity

    ident = Identity.generate(out)
    if json_out:
        print_json({"fingerprint": ident.fingerprint, "cert": str(ident.cert_path), "key": str(ident.key_path)})
        return
    console.print(ident.fingerprint, highlight=False)
    err_console.print(f"wrote {ident.cert_path} and {ident.key_path}; give peers the fingerprint above to trust")


def netem(
    listen: str = typer.Option(..., "--listen", help="UDP address clients send to, e.g. 127.0.0.1:4500."),
    forward: str = typer.Option(..., "--forward", help="UDP address of the server behind the link."),
    link: str = typer.Option("lte", "--link", help="Link profile name (lte, wifi, ...) or path to a .toml."),
    duration_s: Optional[float] = typer.Option(None, "--duration-s", min=0, help="Stop after this many seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the loss and jitter draws."),
    json_out: bool = typer.Option(False, "--json", help="Print the final counters as JSON."),
) -> None:
    """Relay UDP through an emulated link (rate, delay, jitter, loss, queue per direction) until stopped."""
    from aiflow_cli import netem as netem_lib

    def started(emu) -> None:
        lk = emu.link
        err_console.print(
            f"netem {lk.name}: {emu.address} -> {forward}; up {lk.uplink_mbps} Mbit/s, down {lk.downlink_mbps} Mbit/s, "
            f"rtt {lk.rtt_ms} ms, jitter {lk.jitter_ms} ms, loss {lk.loss_pct} %, queue {lk.queue_ms} ms"
            + ("" if duration_s is not None else "; Ctrl-C to stop"),
            highlight=False,
        )

    stats = netem_lib.run(listen, forward, link, duration_s=duration_s, seed=seed, on_start=started)
    if json_out:
        print_json(stats)
        return
    for direction in ("uplink", "downlink"):
        s = stats[direction]
        console.print(
            f"{direction}: {s['packets_out']}/{s['packets_in']} datagrams delivered, {s['lost']} lost, "
            f"{s['queue_drops']} queue drops, {s['too_big']} too big",
            highlight=False,
        )


def bench_transport(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (tables go nowhere)."),
    quick: bool = typer.Option(False, "--quick", help="Shorter measurements (well under a minute)."),
) -> None:
    """aiflow QUIC vs plain TCP, TLS over TCP and gRPC on loopback, plus QUIC through the link emulator."""
    from aiflow_cli.bench.transport import run

    with err_console.status("measuring") as status:
        result = run(quick=quick, progress=lambda s: status.update(f"measuring {s}"))
    if json_out:
        print_json(result.to_dict())
        return
    sizes = list(dict.fromkeys(r.size for r in result.throughput))
    t = table("throughput, GB/s, one request at a time (payload there, small ack back)", ["transport", *sizes])
    for name in dict.fromkeys(r.transport for r in result.throughput):
        t.add_row(
            name, *[f"{r.gbps:.3f}" for s in sizes for r in result.throughput if r.transport == name and r.size == s]
        )
    console.print(t)
    console.print(
        table(
            "round trip of a 4 KiB echo: microseconds; per round trip, CPU microseconds and context switches "
            "of the process (client and server)",
            ["transport", "p50", "p99", "cpu", "switches"],
            [
                (
                    row.transport,
                    f"{row.p50_us:.0f}",
                    f"{row.p99_us:.0f}",
                    f"{row.cpu_us:.0f}",
                    "-" if row.switches is None else f"{row.switches:.1f}",
                )
                for row in result.rtt
            ],
        )
    )
    keys = list(next(iter(result.ratios.values())).keys())
    console.print(
        table(
            "aiflow-quic / baseline (throughput ratio; round-trip speedup)",
            ["baseline", *keys],
            [
                (base.removeprefix("aiflow_vs_"), *[f"{row[k]:.2f}" for k in keys])
                for base, row in result.ratios.items()
            ],
        )
    )
    if result.quic_path:
        p = result.quic_path
        console.print(
            f"aiflow-quic on loopback: {p['mtu_bytes']} B datagrams (found by MTU discovery), "
            f"{result.congestion} congestion control",
            highlight=False,
        )
    if result.netem is not None:
        n = result.netem
        lk = n.link
        link = (
            f"{lk['uplink_mbps']:g}/{lk['downlink_mbps']:g} Mbit/s, {lk['rtt_ms']:g} ms RTT, {lk['loss_pct']:g}% loss, "
            f"{lk['queue_ms']:g} ms queue"
        )
        console.print(
            f"through the emulator ({link}): goodput {n.goodput_mbps:.2f} Mbit/s = {n.goodput_pct_of_rate:.1f}% of the "
            f"rate; one 4 MiB activation {n.activation_s:.2f} s vs ideal {n.activation_ideal_s:.2f} s "
            f"({n.activation_vs_ideal:.2f}x); {n.congestion} congestion control, {n.transfer_queue_drops} queue drops, "
            f"{n.path.get('mtu_bytes', '?')} B datagrams",
            highlight=False,
        )
    console.print(goals_table(result.targets))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("keygen")(keygen)
    app.command("netem")(netem)
    bench.command("transport")(bench_transport)
