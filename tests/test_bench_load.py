"""``aiflow bench load``: a tiny sweep on real edge and cloud processes; JSON shape, no lost or mixed response."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from aiflow_cli.bench.load import check_goals
from aiflow_cli.cli import app


def test_bench_load_tiny_json(tmp_path):
    r = CliRunner().invoke(
        app,
        ["bench", "load", "--devices", "1,4", "--tokens", "2", "--requests", "1", "--workdir", str(tmp_path), "--json"],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [row["devices"] for row in d["runs"]] == [1, 4]
    for row in d["runs"]:
        assert row["batching"] is False
        assert row["lost"] == 0 and row["mixed"] == 0
        assert row["tokens"] == row["devices"] * 2
        assert row["tokens_per_s"] > 0 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["edge_rss_bytes"] > 0 and row["cloud_rss_bytes"] > 0
    assert d["config"]["distinct_references"] == 4
    goals = {g["name"]: g for g in d["goals"]}
    assert goals["0 lost or mixed responses"]["met"] is True
    assert any(n.startswith("bounded memory") for n in goals)
    batched = next(g for n, g in goals.items() if "with batching" in n)
    assert batched["met"] is False and batched["detail"] == "batched decode not implemented"


def test_goals_count_lost_and_memory():
    row = {"devices": 1, "requests": 1, "lost": 0, "mixed": 0, "edge_rss_bytes": 100, "cloud_rss_bytes": 100}
    big = dict(row, devices=8, requests=8, mixed=1, cloud_rss_bytes=100 + (300 << 20))
    goals = check_goals([row, big])
    assert goals[0].met is False and "1 mixed" in goals[0].detail
    assert goals[1].met is False and "cloud +300.0 MiB" in goals[1].detail


def test_bad_devices_is_one_line_error():
    r = CliRunner().invoke(app, ["bench", "load", "--devices", "1,x"])
    assert r.exit_code != 0 and "Traceback" not in r.output
