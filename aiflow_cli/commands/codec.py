"""CLI verbs of the codec: ``aiflow codecs`` and ``aiflow bench codec``."""

from __future__ import annotations

import typer

from aiflow_cli.console import console, err_console, goals_table, print_json, table


def codecs(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the codec specs (each may take +zstdN)."""
    from aiflow_cli import codec  # imports torch: only when needed, so every other verb starts without it

    specs = codec.default_codecs() + ["int4g64", "int8+zstd9"]
    if json_out:
        print_json({"codecs": specs})
        return
    for s in specs:
        console.print(s)


def bench_codec(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (tables go nowhere)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer shapes, codecs and repeats (well under a minute)."),
    repeats: int = typer.Option(0, "--repeats", min=0, help="Timed repeats per measurement (0 = default)."),
) -> None:
    """Codec throughput and fidelity vs torch + python-zstandard, single-threaded, in one run."""
    from aiflow_cli.bench.codec import run

    with err_console.status("measuring") as status:
        result = run(quick=quick, repeats=repeats or None, progress=lambda s: status.update(f"measuring {s}"))
    if json_out:
        print_json(result.to_dict())
        return
    t = table(
        "encode / decode throughput, GB/s of fp32 input, 1 thread (baseline: torch + zstandard)",
        ["shape", "codec", "ratio", "enc aiflow", "enc base", "enc x", "dec aiflow", "dec base", "dec x"],
        left=2,
    )
    for r in result.throughput:
        t.add_row(
            r.shape,
            r.codec,
            f"{r.input_bytes / r.encoded_bytes:.2f}",
            f"{r.aiflow_encode_gbps:.2f}",
            f"{r.baseline_encode_gbps:.2f}",
            f"{r.encode_speedup:.1f}x",
            f"{r.aiflow_decode_gbps:.2f}",
            f"{r.baseline_decode_gbps:.2f}",
            f"{r.decode_speedup:.1f}x",
        )
    console.print(t)
    f = table(
        f"fidelity on real activations: {result.activations}",
        ["codec", "x smaller than fp32", "tensor cos min", "token cos min", "token cos mean", "max abs error"],
        [
            (
                r.codec,
                f"{r.ratio_vs_fp32:.2f}",
                f"{r.tensor_cosine_min:.6f}",
                f"{r.token_cosine_min:.6f}",
                f"{r.token_cosine_mean:.6f}",
                f"{r.max_abs_error:.4g}",
            )
            for r in result.fidelity
        ],
    )
    console.print(f)
    console.print(goals_table(result.targets))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("codecs")(codecs)
    bench.command("codec")(bench_codec)
