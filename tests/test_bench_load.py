"""``aiflow bench load``: a tiny sweep on real edge and cloud processes, with and without batching; JSON shape, no
lost or mixed response, goals computed from the rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from aiflow_cli.bench.load import add_ratios, check_goals
from aiflow_cli.cli import app
from aiflow_cli.errors import InputError


def test_bench_load_tiny_json(tmp_path):
    r = CliRunner().invoke(
        app,
        ["bench", "load", "--devices", "1,4", "--tokens", "2", "--requests", "1", "--workdir", str(tmp_path), "--json"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [(row["devices"], row["batching"]) for row in d["runs"]] == [(1, False), (4, False), (1, True), (4, True)]
    for row in d["runs"]:
        assert row["lost"] == 0 and row["mixed"] == 0
        assert row["tokens"] == row["devices"] * 2
        assert row["tokens_per_s"] > 0 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["edge_rss_bytes"] > 0 and row["cloud_rss_bytes"] > 0
        # one edge->cloud message a token alone; a batched pass's steps share one (never more than one a token)
        if not row["batching"] or row["devices"] == 1:
            assert row["edge_cloud_messages_per_token"] == 1.0
        assert 0 < row["edge_cloud_messages_per_token"] <= 1.0
        assert all(row[f"{p}_cpu_s"] >= 0 for p in ("devices", "edge", "cloud"))
        if row["batching"]:
            plain = next(r for r in d["runs"] if r["devices"] == row["devices"] and not r["batching"])
            assert row["speedup"] == round(row["tokens_per_s"] / plain["tokens_per_s"], 2)
    assert d["config"]["distinct_references"] == 4
    goals = {g["name"]: g for g in d["goals"]}
    assert goals["0 lost or mixed responses"]["met"] is True
    assert any(n.startswith("bounded memory") for n in goals)
    batched = next(g for n, g in goals.items() if "with batching" in n)
    assert batched["met"] is False and batched["detail"].startswith("not measured: the sweep has no 128-device run")


def _row(devices, batching, tps, **kw):
    base = {"devices": devices, "batching": batching, "requests": devices, "lost": 0, "mixed": 0, "tokens_per_s": tps}
    rss = {f"{t}_rss{s}_bytes": 100 for t in ("edge", "cloud") for s in ("", "_start")}
    return {**base, **rss, **kw}


def test_goals_count_lost_and_memory():
    big = _row(8, False, 10.0, mixed=1, cloud_rss_bytes=100 + (300 << 20))
    goals = check_goals([_row(1, False, 5.0), big])
    assert goals[0].met is False and "1 mixed" in goals[0].detail
    assert goals[1].met is False and "unbatched cloud +300.0 MiB" in goals[1].detail


@pytest.mark.parametrize(("batched_tps", "lost", "met"), [(450.0, 0, True), (390.0, 0, False), (450.0, 1, False)])
def test_batching_goal_is_the_measured_ratio_at_128_devices(batched_tps, lost, met):
    runs = [_row(1, False, 10.0), _row(128, False, 100.0), _row(1, True, 10.0), _row(128, True, batched_tps, lost=lost)]
    add_ratios(runs)
    assert runs[3]["speedup"] == batched_tps / 100.0 and runs[2]["speedup"] == 1.0
    goal = check_goals(runs)[2]
    assert goal.met is met and f"{batched_tps / 100:.2f}x" in goal.detail


@pytest.mark.parametrize(
    "args", [["--devices", "1,x"], ["--split", "1"], ["--batch-max", "0"], ["--batch-window-ms", "-1"]]
)
def test_bad_options_are_input_errors(args):
    r = CliRunner().invoke(app, ["bench", "load", *args])
    # the CLI's entry point prints an InputError as one line (exit 3); here it surfaces as the exception
    assert isinstance(r.exception, InputError) and "\n" not in str(r.exception), r.exception
