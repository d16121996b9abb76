"""CLI verbs of the models part: ``aiflow models`` and ``aiflow profile MODEL``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from aiflow_cli.console import console, err_console, print_json
from aiflow_cli.errors import InputError
from aiflow_cli.profile.settings import ProfileSettings

_TABLE_CODECS = ["fp16", "int8", "int4"]


def models(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the models that work offline (built-ins with random weights; smollm2 and minilm with real weights)."""
    from aiflow_cli.models import list_builtins

    items = list_builtins()
    if json_out:
        print_json({"models": items})
        return
    t = Table(title="models (also: a local directory, or a Hugging Face hub id: downloaded unless HF_HUB_OFFLINE=1)")
    t.add_column("name", no_wrap=True)
    t.add_column("weights", no_wrap=True)
    t.add_column("description")
    for it in items:
        t.add_row(it["name"], it["weights"], it["description"])
    console.print(t)


def _kb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1024:,.1f}"


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def parse_cuts(spec: Optional[str]) -> Optional[tuple[int, ...] | str]:
    """``--fidelity-cuts``: None (all), ``0,4,8`` or ``every:N`` (passed on as is; the profiler knows the cuts)."""
    if spec is None or spec.strip() == "all":
        return None
    if spec.startswith("every:"):
        return spec
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--fidelity-cuts {spec!r}: give cut indices like 0,4,8, or every:N, or all") from None


def print_profile(p) -> None:
    """The stage and cut tables of a profile (for people)."""
    s = p.settings
    shape = (
        f"batch {s.batch}"
        + (f", seq {s.seq_len}" if s.seq_len else "")
        + (f", image {s.image_size}px" if s.image_size else "")
    )
    title = (
        f"{p.model} ({p.family}, {p.task}) on {p.hardware.device} [{p.hardware.cpu}, {p.hardware.cores} cores"
        + (f", {p.hardware.gpu}" if p.hardware.gpu else "")
        + f"], {s.dtype}, {shape}"
        + (f", decode step at {s.decode_tokens} cached tokens" if s.decode_tokens else "")
    )
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for col in ["#", "stage", "params MB", "prefill ms", "p90", "decode ms", "p90", "peak act KB"]:
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for st in p.stages:
        t.add_row(
            str(st.index),
            st.name,
            f"{st.param_bytes / 1e6:.1f}",
            _ms(st.prefill_ms),
            _ms(st.prefill_p90_ms),
            _ms(st.decode_ms),
            _ms(st.decode_p90_ms),
            _kb(st.peak_activation_bytes),
        )
    console.print(t)
    shown = [c for c in _TABLE_CODECS if any(c in cut.codecs for cut in p.cuts)]
    cal = p.calibration
    c = Table(
        title="cuts: KB crossing after stage # (raw, by role; per decode step), and per codec: KB sent, "
        f"{cal.metric} min / mean over {cal.items} {cal.source} items",
        box=box.SIMPLE_HEAD,
    )
    for col in ["after", "hidden", "side", "ctrl", "step"] + shown:
        c.add_column(col, justify="right", no_wrap=True)
    for cut in p.cuts:
        by_role = {r: sum(t.bytes for t in cut.tensors if t.role == r) for r in ("hidden", "side", "control")}
        cells = []
        for name in shown:
            r = cut.codecs.get(name)
            cells.append("-" if r is None else f"{_kb(r.bytes)}\n{r.fidelity.min:.4f} / {r.fidelity.mean:.4f}")
        c.add_row(
            str(cut.after_stage),
            _kb(by_role["hidden"]) if by_role["hidden"] else "-",
            _kb(by_role["side"]) if by_role["side"] else "-",
            _kb(by_role["control"]),
            _kb(cut.codecs["raw"].decode_step_bytes),
            *cells,
        )
    console.print(c)
    console.print(
        f"input {_kb(p.input_bytes)} KB before stage 0 ({p.input.description}); output {p.output.bytes} bytes "
        f"({p.output.description}); profiled in {p.profile_wall_s:.1f} s"
    )
    console.print(
        f"fidelity: {cal.metric} against {cal.reference}"
        + (f" (exact model vs reference: {cal.reference_min:.6f} lowest item)" if cal.reference_min is not None else "")
        + (f", {cal.tokens} tokens per item" if cal.tokens else "")
        + f"; lossy codecs measured at {len(cal.measured_cuts)} of {len(p.cuts)} cuts, in {cal.wall_s:.1f} s",
        highlight=False,
    )


def profile(
    model: str = typer.Argument(
        ..., help="builtin:<name>, smollm2, minilm, a local directory, or a Hugging Face hub id."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option(ProfileSettings.dtype, "--dtype", help="float32, float16 or bfloat16."),
    batch: int = typer.Option(1, "--batch", help="Batch size."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default: the model's)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image side in pixels (vision models)."),
    decode_tokens: Optional[int] = typer.Option(
        None, "--decode-tokens", help="KV-cache length of the profiled decode step (default 32 for LMs; 0: skip)."
    ),
    codecs: Optional[str] = typer.Option(None, "--codecs", help="Comma-separated codec specs (default: all)."),
    repeats: int = typer.Option(ProfileSettings.repeats, "--repeats", help="Timed repetitions per measurement."),
    warmup: int = typer.Option(ProfileSettings.warmup, "--warmup", help="Untimed repetitions first."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the profile JSON here."),
    label: str = typer.Option("", "--label", help="Name of this machine, recorded in the profile."),
    json_out: bool = typer.Option(False, "--json", help="Print the profile JSON on stdout."),
    calibration_items: Optional[int] = typer.Option(
        None, "--calibration-items", help="Fidelity on the first N calibration items (default: all)."
    ),
    calibration_tokens: int = typer.Option(
        ProfileSettings.calibration_tokens,
        "--calibration-tokens",
        help="Generated tokens per item that fidelity is measured on (LMs, captioners).",
    ),
    fidelity_cuts: Optional[str] = typer.Option(
        None,
        "--fidelity-cuts",
        help="Cuts where lossy codecs are measured: comma-separated indices, or every:N (default: all).",
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        min=1,
        help="torch intra-op threads (default: torch's; tiers that share a machine run with 1, and with 1 the stages are timed in thread CPU time, robust to other load).",
    ),
) -> None:
    """Profile a model on this hardware: per-stage latency and memory, per-cut bytes and fidelity per codec."""
    codec_list = tuple(c.strip() for c in codecs.split(",") if c.strip()) if codecs else None
    # checked before torch is imported and the model loaded: a bad flag is answered at once
    settings = ProfileSettings(
        device=device, dtype=dtype, batch=batch, seq_len=seq_len, image_size=image_size, decode_tokens=decode_tokens,
        codecs=codec_list, repeats=repeats, warmup=warmup, calibration_items=calibration_items,
        calibration_tokens=calibration_tokens, fidelity_cuts=parse_cuts(fidelity_cuts),
    ).check()  # fmt: skip
    from aiflow_cli.profile import profile_model, save_profile  # (imports torch and the models)

    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("loading model", total=1)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        prof = profile_model(model, settings, label=label, progress=progress)
    if output is not None:
        save_profile(prof, output)
    if json_out:
        print_json(prof.model_dump(mode="json"))
        if output is not None:
            err_console.print(f"wrote {output}")
        return
    print_profile(prof)
    if output is not None:
        console.print(f"wrote {output}")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("models")(models)
    app.command("profile")(profile)
