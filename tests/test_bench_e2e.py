"""`aiflow bench e2e`: the --quick JSON path on a tiny model end to end, and the goal checks on synthetic numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from aiflow_cli.bench.e2e import STRATEGIES, E2EConfig, check_goals, group_runs
from aiflow_cli.errors import InputError
from aiflow_cli.runtime.demo import SAMPLE_IMAGE

TINY = "builtin:captioner-tiny"


def _aiflow(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiflow_cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run of the tiny captioner over two link profiles (lte, lan), so the cloud-only servers serve
    both."""
    work = tmp_path_factory.mktemp("e2e")
    png = work / "e2e.png"
    r = _aiflow(
        "bench",
        "e2e",
        "--quick",
        "--json",
        "--model",
        TINY,
        "--links",
        "lte,lan",
        "--repeats",
        "3",
        "--workdir",
        str(work),
        "--plot",
        str(png),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert len(report["runs"]) == 1 and len(report["goals"]) == 4 and "bench e2e" in report["command"]
    return report["runs"][0], png


def _raw_input_bytes() -> int:
    """What a device that computes nothing uploads: the image file itself."""
    return SAMPLE_IMAGE.stat().st_size


def test_quick_json_has_every_strategy_at_every_profile(quick):
    out, png = quick
    assert out["model"] == TINY and out["fidelity_metric"] == "token_agreement"
    assert out["input"]["upload_bytes"] == _raw_input_bytes()
    assert list(out["profiles"]) == ["lte", "lan"]
    for prof in out["profiles"].values():
        assert list(prof["strategies"]) == list(STRATEGIES)
        for v in prof["strategies"].values():
            assert 3 <= len(v["samples_ms"]) and 0 < v["p50_ms"] <= v["p90_ms"]
            assert v["predicted_ms"] > 0 and v["plan"]
            assert 0 < v["fidelity"] <= 1
            assert v["predicted_cold_ms"] >= v["predicted_ms"] and v["tokens"] >= 1
            assert 0 < v["ttft_ms"] <= max(v["samples_ms"]) + 1e-6 and v["tokens_per_s"] > 0
    assert [g["name"] for g in out["goals"]] and all(isinstance(g["met"], bool) for g in out["goals"])
    assert len(out["goals"]) == 4
    assert set(out["provenance"]) == {"measured", "emulated", "modelled"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_bytes_and_fidelity_are_sane(quick):
    out, _ = quick
    raw_input = _raw_input_bytes()
    for prof in out["profiles"].values():
        s = prof["strategies"]
        assert s["device-only"]["payload_bytes"] == {} and s["device-only"]["wire_bytes"] == {}
        cloud = s["cloud-only"]
        assert cloud["payload_bytes"]["device-edge"]["up"] >= raw_input
        assert cloud["payload_bytes"]["edge-cloud"]["up"] >= raw_input
        assert cloud["wire_bytes"]["device-edge"]["up"] >= raw_input  # QUIC carries at least the payload
        for name in ("device-only", "cloud-only", "raw-split"):  # raw codec: exactly the monolithic model's tokens
            assert s[name]["fidelity"] == 1.0, (name, s[name]["plan"])
        # the planned codec never ships more than raw at the same placement would
        aiflow_up = s["aiflow"]["payload_bytes"].get("device-edge", {}).get("up", 0)
        assert aiflow_up <= max(raw_input, s["raw-split"]["payload_bytes"].get("device-edge", {}).get("up", 0))


def test_quick_starts_servers_once_per_placement_and_shares_measurements(quick):
    out, _ = quick
    device_only = out["profiles"]["lte"]["strategies"]["device-only"]["plan"]
    placements = {v["plan"] for p in out["profiles"].values() for v in p["strategies"].values()} - {device_only}
    assert out["server_pairs_started"] == len(placements)  # not one per (profile, strategy)
    for prof in out["profiles"].values():
        s = prof["strategies"]
        same = [k for k in ("device-only", "cloud-only", "raw-split") if s[k]["plan"] == s["aiflow"]["plan"]]
        if same:  # one placement, measured once (as the first strategy that has it), reported for each
            assert s["aiflow"]["measured_as"] == f"shared with {same[0]}: same placement"
            assert all(s[k]["samples_ms"] == s["aiflow"]["samples_ms"] for k in same)
        else:
            assert s["aiflow"]["measured_as"] is None
    assert out["machine"]["cores"] >= 1


def _row(p50: float, *, p90: float | None = None, pred: float | None = None, fid: float = 1.0) -> dict:
    return {
        "p50_ms": p50,
        "p90_ms": p90 if p90 is not None else p50 * 1.02,
        "predicted_ms": pred or p50,
        "fidelity": fid,
    }


def _rows(aiflow: dict, *, dev: float = 1000.0, cloud: float = 600.0, raw: float = 500.0) -> dict:
    return {
        "lte": {"device-only": _row(dev), "cloud-only": _row(cloud), "raw-split": _row(raw), "aiflow": aiflow},
        "lan": {"device-only": _row(dev), "cloud-only": _row(100.0), "raw-split": _row(80.0), "aiflow": _row(80.0)},
    }


def _met(goals) -> list[bool]:
    return [g.met for g in goals]


def test_goals_all_met_on_good_numbers():
    goals = check_goals(_rows(_row(200.0)), min_fidelity=0.99)
    assert _met(goals) == [True, True, True, True]
    assert "2.50x" in goals[1].detail and "lte" in goals[1].detail and "raw-split" in goals[1].detail


def test_goal_never_slower_uses_the_runs_noise():
    # 530 vs 500: beyond 5% of 500 (25 ms) with tight spreads -> slower
    goals = check_goals(_rows(_row(530.0)), min_fidelity=0.99)
    assert not goals[0].met and goals[0].numbers["slower_at"] == ["lte"] and "530.0" in goals[0].detail
    # same medians, but the baseline's own p90 - p50 spread is 60 ms: within noise
    rows = _rows(_row(530.0))
    rows["lte"]["raw-split"] = _row(500.0, p90=560.0)
    assert check_goals(rows, min_fidelity=0.99)[0].met


def test_goal_speedup_fidelity_and_prediction_can_each_miss():
    goals = check_goals(_rows(_row(300.0)), min_fidelity=0.99)  # 500 / 300 = 1.67x at best
    assert _met(goals) == [True, False, True, True] and "1.67x" in goals[1].detail
    goals = check_goals(_rows(_row(200.0, fid=0.875)), min_fidelity=0.99)
    assert _met(goals) == [True, True, False, True] and "0.8750" in goals[2].detail
    goals = check_goals(_rows(_row(200.0, pred=150.0)), min_fidelity=0.99)  # 25% under
    assert _met(goals) == [True, True, True, False]
    assert goals[3].numbers["worst"] == "aiflow@lte" and goals[3].numbers["within"] == 7
    goals = check_goals(_rows(_row(200.0, pred=220.0)), min_fidelity=0.99, prediction_tolerance=0.15)
    assert goals[3].met


def test_group_runs_shares_a_placement_across_profiles_and_strategies():
    def plan(edge_from: int, codec: str):
        tiers = [
            SimpleNamespace(name="device", start=0, end=edge_from),
            SimpleNamespace(name="edge", start=edge_from, end=8),
            SimpleNamespace(name="cloud", start=8, end=8),
        ]
        return SimpleNamespace(tiers=tiers, cuts=[SimpleNamespace(after_stage=edge_from - 1, codec=codec)])

    plans = {
        "lte": {"raw-split": plan(1, "raw"), "aiflow": plan(1, "int4")},
        "5g": {"raw-split": plan(1, "raw"), "aiflow": plan(1, "raw")},
    }
    groups = list(group_runs(plans).values())
    assert groups == [{"lte": ["raw-split"], "5g": ["raw-split", "aiflow"]}, {"lte": ["aiflow"]}]


def test_bad_settings_are_clean_errors(tmp_path):
    with pytest.raises(InputError, match="repeats="):
        E2EConfig(repeats=2).check()
    with pytest.raises(InputError, match="device_speed="):
        E2EConfig(device_speed=0).check()
    assert E2EConfig(device_speed=0.25, cloud_speed=4).dilation.factor == 4  # faster tiers: by dilation
    r = _aiflow("bench", "e2e", "--quick", "--json", "--links", "nosuch", "--workdir", str(tmp_path))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "nosuch" in json.loads(r.stdout)["error"]


def test_prediction_for_the_tokens_generated_and_cold_requests():
    """A model that stops at its end-of-sequence token is compared with the prefill and its own decode steps;
    the cold request adds one handshake per connection."""
    from aiflow_cli.runtime.demo import predicted_cold_ms, predicted_ms

    pred = SimpleNamespace(
        total_ms=1000.0,
        prefill_ms=300.0,
        per_token_ms=100.0,
        tokens=8,
        handshake_ms={"device-edge": 55.0, "edge-cloud": 22.0},
    )
    plan = SimpleNamespace(prediction=pred)
    assert predicted_ms(plan) == 1000.0 and predicted_ms(plan, 8) == 1000.0
    assert predicted_ms(plan, 5) == 300.0 + 4 * 100.0
    assert predicted_cold_ms(plan, 5) == 700.0 + 77.0
    one_shot = SimpleNamespace(
        prediction=SimpleNamespace(total_ms=50.0, prefill_ms=50.0, per_token_ms=0.0, tokens=0, handshake_ms={})
    )
    assert predicted_ms(one_shot, 3) == 50.0


def test_demo_verdict_uses_the_runs_noise():
    from aiflow_cli.runtime.demo import verdict

    def e(ms, spread=0.0, same=None):
        return {"warm_ms": ms, "samples_ms": [ms - spread, ms, ms + spread], "measured_as": same}

    assert verdict({"cloud-only": e(100.0), "aiflow": e(103.0)})["fastest"]  # within 5 %
    assert not verdict({"cloud-only": e(100.0), "aiflow": e(120.0)})["fastest"]
    assert verdict({"cloud-only": e(100.0, 15.0), "aiflow": e(120.0)})["fastest"]  # the run's own spread
    v = verdict({"cloud-only": e(100.0), "aiflow": e(100.0, same="same placement as cloud-only")})
    assert v["fastest"] and v["best_other"] == "cloud-only"
