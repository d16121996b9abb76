"""Self-speculative decoding across tiers: greedy output equals plain greedy decoding token for token, whatever the
number of drafts, the acceptance, an end-of-sequence token in the middle of a round or ``max_new_tokens``; every
tier frees its session on the round that ends the request; one verify message per round per link."""

from __future__ import annotations

import pytest
import torch
from runtime_support import generate_on, in_process_tiers

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import InputError
from aiflow_cli.models import load_model
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.runtime import speculate as spec
from aiflow_cli.runtime.cluster import LocalCluster, identities
from aiflow_cli.runtime.node import TierNode
from aiflow_cli.runtime.protocol import Verify

BUILTINS = ("builtin:gpt2-tiny", "builtin:llama-tiny")


# -- the pure parts -----------------------------------------------------------------------------------------------
def test_a_round_emits_the_accepted_drafts_and_one_token_of_the_full_model():
    assert spec.accepted([5, 6, 7], [5, 6, 9, 1]) == 2
    assert spec.emitted([5, 6, 7], [5, 6, 9, 1], 10, frozenset()) == [5, 6, 9]  # correction
    assert spec.emitted([5, 6, 7], [5, 6, 7, 1], 10, frozenset()) == [5, 6, 7, 1]  # all accepted + bonus
    assert spec.emitted([5, 6, 7], [4, 6, 7, 1], 10, frozenset()) == [4]  # first rejected
    assert spec.emitted([5, 6, 7], [5, 6, 7, 1], 2, frozenset()) == [5, 6]  # never past max_new_tokens
    assert spec.emitted([5, 2, 7], [5, 2, 7, 1], 10, frozenset({2})) == [5, 2]  # never past an EOS
    v = Verify("", "device", 3, (), 10, (5, 6, 7), 4)
    assert spec.round_ends(v, torch.tensor([[5, 6, 7, 1]]), frozenset())  # 4 tokens: the last ones
    assert not spec.round_ends(v, torch.tensor([[5, 0, 7, 1]]), frozenset())
    assert spec.round_ends(v, torch.tensor([[5, 0, 7, 1]]), frozenset({0}))


def test_positions_join_along_the_sequence_with_the_last_mask():
    a = {"hidden_states": torch.zeros(1, 1, 4), "attention_mask": torch.ones(1, 6), "position_ids": torch.tensor([[5]])}
    b = {"hidden_states": torch.ones(1, 1, 4), "attention_mask": torch.ones(1, 7), "position_ids": torch.tensor([[6]])}
    j = spec.join_positions([a, b])
    assert j["hidden_states"].shape == (1, 2, 4) and j["attention_mask"].shape == (1, 7)
    assert j["position_ids"].tolist() == [[5, 6]]


def test_auto_drafts_more_when_round_trips_are_long_and_drafts_are_accepted():
    def policy(alpha_hits: int, misses: int, fixed_ms: float) -> int:
        p = spec.SpecPolicy("auto")
        p.hits, p.misses, p.draft_ms, p.per_position_ms, p.fixed_ms = alpha_hits, misses, 5.0, 2.0, fixed_ms
        return p.choose()

    assert spec.SpecPolicy("auto").choose() == spec.AUTO_START
    assert policy(1, 30, 1.0) == 0  # drafts always rejected, short round trips: do not draft
    assert policy(0.3, 0.5, 1.0) == 1  # ... until that evidence has faded: then one draft to re-measure
    long_rtt, short_rtt = policy(30, 3, 200.0), policy(30, 3, 5.0)
    assert long_rtt > short_rtt >= 1
    assert policy(30, 3, 200.0) >= policy(10, 10, 200.0)  # better acceptance: longer drafts
    assert spec.SpecPolicy(3).draft_len(10) == 3 and spec.SpecPolicy(3).draft_len(2) == 1  # never past the end
    assert spec.expected_tokens(0.5, 2) == pytest.approx(1.75)


@pytest.mark.parametrize("value", ["x", -1, spec.MAX_K + 1, 2.5, True])
def test_bad_speculate_values_are_one_line_errors(value):
    with pytest.raises(InputError, match="speculate=") as e:
        spec.parse_speculate(value)
    assert "\n" not in str(e.value)


def test_speculate_values():
    assert spec.parse_speculate("auto") == "auto" and spec.parse_speculate("4") == 4
    assert (
        spec.parse_speculate(None) is None and spec.parse_speculate("off") is None and spec.parse_speculate(0) is None
    )


def test_only_caches_that_can_be_rolled_back_are_speculated():
    from types import SimpleNamespace as NS

    def lm(**config):
        return NS(name="m", task="generate", stages=[NS(kind="head")], adapter=NS(config=NS(**config)))

    assert spec.unsupported(lm()) is None
    assert "sliding-window" in spec.unsupported(lm(sliding_window=4096))
    assert "sliding-window" in spec.unsupported(lm(layer_types=["sliding_attention", "full_attention"]))
    assert spec.unsupported(lm(sliding_window=4096, layer_types=["full_attention"])) is None  # (Qwen2: window off)


# -- three tiers in one process -------------------------------------------------------------------------------
def _tiers(name: str, bounds: tuple[int, int]):
    return in_process_tiers(name, bounds)


def _generate(device: TierNode, x, n: int, k, session: int):
    return generate_on(device, x, n, k, session)


@pytest.mark.parametrize("name", BUILTINS)
def test_speculative_greedy_equals_plain_greedy_on_random_weights(name):
    m, tiers = _tiers(name, (2, 4))
    device = tiers[0]
    assert device.model.num_stages - 1 in device.model.loaded  # the exit's head is loaded beside its stages
    drafted = accepted = 0
    for seed in range(2):
        x = m.make_inputs(seq_len=4 + 3 * seed, seed=seed)
        for n in (1, 2, 9, 24):
            ref = m.generate(x, n)
            for k in (1, 4, "auto") if n > 9 else (3,):
                r = _generate(device, x, n, k, 1000 * seed + n)
                assert torch.equal(r.tokens, ref), (seed, n, k, r.tokens, ref)
                assert all(len(t.sessions) == 0 for t in tiers)  # every tier freed the session
                rounds = r.spec.rounds if r.spec else 0
                assert r.timings.links["device-edge"].messages == 1 + rounds  # one message per round per link
                assert r.timings.links["edge-cloud"].messages == 1 + rounds
                if r.spec:
                    drafted, accepted = drafted + r.spec.drafted, accepted + r.spec.accepted
                    assert r.spec.tokens == n - 1
    assert 0 < accepted < drafted  # both paths ran: accepted drafts and a roll-back of rejected ones


def test_an_eos_inside_a_round_ends_the_request_there(monkeypatch):
    m, tiers = _tiers("builtin:llama-tiny", (2, 4))
    x = m.make_inputs(seq_len=6, seed=1)
    ref = m.generate(x, 16)[0].tolist()
    eos = ref[
        6
    ]  # (monkeypatched below: the reference was generated without an EOS)  # a token the full model emits mid-generation
    cut = ref[: ref.index(eos) + 1]
    for adapter in [m.adapter] + [t.model.adapter for t in tiers]:
        monkeypatch.setattr(adapter, "eos_token_ids", lambda: frozenset({eos}))
    for k in (3, 8):
        r = _generate(tiers[0], x, 16, k, k)
        assert r.tokens[0].tolist() == cut
        assert all(len(t.sessions) == 0 for t in tiers)


def test_a_batch_or_an_unsplit_plan_decodes_without_speculation():
    m, tiers = _tiers("builtin:gpt2-tiny", (2, 4))
    x = m.make_inputs(batch=2, seq_len=5, seed=3)
    r = _generate(tiers[0], x, 6, 3, 1)
    assert torch.equal(r.tokens, m.generate(x, 6)) and r.spec is None


def test_the_pipeline_refuses_speculation_it_cannot_do(tmp_path):
    from aiflow_cli.runtime.pipeline import Pipeline

    m = load_model("builtin:gpt2-tiny")
    cloud_only = fixed_plan(m, (0, 0))
    with pytest.raises(InputError, match="no decode stage on the device") as e:
        keys = identities(tmp_path)
        Pipeline(cloud_only, edge="127.0.0.1:9", identity=keys["device"], trust=[keys["edge"]], speculate=2)
    assert "\n" not in str(e.value)


# -- three processes ----------------------------------------------------------------------------------------------
def test_three_processes_speculative_equals_plain(tmp_path):
    name = "builtin:llama-tiny"
    m = load_model(name)
    save_plan(fixed_plan(m, (2, 4)), tmp_path / "plan.json")
    x = m.make_inputs(seq_len=7, seed=5)
    ref = m.generate(x, 20)
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c:
        with c.pipeline(timeout_s=60) as plain, c.pipeline(timeout_s=60, speculate="auto") as auto:
            with c.pipeline(timeout_s=60, speculate=4) as fixed:
                for p in (plain, fixed, auto, fixed):
                    r = p.run(inputs=x, max_new_tokens=20)
                    assert torch.equal(r.tokens, ref)
                    assert (r.speculation is None) == (p is plain)
                r = fixed.run(inputs=x, max_new_tokens=20)
                assert r.speculation["rounds"] < 19 == r.speculation["tokens"]
                assert r.timings.links["device-edge"].messages == 1 + r.speculation["rounds"]


@pytest.mark.slow  # real weights in three processes: minutes on a loaded 2-core machine
def test_smollm2_over_three_processes_speculative_equals_plain(tmp_path):
    """The real model (the early exit's drafts are accepted about half the time): token-for-token the plain
    greedy output, for an answer that ends with EOS and one cut at max_new_tokens."""
    try:
        m = load_model("smollm2")
    except Exception as e:  # the real weights' package is an optional install
        pytest.skip(f"smollm2 unavailable: {e}")
    n = m.num_stages
    save_plan(fixed_plan(m, (n - 2, n - 1)), tmp_path / "plan.json")
    prompts = ["What is the capital of France?", "Write a short poem about the sea."]
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c:
        with c.pipeline(timeout_s=300) as plain, c.pipeline(timeout_s=300, speculate=3) as sp:
            for text in prompts:
                ref = plain.run(text=text, max_new_tokens=24)
                r = sp.run(text=text, max_new_tokens=24)
                assert torch.equal(r.tokens, ref.tokens), (r.tokens, ref.tokens)
                assert r.timings.links["device-edge"].messages < ref.timings.links["device-edge"].messages
    assert torch.equal(ref.tokens, m.generate(m.prepare(text=prompts[-1]), 24))


# -- the benchmark ------------------------------------------------------------------------------------------------
def test_bench_decode_tiny_json_shape_and_identical_output(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "aiflow_cli", "bench", "decode", "--model", "builtin:llama-tiny", "--rtt", "30"]
        + ["--tokens", "8", "--repeats", "1", "--split", "2,4", "--k", "3", "--workdir", str(tmp_path), "--json"]
        + ["--draft", "builtin:llama-tiny"],  # the model as its own draft: every draft accepted
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [run["mode"] for run in out["runs"]] == ["cloud-only", "split", "spec-k3", "spec-auto", "spec-draft-auto"]
    assert out["runs"][-1]["acceptance"] == 1.0 and out["exit_training"]["path"] is None  # (no block on the device)
    for run in out["runs"]:
        assert run["rtt_ms"] == 30 and run["identical"] is True and run["tokens"] == 8 and run["tokens_per_s"] > 0
        assert set(run) >= {"acceptance", "ttft_ms", "tokens_per_round_trip", "compute_ms_per_token"}
        assert (run["acceptance"] is None) == (not run["mode"].startswith("spec"))
    split, spec_k = out["runs"][1], out["runs"][2]
    assert split["tokens_per_round_trip"] == 1.0 and spec_k["round_trips"] < split["round_trips"]
    assert [g["name"] for g in out["goals"]] and all({"name", "met", "detail"} <= set(g) for g in out["goals"])
    assert "emulated" in out and "measured" in out and "Traceback" not in r.stderr
    assert out["exit_acceptance"]["4"] == 1.0  # the last block's output through the head is the model itself


def test_bench_decode_goals_from_numbers():
    from aiflow_cli.bench.decode import check_goals

    def row(rtt, mode, tps, same=True):
        return {"rtt_ms": rtt, "mode": mode, "tokens_per_s": tps, "identical": same}

    good = [row(40, "split", 10), row(40, "spec-k4", 15), row(40, "spec-auto", 21), row(10, "split", 30)]
    speed, same = check_goals(good)
    assert speed.met and "spec-auto 2.10x" in speed.detail and same.met
    speed, same = check_goals(good[:2] + [row(40, "spec-auto", 19, same=False)])
    assert not speed.met and not same.met and "spec-auto@40ms" in same.detail
