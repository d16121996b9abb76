"""`aiflow plan` end to end through the console script: plan files the runtime can read, explain, sweep, plot,
and one clear error (with the right exit code) for each kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aiflow_cli.errors import InputError, PlanError, SchemaError
from aiflow_cli.plan.schema import load_plan
from aiflow_cli.plan.synthetic import synthetic_profile
from aiflow_cli.schema import save_model

AIFLOW = [sys.executable, "-m", "aiflow_cli"]


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("profiles")
    out = {}
    for tier, speed in (("device", 0.25), ("edge", 1.0), ("cloud", 20.0)):
        out[tier] = d / f"{tier}.json"
        save_model(synthetic_profile(10, n_codecs=6, seed=4, speed=speed, input_bytes=150_528), out[tier])
    out["base"] = d / "base.json"
    save_model(synthetic_profile(10, n_codecs=6, seed=4, input_bytes=150_528), out["base"])
    out["other"] = d / "other.json"
    save_model(synthetic_profile(10, n_codecs=6, seed=4, model_hash="another-model"), out["other"])
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*AIFLOW, *args], capture_output=True, text=True, timeout=120)


def _three(profiles) -> list[str]:
    return [
        "--profile",
        f"device={profiles['device']}",
        "--profile",
        f"edge={profiles['edge']}",
        "--profile",
        f"cloud={profiles['cloud']}",
        "--link",
        "device-edge=lte",
        "--link",
        "edge-cloud=wan",
    ]


def test_plan_json_explain_and_file(profiles, tmp_path) -> None:
    out = tmp_path / "plan.json"
    r = _run(
        "plan",
        *_three(profiles),
        "--memory",
        "device=200MiB",
        "--min-fidelity",
        "0.999",
        "--explain",
        "--json",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    plan = load_plan(out)
    assert doc["plan"]["model_hash"] == plan.model_hash == "synthetic-0"
    covered = [i for t in plan.tiers for i in plan.stages_for(t.name)]
    assert covered == list(range(10))
    for cut in plan.cuts:
        assert plan.cut_codec(cut.after_stage) == cut.codec and cut.fidelity >= 0.999
    assert plan.tier("device").memory_bytes <= 200 * 2**20
    names = [s["name"] for s in doc["explain"]]
    assert names == ["device-only", "edge-only", "cloud-only", "raw-split", "aiflow"]
    best = doc["explain"][-1]["objective_value"]
    assert all(s["objective_value"] >= best - 1e-9 for s in doc["explain"] if s["feasible"])
    assert abs(best - plan.prediction.total_ms) < 1e-9


def test_one_profile_with_speeds_and_generate(profiles) -> None:
    r = _run(
        "plan",
        "--profile",
        str(profiles["base"]),
        "--speed",
        "device=0.25",
        "--speed",
        "edge=1",
        "--speed",
        "cloud=20",
        "--link",
        "device-edge=lte",
        "--link",
        "edge-cloud=wan",
        "--objective",
        "generate",
        "--tokens",
        "32",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    pred = json.loads(r.stdout)["plan"]["prediction"]
    assert pred["tokens"] == 32
    assert abs(pred["total_ms"] - (pred["prefill_ms"] + 31 * pred["per_token_ms"])) < 1e-6


def test_sweep_reports_changes_and_plot_writes_png(profiles, tmp_path) -> None:
    png = tmp_path / "sweep.png"
    r = _run(
        "plan",
        *_three(profiles),
        "--sweep",
        "device-edge=0.01:10000",
        "--sweep-points",
        "12",
        "--plot",
        str(png),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    sweep = json.loads(r.stdout)["sweep"]
    assert len(sweep["points"]) == 12
    opt = [next(s for s in p["strategies"] if s["name"] == "aiflow") for p in sweep["points"]]
    # more bandwidth never makes the optimum slower
    vals = [s["objective_value"] for s in opt]
    assert all(b <= a + 1e-9 for a, b in zip(vals, vals[1:]))
    placements = [s["placement"] for s in opt]
    assert len(sweep["changes"]) >= 1 and placements[0] != placements[-1]
    for c in sweep["changes"]:
        assert 0.01 <= c["at_mbps"] <= 10000 and c["before"] != c["after"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, kind, needle",
    [
        (["--profile", "device={device}", "--profile", "cloud={cloud}"], InputError, "--link device-cloud="),
        (["--profile", "edge={edge}", "--profile", "cloud={cloud}", "--link", "edge-cloud=wan"], InputError, "device"),
        (
            ["--profile", "device={device}", "--profile", "cloud={other}", "--link", "device-cloud=lte"],
            PlanError,
            "same model",
        ),
        (
            ["--profile", "device={device}", "--profile", "cloud={cloud}", "--link", "device-cloud=nosuchlink"],
            InputError,
            "unknown link",
        ),
        (
            [
                "--profile",
                "device={device}",
                "--profile",
                "cloud={cloud}",
                "--link",
                "device-cloud=lte",
                "--memory",
                "device=1MiB",
                "--memory",
                "cloud=1MiB",
            ],
            PlanError,
            "memory",
        ),
        (["--profile", "device={device}", "--memory", "device=lots"], InputError, "not a size"),
        (["--profile", "device=/nonexistent.json"], InputError, "no such file"),
        (["--profile", "device={device}", "--objective", "fastest"], InputError, "objective"),
    ],
)
def test_bad_inputs_give_one_clear_error(profiles, tmp_path, args, kind, needle) -> None:
    args = [a.format(**{k: str(v) for k, v in profiles.items()}) for a in args]
    r = _run("plan", *args)
    assert r.returncode == kind.exit_code, (r.stdout, r.stderr)
    message = " ".join(r.stderr.split())  # rich wraps long lines
    assert needle in message and "Traceback" not in message and message.startswith(f"error ({kind.__name__})")


def test_broken_plan_file_is_refused(profiles, tmp_path) -> None:
    out = tmp_path / "plan.json"
    assert _run("plan", *_three(profiles), "-o", str(out)).returncode == 0
    doc = json.loads(out.read_text())
    doc["tiers"][0]["end"] = doc["tiers"][0]["start"] + 1 if doc["tiers"][0]["end"] == 0 else 0  # break contiguity
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match="bad.json"):
        load_plan(bad)
    plan = load_plan(out)
    with pytest.raises(PlanError, match="re-run aiflow plan"):
        plan.check_model("a-different-hash")


def test_bench_plan_runs(tmp_path) -> None:
    r = _run("bench", "plan", "--stages", "200", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["small_agree"] is True and doc["solve_latency_ms"] > 0 and doc["brute_over_dp"] > 0


def test_explain_says_what_input_goes_up_and_generate_labels_the_prefill_bottleneck(profiles) -> None:
    r = _run(
        "plan",
        "--profile",
        str(profiles["base"]),
        "--speed",
        "device=0.25",
        "--speed",
        "edge=1",
        "--speed",
        "cloud=20",
        "--link",
        "device-edge=lte",
        "--link",
        "edge-cloud=wan",
        "--objective",
        "generate",
        "--tokens",
        "8",
        "--explain",
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # rich wraps long lines
    # edge-only and cloud-only always ship the input; the note gives its size as profiled
    assert "'edge-only', 'cloud-only'" in text and "sends the request input uncoded" in text
    assert "150,528 bytes" in text
    assert "pipeline bottleneck (prefill)" in text


def test_plot_labels_a_strategy_that_equals_the_plan_everywhere(profiles) -> None:
    from aiflow_cli.links import load_link
    from aiflow_cli.plan.plot import strategy_series
    from aiflow_cli.plan.problem import build_problem
    from aiflow_cli.plan.sweep import sweep

    # Only the raw codec profiled: the best raw-codec split is the optimum at every bandwidth.
    raw_only = synthetic_profile(6, n_codecs=1, seed=3)
    problem = build_problem(
        {"*": raw_only},
        {"device-edge": load_link("lte"), "edge-cloud": load_link("wan")},
        speeds={"device": 0.25, "edge": 1.0, "cloud": 20.0},
    )
    series = strategy_series(problem, sweep(problem, "device-edge", 0.1, 1000, points=6))
    assert series["raw-split"][1] == "raw-split (= aiflow)"
    assert series["aiflow"][1] == "aiflow"
    assert series["device-only"][1] == "device-only"  # a flat line that the optimum leaves as bandwidth grows
    plan_ms = series["aiflow"][0]
    assert all((ys >= plan_ms - 1e-9).all() for ys, _ in series.values())
