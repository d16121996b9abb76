"""Rich tables of a request's measured timings beside the plan's prediction."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
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
        predicted = pred.transfer_ms.get(name, 0.0) + pred.rtt_ms.get(name, 0.0) + pred.message_ms.get(name, 0.0)
        t.add_row(
            f"link {name}",
            f"{link.messages} msgs",
            f"{link.wire_ms:.1f}",
            f"{predicted:.1f}",
            _fmt_bytes(link.bytes_up),
            _fmt_bytes(link.bytes_down),
        )
    t.add_row(
        "[bold]total[/]",
        result.fallback and "fallback: local" or plan.summary(),
        f"[bold]{result.total_ms:.1f}[/]",
        f"{pred.total_ms:.1f}",
        "",
        "",
    )
    return t


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f}"


def _err(pred: float, measured: float) -> str:
    return f"{(pred - measured) / measured:+.0%}" if measured > 0 else "-"


def print_demo(out: dict[str, Any], console: Console) -> None:
    """The demo's result for people, in 80 columns: the answer, one row per strategy (warm latency, time to
    first token, tokens/s, cold first request, agreement; prediction beside measurement), bytes per link, the
    placements, and the verdict."""
    from aiflow_cli.plan.strategies import OPTIMAL

    s = out["strategies"]
    a = s[OPTIMAL]
    when = f", {out['time']}" if out["dilation"] > 1 else ""
    if a.get("text") is not None:
        what = "" if out.get("has_tokenizer") else "random weights: the text is noise, compare agreement"
        console.print(f"[bold]answer[/] (aiflow){' (' + what + ')' if what else ''}:", highlight=False)
        console.print(f"  {a['text'][0].strip()}", highlight=False, markup=False)
    gen = "ttft_ms" in a and a.get("tokens") is not None
    t = Table(
        title=f"warm requests, median of {len(a['samples_ms'])} (ms{when})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    cols = ["strategy", "warm", "pred", "err"] + (["ttft", "pred", "err", "tok/s"] if gen else []) + ["agree"]
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for name, e in s.items():
        flag = "[red] below floor[/]" if e.get("below_floor") else ""
        agree = "-" if e.get("agreement") is None else f"{e['agreement']:.3f}{flag}"
        row = [name, f"{e['warm_ms']:.0f}", f"{e['predicted_ms']:.0f}", _err(e["predicted_ms"], e["warm_ms"])]
        if gen:
            row += [
                f"{e['ttft_ms']:.0f}",
                f"{e['predicted_ttft_ms']:.0f}",
                _err(e["predicted_ttft_ms"], e["ttft_ms"]),
                f"{e['tokens_per_s']:.1f}",
            ]
        row += [agree]
        t.add_row(*row, style="bold" if name == OPTIMAL else None)
    console.print(t)
    b = Table(
        title="cold first request (ms); KiB and messages per request on device-edge (d-e) and edge-cloud (e-c)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    for i, c in enumerate(["strategy", "cold", "pred", "d-e up", "down", "msgs", "e-c up", "down", "msgs"]):
        b.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    for name, e in s.items():
        cells = [name, f"{e['cold_ms']:.0f}", f"{e['predicted_cold_ms']:.0f}"]
        for link in ("device-edge", "edge-cloud"):
            x = e["links"].get(link)
            cells += ["-", "-", "0"] if x is None else [_kib(x["up"]), _kib(x["down"]), str(x["messages"])]
        b.add_row(*cells)
    console.print(b)
    console.print("placements:", highlight=False)
    for name, e in s.items():
        same = f" ({e['measured_as']}: measured once)" if e.get("measured_as") else ""
        console.print(f"  {name}: {e['plan']}{same}", highlight=False)
    for name, reason in out.get("infeasible", {}).items():
        console.print(f"  {name}: infeasible: {reason}", highlight=False)
    sp = out["speeds"]
    console.print(
        f"tiers: device {sp['device']:g}x, edge {sp['edge']:g}x, cloud {sp['cloud']:g}x this CPU; links "
        f"{out['links']['device-edge']} + {out['links']['edge-cloud']}",
        highlight=False,
    )
    if out["dilation"] > 1:
        d = out["dilation"]
        console.print(
            f"time dilation x{d:g}: a tier of speed s ran with its compute stretched to {d:g}/s times its "
            f"CPU time, the links {d:g}x slower; every time above is measured / {d:g}",
            highlight=False,
        )
    if out.get("cloud_speed_note"):
        console.print(f"cloud speed: {out['cloud_speed_note']}", highlight=False)
    o = out["overheads"]
    console.print(
        f"cost model: + {o['message_ms']:.2f} ms per message round trip, handshake {o['handshake_ms']:.1f} "
        f"ms + 1 RTT per connection (calibrated on this machine; dilated); cold = first request on new "
        f"connections",
        highlight=False,
    )
    floor = out.get("min_fidelity")
    low = [k for k, e in s.items() if e.get("below_floor")]
    if floor is not None:
        console.print(
            f"agreement with the monolithic model; floor {floor:g} for aiflow: "
            + ("[red]below the floor: " + ", ".join(low) + "[/]" if low else "all at or above"),
            highlight=False,
        )
    v = out["verdict"]
    mark = "[green]aiflow fastest or tied[/]" if v["fastest"] else "[red]aiflow slower[/]"
    console.print(f"{mark}: {v['detail']}", highlight=False)
    if out.get("private"):
        print_private(out["private"], console)


def print_private(pv: dict[str, Any], console: Console) -> None:
    """The split that keeps the prompt on the device, plain and with the device drafting."""
    t = Table(
        title="keeping the prompt on the device (" + pv["definition"].split(": ")[0] + ")",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    for i, c in enumerate(["run", "warm", "pred", "ttft", "tok/s", "msgs d-e", "accepted", "agree"]):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    skipped = []
    for name in ("private", "private+spec"):
        e = pv.get(name) or {}
        if "skipped" in e:
            skipped.append(f"  {name}: not run: {e['skipped']}")
            continue
        spec = e.get("speculation") or {}
        acc = spec.get("acceptance")
        de = e["links"].get("device-edge")
        t.add_row(
            name,
            f"{e['warm_ms']:.0f}",
            f"{e['predicted_ms']:.0f}",
            f"{e['ttft_ms']:.0f}",
            f"{e['tokens_per_s']:.1f}",
            "-" if de is None else str(de["messages"]),
            "-" if acc is None else f"{acc:.0%}",
            "-" if e.get("agreement") is None else f"{e['agreement']:.3f}",
        )
    console.print(t)
    p = pv.get("private") or {}
    if "plan" in p:
        same = f" ({p['measured_as']}: measured once)" if p.get("measured_as") else ""
        console.print(f"  private: {p['plan']}{same}; pred: the plan's, speculation not modelled", highlight=False)
    for line in skipped:
        console.print(line, highlight=False)
