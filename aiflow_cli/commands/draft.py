"""CLI verb of trained exits: ``aiflow draft train MODEL --exit-layer K`` (the library: aiflow_cli/models/exit_adapter.py)."""

from __future__ import annotations

from typing import Optional

import typer

from aiflow_cli.console import console, err_console, print_json

draft = typer.Typer(
    help="Draft sources for speculative decoding: trained early exits, draft vocabularies.", no_args_is_help=True
)


@draft.command("train")
def train(
    model: str = typer.Argument(..., help="Language model (smollm2, builtin:llama-tiny, a directory, a hub id)."),
    exit_layer: int = typer.Option(
        ..., "--exit-layer", help="Block whose output the exit reads (0-based; the device's last block)."
    ),
    steps: int = typer.Option(300, "--steps", help="Optimiser steps (256 positions each)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation and the batches (same seed: same file)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Adapter rank (default 128, at most the hidden size)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)."),
) -> None:
    """Fit a small exit adapter after block K by self-distillation on the model's own greedy outputs for the
    shipped calibration prompts; saved beside the model cache, used by `aiflow run --speculate` and the profile."""
    from aiflow_cli.models.exit_adapter import DEFAULT_RANK, train_exit

    out = err_console if json_out else console
    with out.status("aiflow draft train") as status:

        def progress(msg: str) -> None:
            status.update(msg)

        r = train_exit(model, exit_layer, steps=steps, seed=seed, rank=rank or DEFAULT_RANK, progress=progress)
    if json_out:
        print_json(r.to_json())
        return
    console.print(
        f"exit after block {r.exit_layer} (stage {r.exit_stage}) of {r.model}: rank {r.rank}, {r.steps} steps, "
        f"{r.train_positions} positions, {r.train_s:.1f} s\n"
        f"KL to the full model (training positions): {r.loss_before:.4f} -> {r.loss_after:.4f}\n"
        f"acceptance on {r.held_out_prompts} held-out prompts (teacher-forced greedy agreement): "
        f"{r.acceptance_before:.1%} untrained -> {r.acceptance_after:.1%} trained\n"
        f"saved {r.path} ({r.param_bytes / 1024:.0f} KiB of weights, sha256 {r.sha256[:16]})",
        highlight=False,
    )


@draft.command("vocab")
def vocab(
    model: str = typer.Argument(..., help="Language model (smollm2, builtin:llama-tiny, a directory, a hub id)."),
    tokens: int = typer.Option(32, "--tokens", min=1, max=512, help="Greedy tokens generated per calibration text."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (progress goes to stderr)."),
) -> None:
    """Count the draft vocabulary: tokens ranked by how often the full model's greedy output is each one on the
    shipped calibration texts; `--draft exit:N` (or auto:N, untrained:N) then drafts from the N most frequent."""
    from aiflow_cli.models.exit_adapter import build_vocab

    out = err_console if json_out else console
    with out.status("aiflow draft vocab") as status:
        v, path, seconds = build_vocab(model, tokens=tokens, progress=status.update)
    m = v.meta
    if json_out:
        print_json({"path": str(path), "seconds": seconds, **m})
        return
    cover = ", ".join(f"{n}: {c:.1%}" for n, c in m["held_out_coverage"].items() if c is not None)
    console.print(
        f"draft vocabulary of {m['model']}: {m['counted_positions']} greedy tokens counted, {m['distinct_tokens']} "
        f"distinct of {m['vocab_size']}; {seconds:.1f} s\n"
        f"held-out greedy tokens inside the N most frequent ({m['held_out_positions']} positions): {cover}\n"
        f"saved {path}",
        highlight=False,
    )


@draft.command("cost")
def cost(
    model: str = typer.Argument("smollm2", help="Language model (default smollm2)."),
    device_end: Optional[int] = typer.Option(
        None, "--device-end", help="Stages the device holds, [0:A) (default: bench decode's, every block but the last)."
    ),
    rtt: str = typer.Option("40,100", "--rtt", help="RTTs (ms, comma-separated) to state the speed-up bound at."),
    tokens: int = typer.Option(32, "--tokens", min=1, max=256, help="Greedy tokens per held-out prompt."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What a draft costs the device and how often it is accepted, per draft option (the exit after the device's
    last block, with a truncated vocabulary, a trained adapter, earlier exits), and the speed-up over the
    non-speculative split they bound at each RTT (one torch thread, this machine)."""
    import torch

    from aiflow_cli.bench.decode import describe_costs, draft_costs
    from aiflow_cli.commands.decode import _floats
    from aiflow_cli.errors import InputError
    from aiflow_cli.models import load_stages
    from aiflow_cli.models.exit_adapter import HELD_OUT
    from aiflow_cli.profile.calibration import load_calibration

    rtts = _floats(rtt, "--rtt")
    if not rtts or any(not r >= 0 for r in rtts):
        raise InputError(f"--rtt {rtt!r}: give one or more RTTs >= 0 ms", param="rtt")
    torch.set_num_threads(1)
    full = load_stages(model)
    n = full.num_stages
    end = n - 2 if device_end is None else device_end
    if not 2 <= end <= n - 2 or full.stages[end - 1].kind != "block":
        raise InputError(
            f"--device-end {end}: the device's last stage must be a block (2..{n - 2})", param="device_end"
        )
    c = draft_costs(full, end, list(load_calibration().prompts[-HELD_OUT:]), tokens, rtts)
    if json_out:
        print_json(c)
        return
    for line in describe_costs(c):
        console.print(line, highlight=False)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.add_typer(draft, name="draft")
