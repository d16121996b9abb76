"""Rich tables of a request's measured timings beside the plan's prediction."""

from __future__ import annotations

from rich.table import Table

from aiflow_cli.plan.schema import Plan
from aiflow_cli.runtime.pipeline import RunResult


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def flow_table(plan: Plan, result: RunResult, title: str = "where the request went") -> Table:
    """One row per tier (stages, compute, codec) and per link (bytes, wire time), measured vs predicted."""
    pred = plan.prediction
    t = Table(title=title, title_justify="left")
    for col in ("hop", "runs", "measured ms", "predicted ms", "bytes up", "bytes down"):
        t.add_column(col, justify="left" if col in ("hop", "runs") else "right")
    tm = result.timings
    for tier in plan.tiers:
        rec = tm.tiers.get(tier.name)
        runs = f"[{tier.start}:{tier.end}) {tier.stages[0]}..{tier.stages[-1]}" if tier.end > tier.start else "relay"
        if rec is None:
            t.add_row(tier.name, runs, "-", f"{pred.compute_ms.get(tier.name, 0):.1f}", "", "")
            continue
        measured = f"{rec.compute_ms:.1f}"
        if rec.encode_ms + rec.decode_ms > 0.05:
            measured += f" (+{rec.encode_ms + rec.decode_ms:.1f} codec)"
        t.add_row(tier.name, runs, measured, f"{pred.compute_ms.get(tier.name, 0):.1f}", "", "")
    for name, link in tm.links.items():
        predicted = pred.transfer_ms.get(name, 0.0) + pred.rtt_ms.get(name, 0.0)
        t.add_row(f"link {name}", f"{link.messages} msgs", f"{link.wire_ms:.1f}", f"{predicted:.1f}",
                  _fmt_bytes(link.bytes_up), _fmt_bytes(link.bytes_down))
    t.add_row("[bold]total[/]", result.fallback and "fallback: local" or plan.summary(), f"[bold]{result.total_ms:.1f}[/]",
              f"{pred.total_ms:.1f}", "", "")
    return t
