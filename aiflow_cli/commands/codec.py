"""CLI verbs of the codec: ``aiflow codecs`` and ``aiflow bench codec``."""

from __future__ import annotations

import typer
from rich.table import Table

from aiflow_cli import codec
from aiflow_cli.console import console, err_console, print_json


def codecs(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the codec specs (each may take +zstdN)."""
    specs = codec.default_codecs() + ["int4g64", "int8+zstd9"]
    if json_out:
        print_json({"codecs": specs})
        return
    for s in specs:
        console.print(s)


def bench_codec(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (tables go nowhere)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer shapes, codecs and repeats (about a minute)."),
    repeats: int = typer.Option(0, "--repeats", min=0, help="Timed repeats per measurement (0 = default)."),
) -> None:
    """Codec throughput and fidelity vs torch + python-zstandard, single-threaded, in one run."""
    from aiflow_cli.bench.codec import run

    with err_console.status("measuring") as status:
        result = run(quick=quick, repeats=repeats or None, progress=lambda s: status.update(f"measuring {s}"))
    if json_out:
        print_json(result.to_dict())
        return
    t = Table(title="encode / decode throughput, GB/s of fp32 input, 1 thread (baseline: torch + zstandard)")
    for col in ["shape", "codec", "ratio", "enc aiflow", "enc base", "enc x", "dec aiflow", "dec base", "dec x"]:
        t.add_column(col, justify="right" if col not in ("shape", "codec") else "left")
    for r in result.throughput:
        t.add_row(
            r.shape, r.codec, f"{r.input_bytes / r.encoded_bytes:.2f}",
            f"{r.aiflow_encode_gbps:.2f}", f"{r.baseline_encode_gbps:.2f}", f"{r.encode_speedup:.1f}x",
            f"{r.aiflow_decode_gbps:.2f}", f"{r.baseline_decode_gbps:.2f}", f"{r.decode_speedup:.1f}x",
        )
    console.print(t)
    f = Table(title=f"fidelity on real activations: {result.activations}")
    for col in ["codec", "x smaller than fp32", "cosine min", "cosine mean", "max abs error"]:
        f.add_column(col, justify="right" if col != "codec" else "left")
    for r in result.fidelity:
        f.add_row(r.codec, f"{r.ratio_vs_fp32:.2f}", f"{r.cosine_min:.6f}", f"{r.cosine_mean:.6f}", f"{r.max_abs_error:.4g}")
    console.print(f)
    g = Table(title="goals")
    g.add_column("goal")
    g.add_column("measured")
    g.add_column("met")
    for name, v in result.targets.items():
        measured = ", ".join(f"{k.removeprefix('measured_')}={val:.3f}" for k, val in v.items() if k != "met")
        g.add_row(name, measured, "yes" if v["met"] else "[red]no[/]")
    console.print(g)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("codecs")(codecs)
    bench.command("codec")(bench_codec)
