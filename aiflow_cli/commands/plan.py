"""CLI verbs of the planner: ``aiflow plan`` and ``aiflow bench plan``. Parsing and printing only; the work is
in :mod:`aiflow_cli.plan`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from aiflow_cli.commands.options import speculate_option
from aiflow_cli.console import console, err_console, print_json, table
from aiflow_cli.errors import InputError
from aiflow_cli.shipped import HARDWARE_DIR, shipped_names

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``2GiB`` -> 2147483648, ``500MB`` -> 500000000, ``1024`` -> 1024."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"{text!r} is not a size: use e.g. 2GiB, 512MiB, 4GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def _pairs(values: list[str], option: str, example: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise InputError(f"{option} {v!r}: expected KEY=VALUE, e.g. {option} {example}")
        k, val = v.split("=", 1)
        if k.strip() in out:
            raise InputError(f"{option} given twice for {k.strip()!r}")
        out[k.strip()] = val.strip()
    return out


def _resolve_profile(name: str) -> str:
    p = Path(name)
    if p.is_file() or "/" in name or p.suffix == ".json":
        return name
    shipped = HARDWARE_DIR / f"{name}.json"
    if shipped.is_file():
        return str(shipped)
    have = ", ".join(shipped_names(HARDWARE_DIR, ".json")) or "none yet"
    raise InputError(f"no profile {name!r}: not a file, nor in profiles/hardware/ ({have}); run aiflow profile first")


def _load_inputs(profile: list[str], speed: list[str], link: list[str]):
    from aiflow_cli.links import load_link
    from aiflow_cli.profile.schema import load_profile

    profiles, sources = {}, {}
    for v in profile:
        tier, path = v.split("=", 1) if "=" in v else ("*", v)
        tier = tier.strip()
        if tier in profiles:
            raise InputError(f"--profile given twice for {'all tiers' if tier == '*' else tier}")
        sources[tier] = _resolve_profile(path.strip())
        profiles[tier] = load_profile(sources[tier])
    speeds = {}
    for tier, val in _pairs(speed, "--speed", "edge=4").items():
        try:
            speeds[tier] = float(val)
        except ValueError:
            raise InputError(f"--speed {tier}={val}: not a number") from None
    links = {name: load_link(path) for name, path in _pairs(link, "--link", "device-edge=lte").items()}
    return profiles, sources, speeds, links


def plan(
    profile: list[str] = typer.Option(
        [],
        "--profile",
        help="TIER=FILE per tier, or one FILE for all tiers with --speed. A bare name looks in profiles/hardware/.",
    ),
    speed: list[str] = typer.Option(
        [], "--speed", help="TIER=X: stage and codec times divided by X (one-profile mode)."
    ),
    link: list[str] = typer.Option(
        [], "--link", help="A-B=NAME|PATH per adjacent tier pair, e.g. device-edge=lte (profiles/links/)."
    ),
    memory: list[str] = typer.Option(
        [], "--memory", help="TIER=SIZE: params + peak activation limit, e.g. device=2GiB."
    ),
    min_fidelity: Optional[float] = typer.Option(
        None,
        "--min-fidelity",
        help="Floor on the profile's fidelity metric (token agreement, embedding cosine), per cut and end to end; the chosen codecs are measured on the calibration set when the model is here.",
    ),
    verify: Optional[bool] = typer.Option(
        None,
        "--verify/--no-verify",
        help="Measure the plan's fidelity end to end (default: when --min-fidelity is given).",
    ),
    objective: str = typer.Option("latency", "--objective", help="latency | generate | throughput."),
    tokens: int = typer.Option(
        0,
        "--tokens",
        min=0,
        help="Tokens generated for --objective generate (the prefill gives the first, then N - 1 decode steps).",
    ),
    codecs: Optional[str] = typer.Option(
        None, "--codecs", help="Comma-separated codecs the solver may use (default: all profiled)."
    ),
    skip_tier: list[str] = typer.Option([], "--skip-tier", help="A tier that must run no stage (it may still relay)."),
    require_tier: list[str] = typer.Option([], "--require-tier", help="A tier that must run at least one stage."),
    input_bytes: Optional[str] = typer.Option(
        None,
        "--input-bytes",
        help="Upload size of one request's input when the device computes nothing, e.g. 7KB for a JPEG (default: the profile's uncoded stage-0 input).",
    ),
    speculate: Optional[str] = speculate_option(
        "price --objective generate with self-speculative decoding (the profile's exit acceptance per stage). "
        "Default off."
    ),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the plan JSON here."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object {plan, explain?, sweep?}."),
    explain: bool = typer.Option(
        False, "--explain", help="Compare with device-only, edge-only, cloud-only and the best raw-codec split."
    ),
    sweep: Optional[str] = typer.Option(
        None, "--sweep", help="LINK=LOW:HIGH Mbit/s: log sweep of that link's uplink; reports where the plan changes."
    ),
    sweep_points: int = typer.Option(25, "--sweep-points", min=2, help="Grid points of --sweep."),
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="PNG of the sweep (default sweep: first link, 1/100x to 100x)."
    ),
) -> None:
    """Choose which tier runs which stages and the codec of each cut (exact DP)."""
    from aiflow_cli.plan.problem import Limits, build_problem
    from aiflow_cli.plan.schema import save_plan
    from aiflow_cli.plan.solver import solve_plan

    profiles, sources, speeds, links = _load_inputs(profile, speed, link)
    limits = Limits(
        memory_bytes={t: parse_bytes(v) for t, v in _pairs(memory, "--memory", "device=2GiB").items()},
        min_fidelity=min_fidelity,
        skip=frozenset(skip_tier),
        require=frozenset(require_tier),
        codecs=tuple(c.strip() for c in codecs.split(",") if c.strip()) if codecs else None,
    )
    if min_fidelity is not None and not (0 < min_fidelity <= 1):
        raise InputError(f"--min-fidelity {min_fidelity}: a fidelity floor must be in (0, 1]")
    problem = build_problem(
        profiles,
        links,
        objective=objective,
        tokens=tokens,
        limits=limits,
        speeds=speeds,
        input_bytes=parse_bytes(input_bytes) if input_bytes is not None else None,
        speculate=speculate,
    )
    with err_console.status("solving") as status:
        # problem: as finally solved, with the (cut, codec) pairs that measured below the floor excluded
        the_plan, problem = solve_plan(problem, sources=sources, verify=verify, log=status.update)
    if output is not None:
        save_plan(the_plan, output)

    doc: dict = {"plan": the_plan.model_dump(mode="json")}
    result_explain = result_sweep = None
    if explain:
        from aiflow_cli.plan.explain import strategies

        result_explain = strategies(problem)
        doc["explain"] = [s.to_dict(problem) for s in result_explain]
    if sweep or plot:
        from aiflow_cli.plan.sweep import parse_range
        from aiflow_cli.plan.sweep import sweep as run_sweep

        if sweep:
            name, lo, hi = parse_range(sweep)
        else:
            if not problem.links:
                raise InputError("--plot sweeps a link, and this problem has one tier: add a tier and --link")
            name, up = problem.link_names[0], problem.links[0].uplink_mbps
            lo, hi = up / 100, up * 100
        with err_console.status(f"sweeping {name}"):
            result_sweep = run_sweep(problem, name, lo, hi, points=sweep_points)
        doc["sweep"] = result_sweep.to_dict(problem)
        if plot:
            from aiflow_cli.plan.plot import plot_sweep

            plot_sweep(problem, result_sweep, plot)
            doc["plot"] = str(plot)

    if json_out:
        print_json(doc)
        return
    _print_plan(the_plan)
    if result_explain is not None:
        _print_explain(problem, result_explain)
    if result_sweep is not None:
        _print_sweep(problem, result_sweep)
    if output is not None:
        console.print(f"plan written to {output}")
    if plot:
        console.print(f"plot written to {plot}")


def _ms(x: float) -> str:
    return "-" if x != x else f"{x:,.1f}"


def _print_plan(p) -> None:
    pred = p.prediction
    head = f"{p.model} ({p.model_hash[:12]}), objective {p.solved_for.objective}"
    if pred.tokens:
        head += f", {pred.tokens} tokens"
    t = Table(title=f"plan: {p.summary()}\n{head}")
    for col in ["tier", "stages", "compute ms", "memory", "limit", "hardware (speed)"]:
        t.add_column(col, justify="left" if col in ("tier", "stages", "hardware (speed)") else "right")
    for tier in p.tiers:
        stages = f"[{tier.start}:{tier.end}) {tier.stages[0]}..{tier.stages[-1]}" if tier.stages else "-"
        lim = "-" if tier.memory_limit_bytes is None else f"{tier.memory_limit_bytes / 2**20:,.0f} MiB"
        t.add_row(
            tier.name,
            stages,
            _ms(tier.compute_ms),
            f"{tier.memory_bytes / 2**20:,.0f} MiB",
            lim,
            f"{tier.profile.hardware} (x{tier.profile.speed:g})",
        )
    console.print(t)
    if p.cuts:
        c = Table(title="cuts")
        for col in ["after stage", "from -> to", "links", "codec", "bytes", "step bytes", "fidelity", "enc+dec ms"]:
            c.add_column(
                col,
                justify="right" if col in ("bytes", "step bytes", "fidelity", "enc+dec ms", "after stage") else "left",
            )
        for cut in p.cuts:
            c.add_row(
                f"{cut.after_stage} ({p.boundary_name(cut.after_stage)})",
                f"{cut.from_tier} -> {cut.to_tier}",
                ", ".join(cut.links),
                cut.codec,
                f"{cut.bytes:,}",
                "-" if cut.decode_step_bytes is None else f"{cut.decode_step_bytes:,}",
                f"{cut.fidelity:.6f}",
                _ms(cut.encode_ms + cut.decode_ms),
            )
        console.print(c)
    b = Table(title="predicted latency per request (ms)")
    b.add_column("term")
    b.add_column("where")
    b.add_column("ms", justify="right")
    for term, d in (
        ("compute", pred.compute_ms),
        ("codec", pred.codec_ms),
        ("transfer", pred.transfer_ms),
        ("rtt/2 per crossing", pred.rtt_ms),
    ):
        for where, ms in d.items():
            if ms > 0:
                b.add_row(term, where, _ms(ms))
    b.add_row("[bold]total[/]", "", f"[bold]{_ms(pred.total_ms)}[/]")
    if pred.tokens:
        b.add_row("  of which prefill", "", _ms(pred.prefill_ms))
        b.add_row("  per token", "", f"{pred.per_token_ms:,.2f}")
    # The pipeline model pipelines one forward pass per request; with generation that is the prefill only.
    b.add_row(
        "pipeline bottleneck" + (" (prefill)" if pred.tokens else ""),
        pred.bottleneck,
        f"{_ms(pred.bottleneck_ms)} ({pred.throughput_rps:,.1f} req/s)",
    )
    console.print(b)
    f = p.fidelity
    line = f"fidelity ({f.metric}): bound {f.bound:.4f} from the profile"
    if f.measured_min is not None:
        line += (
            f"; measured end to end on {f.items} calibration items"
            + (f" x {f.tokens} tokens" if f.tokens else "")
            + f": min {f.measured_min:.4f}, mean {f.measured_mean:.4f}"
        )
    line += f" ({f.status})" + (f": {f.note}" if f.note else "")
    if f.excluded:
        line += f"; excluded after measuring below the floor: {', '.join(f.excluded)}"
    console.print(line, highlight=False)


def _print_explain(problem, rows) -> None:
    from aiflow_cli.plan.explain import ships_input
    from aiflow_cli.plan.strategies import OPTIMAL

    value = "bottleneck ms" if problem.objective == "throughput" else "total ms"
    t = Table(title=f"why this plan ({problem.objective}): predicted ms per request", expand=True)
    for col in ["strategy", "placement", value, "compute", "codec", "transfer", "rtt", "vs plan"]:
        t.add_column(col, justify="left" if col in ("strategy", "placement") else "right")
    best = next(
        (r.evaluation.objective_value(problem.objective) for r in rows if r.name == OPTIMAL and r.evaluation), None
    )
    for r in rows:
        ev = r.evaluation
        if ev is None or not ev.feasible:
            t.add_row(r.name, f"{r.summary(problem)} [red]({r.reason or 'infeasible'})[/]", "-", "", "", "", "", "")
            continue
        v = ev.objective_value(problem.objective)
        ratio = f"{v / best:.2f}x" if best else "-"
        t.add_row(
            r.name,
            r.summary(problem),
            _ms(v),
            _ms(sum(ev.compute_ms.values())),
            _ms(sum(ev.codec_ms.values())),
            _ms(sum(ev.transfer_ms.values())),
            _ms(sum(ev.propagation_ms.values())),
            ratio,
        )
    console.print(t)
    if problem.speculate:
        from aiflow_cli.plan.speculation import describe

        console.print(describe(problem, rows), highlight=False)
    shipping = [f"'{r.name}'" for r in rows if ships_input(r)]
    if shipping:
        # The comparison with cloud-only hinges on this: say what goes up when the device computes nothing.
        what = f" ({problem.input_description})" if problem.input_description else ""
        console.print(
            f"in {', '.join(shipping)} the device computes nothing and sends the request input uncoded, "
            f"as profiled: {problem.input_bytes:,.0f} bytes{what}",
            highlight=False,
        )


def _print_sweep(problem, s) -> None:
    t = Table(title=f"sweep of {s.link} uplink: ms per strategy and the optimal plan")
    short = {"raw-split": "raw split", "aiflow": "plan"}
    t.add_column("Mbit/s", justify="right")
    for x in s.points[0].strategies:
        t.add_column(short.get(x.name, x.name.removesuffix("-only")), justify="right")
    t.add_column("optimal plan", overflow="fold")
    for p in s.points:
        cells = []
        for x in p.strategies:
            ok = x.evaluation is not None and x.evaluation.feasible
            cells.append(_ms(x.evaluation.objective_value(problem.objective)) if ok else "-")
        t.add_row(f"{p.uplink_mbps:.3g}", *cells, p.optimal.summary(problem))
    console.print(t)
    if not s.changes:
        console.print("the optimal plan does not change over this range")
    for c in s.changes:
        console.print(f"at {c.at_mbps:.4g} Mbit/s: {c.before}  =>  {c.after}")


def bench_plan(
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    stages: int = typer.Option(1000, "--stages", min=2, help="Stages of the large synthetic instance."),
    codecs: int = typer.Option(8, "--codecs", min=1, max=8, help="Codecs per cut (large instance)."),
    repeats: int = typer.Option(7, "--repeats", min=1, help="Timed repeats (median reported)."),
) -> None:
    """Solve time of the planner's DP (large synthetic instance) and the DP vs brute force on a small one."""
    from aiflow_cli.bench.plan import run

    with err_console.status("timing the solver"):
        r = run(stages=stages, codecs=codecs, repeats=repeats)
    if json_out:
        print_json(r.to_dict())
        return
    console.print(
        table(
            f"aiflow plan solve time, {r.large_stages} stages x {r.large_tiers} tiers x {r.large_codecs} codecs (median ms)",
            ["case", "ms"],
            [
                ("profiles -> problem arrays", f"{r.build_problem_ms:.2f}"),
                ("DP, latency", f"{r.solve_latency_ms:.2f}"),
                ("DP, latency + memory limits", f"{r.solve_latency_memory_ms:.2f}"),
                ("DP, generate 64 tokens", f"{r.solve_generate_ms:.2f}"),
                ("throughput (binary search of DPs)", f"{r.solve_throughput_ms:.2f}"),
            ],
        )
    )
    console.print(
        table(
            f"baseline: brute force, {r.small_stages} stages x 3 tiers x {r.small_codecs} codecs ({r.small_placements} plans)",
            ["solver", "ms"],
            [
                ("DP", f"{r.small_dp_ms:.3f}"),
                ("brute force", f"{r.small_brute_ms:.3f}"),
                ("brute / DP", f"{r.brute_over_dp:.1f}x"),
                ("same optimum", "yes" if r.small_agree else "[red]NO[/]"),
            ],
        )
    )


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Adds this module's commands to the CLI."""
    app.command("plan")(plan)
    bench.command("plan")(bench_plan)
