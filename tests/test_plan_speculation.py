"""The planner's generate objective with self-speculation (aiflow_cli/plan/speculation.py): the DP against brute
force with random exit acceptance, the formula, that acceptance moves the split, and that nothing changes with
speculation off."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiflow_cli.errors import InputError
from aiflow_cli.links import LinkProfile
from aiflow_cli.plan.brute import brute_force
from aiflow_cli.plan.cost import evaluate
from aiflow_cli.plan.problem import Limits, build_problem
from aiflow_cli.plan.solver import solve_problem
from aiflow_cli.plan.speculation import AUTO, expected_tokens, parse_speculate, stage_acceptance
from aiflow_cli.plan.synthetic import synthetic_profile
from tests.test_plan_solver import _close, random_problem


def test_expected_tokens_formula() -> None:
    assert expected_tokens(0.0, 4) == 1.0  # every draft rejected: the verifier's token only
    assert expected_tokens(1.0, 4) == 5.0  # every draft accepted, plus the verifier's
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(0.8, 0) == 1.0


def test_parse_speculate() -> None:
    assert parse_speculate(None) == 0 and parse_speculate("off") == 0
    assert parse_speculate("auto") == AUTO and parse_speculate("4") == 4 and parse_speculate(3) == 3
    for bad in ("x", "-3", 99, True):
        with pytest.raises(InputError, match="speculate"):
            parse_speculate(bad)


def test_stage_acceptance_prefers_the_trained_exit() -> None:
    class S:
        exit_acceptance = 0.4

    class T(S):
        trained_exit_acceptance = 0.7

    class Bad:
        exit_acceptance = float("nan")

    assert stage_acceptance(S()) == 0.4 and stage_acceptance(T()) == 0.7
    assert stage_acceptance(Bad()) is None and stage_acceptance(object()) is None


def _with_spec(problem, r: random.Random):
    acc = np.array([r.choice([np.nan, r.random(), r.uniform(0.7, 1.0)]) for _ in range(problem.n_stages)])
    return dataclasses.replace(problem, exit_acceptance=acc, speculate=r.choice([1, 2, 4, AUTO]))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_dp_with_speculation_matches_brute_force(seed: int) -> None:
    problem = random_problem(seed)
    if problem.objective != "generate":
        return
    problem = _with_spec(problem, random.Random(seed))
    ref = brute_force(problem)
    if ref is None:
        return
    placement, ev = solve_problem(problem)
    assert ev.feasible, ev.violations
    assert _close(ev.total_ms, ref[1].total_ms), (placement, ref[0])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_speculation_off_changes_nothing(seed: int) -> None:
    """Acceptance in the profile but speculation off: the same plan and the same figures as without it."""
    problem = random_problem(seed)
    if problem.objective != "generate":
        return
    r = random.Random(seed)
    with_acc = dataclasses.replace(problem, exit_acceptance=np.array([r.random() for _ in range(problem.n_stages)]))
    try:
        a_pl, a_ev = solve_problem(problem)
    except Exception as e:  # infeasible: must be infeasible alike
        with pytest.raises(type(e)):
            solve_problem(with_acc)
        return
    b_pl, b_ev = solve_problem(with_acc)
    assert a_pl.signature() == b_pl.signature() and a_ev.total_ms == b_ev.total_ms
    assert b_ev.speculation is None


def _two_tier(acceptance: dict[int, float], speculate, rtt_ms: float = 60.0):
    """8 stages (input.prepare, 6 blocks, head) of 20 ms prefill / 10 ms per decode step on the device, a cloud
    20x faster, ``rtt_ms`` between them: drafting k stages costs the device about k x 10 ms per token."""
    prof = synthetic_profile(8, n_codecs=1, seed=5, input_stage=True)
    stages = [
        s.model_copy(update={"exit_acceptance": acceptance.get(i), "prefill_ms": 20.0, "decode_ms": 10.0}) if i else s
        for i, s in enumerate(prof.stages)
    ]
    prof = prof.model_copy(update={"stages": stages})
    link = LinkProfile(name="l", source="test", uplink_mbps=100, downlink_mbps=100, rtt_ms=rtt_ms)
    return build_problem(
        {"*": prof},
        {"device-cloud": link},
        objective="generate",
        tokens=32,
        speeds={"device": 1.0, "cloud": 20.0},
        speculate=speculate,
        limits=Limits(require=frozenset({"device"})),  # the prompt stays on the device
    )


def test_acceptance_moves_the_split() -> None:
    """The exit that is accepted most (and only it) decides where the device hands over; without speculation
    the same profile gives the plain optimum whatever the acceptance."""
    plain = solve_problem(_two_tier({}, None))[0]
    ends = {}
    for k in (2, 4, 6):
        pl, ev = solve_problem(_two_tier({k - 1: 0.99}, 4))
        ends[k] = pl.bounds[1]
        assert ev.speculation is not None and ev.speculation["device_end"] == k
        assert solve_problem(_two_tier({k - 1: 0.99}, None))[0].signature() == plain.signature()
    assert ends == {2: 2, 4: 4, 6: 6}
    # more acceptance, fewer round trips: cheaper
    lo = solve_problem(_two_tier({3: 0.6}, "auto"))[1].total_ms
    hi = solve_problem(_two_tier({3: 0.95}, "auto"))[1].total_ms
    assert hi < lo


def test_speculation_is_priced_consistently_and_refused_outside_generate() -> None:
    p = _two_tier({3: 0.9}, 4)
    pl, ev = solve_problem(p)
    assert _close(evaluate(p, pl).total_ms, ev.total_ms)
    assert ev.speculation["tokens_per_round"] == pytest.approx(expected_tokens(0.9, 4), abs=1e-4)
    prof = synthetic_profile(4, n_codecs=1, seed=1)
    link = LinkProfile(name="l", source="t", uplink_mbps=10, downlink_mbps=10, rtt_ms=10)
    with pytest.raises(InputError, match="generate"):
        build_problem({"*": prof}, {"device-cloud": link}, speeds={"device": 1, "cloud": 1}, speculate=4)


def test_the_cli_prices_speculation_and_explains_it(tmp_path) -> None:
    """`aiflow plan --speculate`: the acceptance moves the plan through the CLI, --explain says how each strategy
    was priced."""
    import json
    import subprocess
    import sys

    from aiflow_cli.schema import save_model

    prof = synthetic_profile(8, n_codecs=1, seed=5, input_stage=True)
    stages = [
        s.model_copy(update={"exit_acceptance": 0.99 if i == 3 else None, "prefill_ms": 20.0, "decode_ms": 10.0})
        if i
        else s
        for i, s in enumerate(prof.stages)
    ]
    save_model(prof.model_copy(update={"stages": stages}), tmp_path / "p.json")
    link = tmp_path / "l.toml"
    link.write_text(
        'schema_version = 1\nname = "l"\nsource = "test"\nuplink_mbps = 100\ndownlink_mbps = 100\nrtt_ms = 60\n'
    )
    base = [sys.executable, "-m", "aiflow_cli", "plan", "--profile", str(tmp_path / "p.json"), "--speed", "device=1"]
    base += ["--speed", "cloud=20", "--link", f"device-cloud={link}", "--objective", "generate", "--tokens", "32"]
    base += ["--require-tier", "device"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)

    on = run("--json", "--speculate", "4", "--explain")
    assert on.returncode == 0, on.stderr
    doc = json.loads(on.stdout)
    p_on = doc["plan"]
    assert p_on["prediction"]["speculation"]["device_end"] == 4 and p_on["tiers"][0]["end"] == 4
    assert p_on["solved_for"]["speculate"] == 4
    best = next(r for r in doc["explain"] if r["name"] == "aiflow")
    assert best["speculation"]["draft"] == 4 and best["total_ms"] == pytest.approx(p_on["prediction"]["total_ms"])
    explained = run("--speculate", "auto", "--explain")
    assert explained.returncode == 0 and "speculation priced with draft length auto" in explained.stdout
    assert "drafts with the exit after stage 3" in explained.stdout.replace("\n", " ")
