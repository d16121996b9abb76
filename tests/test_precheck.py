"""Edge pre-check of speculative drafts (aiflow_cli/runtime/precheck.py): greedy output equals plain greedy
decoding token for token; the cloud verifies fewer positions than the device drafted when the edge's exit rejects a
draft; every tier frees its session; sampled rounds are forwarded whole (the same tokens as without pre-check)."""

from __future__ import annotations

import pytest
import torch
from runtime_support import Direct, generate_on, in_process_tiers

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import InputError
from aiflow_cli.models import load_model, load_stages
from aiflow_cli.models.sampling import Sampling
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime import speculate as spec
from aiflow_cli.runtime.cluster import LocalCluster, identities
from aiflow_cli.runtime.precheck import keep_positions
from aiflow_cli.runtime.protocol import Verify

BUILTINS = ("builtin:gpt2-tiny", "builtin:llama-tiny")
#: device: input, embed, block0; edge: block1, block2; cloud: block3, head (both upper tiers hold blocks)
SPLIT = (3, 5)


class Recording(Direct):
    """The edge's link to the cloud, recording the drafts of every verify round the cloud receives."""

    def __init__(self, target) -> None:
        super().__init__(target)
        self.drafts: list[int] = []

    def request(self, msg, timeout_s):
        m = protocol.decode(msg)
        if isinstance(m, Verify):
            self.drafts.append(len(m.draft))
        return super().request(msg, timeout_s)


def _tiers(name: str, noisy: bool = False):
    """Device, edge and cloud in process, the edge's link to the cloud recorded; ``noisy``: the edge's exit head
    gets seeded noise (std of each weight matrix), so it disagrees with the drafts often (the random-weight
    built-ins' exits agree with each other almost always): whatever the edge's exit says, the output is exact."""
    m, tiers = in_process_tiers(name, SPLIT)
    rec = Recording(tiers[2])
    tiers[1].next = rec
    if noisy:
        head = load_stages(name, [m.num_stages - 1])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in head.adapter.model.parameters():
                if p.device.type != "meta" and p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * p.std())
        tiers[1].precheck_head = head
    return m, tiers, rec


def _generate(device, x, n, k, session, precheck, sampling=None):
    return generate_on(device, x, n, spec.SpecPolicy(k, precheck=precheck), session, sampling)


# -- the pure parts -----------------------------------------------------------------------------------------------
def test_a_shortened_round_emits_only_what_the_cloud_verified():
    # the cloud verified 2 drafts of 4 (3 targets): at most 2 accepted, then its token
    assert spec.accepted([5, 6, 7, 8], [5, 6, 7]) == 2
    assert spec.emitted([5, 6, 7, 8], [5, 6, 7], 10, frozenset()) == [5, 6, 7]
    assert spec.emitted([5, 6, 7, 8], [5, 9, 7], 10, frozenset()) == [5, 9]
    assert spec.emitted([5, 6, 7, 8], [5, 6, 7], 2, frozenset()) == [5, 6]  # never past max_new_tokens
    v = Verify("", "device", 3, (), 10, (5, 6, 7, 8), 3)
    assert spec.round_ends(v, torch.tensor([[5, 6, 7]]), frozenset())  # 3 tokens: the last ones
    assert not spec.round_ends(v, torch.tensor([[5, 6]]), frozenset())


def test_positions_are_dropped_from_the_end_mask_included():
    s = {"hidden_states": torch.arange(12.0).reshape(1, 4, 3), "attention_mask": torch.ones(1, 9)}
    s["position_ids"] = torch.tensor([[5, 6, 7, 8]])
    k = keep_positions(s, 2)
    assert k["hidden_states"].shape == (1, 2, 3) and k["attention_mask"].shape == (1, 7)
    assert k["position_ids"].tolist() == [[5, 6]] and keep_positions(s, 0) is s


def test_the_precheck_flag_travels_and_is_off_when_absent():
    v = Verify("h", "device", 3, (), 10, (5, 6), 4, precheck=True)
    back = protocol.decode(protocol.encode(v))
    assert back.precheck is True and back.hop(4, (), 1000.0, "").precheck is True
    v.precheck = False
    assert "precheck" not in v.to_wire() and protocol.decode(protocol.encode(v)).precheck is False


# -- three tiers in one process -------------------------------------------------------------------------------
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("name", BUILTINS)
def test_precheck_keeps_greedy_output_and_cuts_the_clouds_rounds(name, noisy):
    m, tiers, rec = _tiers(name, noisy)
    device, edge, cloud = tiers
    drafted = verified = 0
    for seed in (0,) if noisy else (2,):  # (seed 2: gpt2-tiny's own exits on the edge cut rounds)
        x = m.make_inputs(seq_len=4 + 3 * seed, seed=seed)
        for n in (1, 9, 24):
            ref = m.generate(x, n)
            for k in (1, 4, "auto") if n > 9 else (3,):
                rec.drafts.clear()
                r = _generate(device, x, n, k, 1000 * seed + n, precheck=True)
                assert torch.equal(r.tokens, ref), (seed, n, k, r.tokens, ref)
                assert all(len(t.sessions) == 0 for t in tiers)  # every tier freed the session
                if r.spec:
                    assert r.spec.tokens == n - 1 and r.spec.verified == sum(rec.drafts) <= r.spec.drafted
                    drafted, verified = drafted + r.spec.drafted, verified + r.spec.verified
                    assert len(rec.drafts) == r.spec.rounds == r.timings.links["edge-cloud"].messages - 1
    if noisy or name == "builtin:gpt2-tiny":  # the edge's exit cut rounds: the cloud ran fewer positions
        assert verified < drafted
    assert edge.model.num_stages - 1 not in edge.model.loaded and edge.precheck_head is not None  # loaded on need


def test_precheck_sends_fewer_bytes_to_the_cloud_than_plain_speculation():
    m, tiers, rec = _tiers("builtin:llama-tiny", noisy=True)
    x = m.make_inputs(seq_len=6, seed=2)
    plain = _generate(tiers[0], x, 24, 4, 1, precheck=False)
    assert rec.drafts and plain.spec.verified == plain.spec.drafted == sum(rec.drafts)
    rec.drafts.clear()
    pre = _generate(tiers[0], x, 24, 4, 2, precheck=True)
    assert torch.equal(pre.tokens, plain.tokens) and pre.spec.drafts_per_round == plain.spec.drafts_per_round
    assert sum(rec.drafts) == pre.spec.verified < pre.spec.drafted
    assert pre.timings.links["edge-cloud"].bytes_up < plain.timings.links["edge-cloud"].bytes_up
    assert pre.timings.links["device-edge"].bytes_up == plain.timings.links["device-edge"].bytes_up


def test_an_eos_inside_a_shortened_round_frees_every_session(monkeypatch):
    m, tiers, rec = _tiers("builtin:gpt2-tiny", noisy=True)
    x = m.make_inputs(seq_len=6, seed=1)
    ref = m.generate(x, 16)[0].tolist()
    eos = ref[6]
    cut = ref[: ref.index(eos) + 1]
    for adapter in [m.adapter] + [t.model.adapter for t in tiers]:
        monkeypatch.setattr(adapter, "eos_token_ids", lambda: frozenset({eos}))
    for k in (3, 8):
        r = _generate(tiers[0], x, 16, k, k, precheck=True)
        assert r.tokens[0].tolist() == cut
        assert all(len(t.sessions) == 0 for t in tiers)


def test_sampled_rounds_are_forwarded_whole():
    m, tiers, rec = _tiers("builtin:llama-tiny", noisy=True)
    x = m.make_inputs(seq_len=5, seed=4)
    s = Sampling(0.8, 0, 1.0, 1234)
    plain = _generate(tiers[0], x, 16, 4, 1, precheck=False, sampling=s)
    rec.drafts.clear()
    pre = _generate(tiers[0], x, 16, 4, 2, precheck=True, sampling=s)
    assert torch.equal(pre.tokens, plain.tokens)  # the same draws: the round is verified as without pre-check
    assert pre.spec.verified == pre.spec.drafted == sum(rec.drafts) > 0
    assert all(len(t.sessions) == 0 for t in tiers)


def test_the_pipeline_refuses_a_precheck_it_cannot_do(tmp_path):
    from aiflow_cli.runtime.pipeline import Pipeline

    m = load_model("builtin:gpt2-tiny")
    keys = identities(tmp_path)
    kw = {"edge": "127.0.0.1:9", "identity": keys["device"], "trust": [keys["edge"]]}
    for plan, k, why in (
        (fixed_plan(m, SPLIT), None, "give `speculate`"),
        (fixed_plan(m, (3, 6)), 2, None),  # the edge holds the last blocks, the cloud only the head: fine
    ):
        if why is None:
            Pipeline(plan, speculate=k, precheck=True, **kw).close()
            continue
        with pytest.raises(InputError, match=why) as e:
            Pipeline(plan, speculate=k, precheck=True, **kw)
        assert "\n" not in str(e.value)


# -- three processes ----------------------------------------------------------------------------------------------
def test_three_processes_precheck_equals_plain(tmp_path):
    name = "builtin:gpt2-tiny"  # its untrained exits on the edge disagree with the device's drafts for seed 2
    m = load_model(name)
    save_plan(fixed_plan(m, SPLIT), tmp_path / "plan.json")
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c:
        with c.pipeline(timeout_s=60, speculate=4, precheck=True) as p:
            drafted = verified = 0
            for seed in (1, 2):
                x = m.make_inputs(seq_len=4 + 3 * seed, seed=seed)
                r = p.run(inputs=x, max_new_tokens=20)
                assert torch.equal(r.tokens, m.generate(x, 20))
                s = r.speculation
                assert s["tokens"] == 19 and s["verified"] <= s["drafted"]
                drafted, verified = drafted + s["drafted"], verified + s["verified"]
            assert verified < drafted  # the edge (a server process) loaded its exit and cut rounds
