"""The bound ``aiflow bench decode`` states beside its runs (aiflow_cli/bench/decode.py): the round cost model,
the per-row bound from a row's own measurements, the draft options' costs on a real (tiny) model, and which modes
``--quick`` runs and says it skipped."""

from __future__ import annotations

import pytest
import torch

from aiflow_cli.bench.decode import DecodeConfig, RoundCost, draft_costs, row_bound, spec_modes
from aiflow_cli.errors import InputError
from aiflow_cli.models import load_stages
from aiflow_cli.runtime.speculate import expected_tokens


def test_the_round_cost_bound_saves_round_trips_not_compute():
    # compute dominates (c = 100 ms, RTT 40): even every draft accepted cannot give 2x
    heavy = RoundCost(seq=100.0, draft=20.0, batch1=10.0, batch_n=12.0)
    x, g, e = heavy.bound(1.0, 40.0)
    assert x < (100 + 10 + 40) / 100 and e == g + 1
    # the RTT dominates and drafts are cheap and accepted: the bound approaches E
    light = RoundCost(seq=2.0, draft=0.5, batch1=2.0, batch_n=2.5)
    x, g, e = light.bound(0.9, 200.0)
    assert x > 4 and abs(e - expected_tokens(0.9, g)) < 1e-9
    assert light.round_ms(0, 40.0) == 2.0 + 2.0 + 40.0  # no drafts: a plain decode step
    assert light.bound(0.0, 40.0)[1] == 0  # nothing accepted: drafting does not pay
    # the least RTT for 2x: the bound there is 2x, just below it less; never when 1 + a + a^2 + ... < 2
    rtt = heavy.rtt_for(0.9)
    assert rtt is not None and abs(heavy.bound(0.9, rtt)[0] - 2) < 0.02 and heavy.bound(0.9, rtt * 0.9)[0] < 2
    assert heavy.rtt_for(0.4) is None


def test_a_rows_bound_comes_from_its_own_measurements():
    split = {"rtt_ms": 40.0, "mode": "split", "total_ms": 1200.0, "tokens": 12}
    row = {
        "rtt_ms": 40.0,
        "mode": "spec-trained-k4",
        "tokens": 12,
        "requests": 1,
        "rounds": 4,
        "drafted": 16,
        "acceptance": 0.5,
        "policy": {"draft_ms_per_position": 50.0, "upstream_ms_per_position": 5.0, "fixed_ms": 45.0},
    }
    b = row_bound(row, split)
    assert b["drafts_per_round"] == 4 and b["expected_tokens_per_round"] == round(expected_tokens(0.5, 4), 3)
    assert b["round_ms"] == 5 * 55 + 45 and b["split_ms_per_token"] == 100
    assert b["max_speedup"] == round(expected_tokens(0.5, 4) * 100 / 320, 3)
    assert b["measured_tokens_per_round"] == 11 / 4
    assert row_bound({**row, "rounds": 0}, split) is None
    # rounds of varying drafts (auto): the expectation and the round time are means over the rounds as they ran
    b = row_bound({**row, "drafts_each_round": [0, 4, 4, 8]}, split)
    want = sum(expected_tokens(0.5, k) for k in (0, 4, 4, 8)) / 4
    assert b["expected_tokens_per_round"] == round(want, 3) and b["round_ms"] == (55 + 5 * 55 * 2 + 9 * 55) / 4 + 45


def test_quick_runs_fewer_modes_and_says_which():
    full, skipped = spec_modes(DecodeConfig(k=4), trained=True, vocab=True)
    names = [m[0] for m in full]
    assert not skipped and names == [
        "spec-k4",
        "spec-auto",
        "spec-trained-k4",
        "spec-trained-auto",
        "spec-trained-v4096-k4",
        "spec-trained-v4096-auto",
    ]
    assert full[-1][2] == "exit:4096"
    quick, skipped = spec_modes(DecodeConfig.quick_config(), trained=True, vocab=True)
    assert [m[0] for m in quick] == ["spec-trained-k4", "spec-trained-v4096-k4", "spec-trained-v4096-auto"]
    assert set(skipped) == {"spec-k4", "spec-auto", "spec-trained-auto"}
    # without a trained exit or a counted vocabulary, quick keeps the untrained exit's modes
    quick, skipped = spec_modes(DecodeConfig.quick_config(), trained=False, vocab=False)
    assert [m[0] for m in quick] == ["spec-k4", "spec-auto"] and not skipped
    with pytest.raises(InputError, match="vocab=-1"):
        DecodeConfig(vocab=-1).check()


def test_draft_costs_on_a_tiny_model():
    torch.set_num_threads(1)
    full = load_stages("builtin:llama-tiny")
    c = draft_costs(full, 4, ["The sky is blue because", "Water boils at"], 6, (40.0, 100.0), vocabs=())
    names = [o["option"] for o in c["options"]]
    assert names[0] == "untrained" and any(n.startswith("early-exit-stage") for n in names) and names[-1] == "int8"
    for o in c["options"]:
        # the int8 copy drafts whole (seq 0): the device's blocks run once per round, in batch
        assert 0 <= o["acceptance"] <= 1 and (o["seq"] > 0) == (o["option"] != "int8") and o["draft"] > 0
        assert set(o["bound"]) == {"40", "100"} and all(v["speedup"] > 0 for v in o["bound"].values())
    assert c["positions"] == 12 and c["device_ms_per_position"] > 0
