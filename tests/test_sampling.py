"""Sampling: reproducible draws, the processed distribution, and the speculative rejection rule's output
distribution (exactly the target's) on a small vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from aiflow_cli.errors import InputError
from aiflow_cli.models.sampling import (
    ACCEPT,
    TOKEN,
    DraftDist,
    Sampling,
    check_dists,
    draft_dist,
    draft_token,
    sample,
    target_probs,
    uniform,
    verify_round,
)

V = 6


def _chi2_ok(counts: torch.Tensor, p: torch.Tensor, n: int) -> tuple[bool, float]:
    """Pearson chi-square against ``p`` below the 99.9 % quantile for its degrees of freedom (<= 5 here)."""
    keep = p > 0
    assert int(counts[~keep].sum()) == 0, f"tokens of probability 0 drawn: {counts.tolist()}"
    exp = p[keep] * n
    chi2 = float(((counts[keep] - exp) ** 2 / exp).sum())
    crit = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(keep.sum()) - 1]
    return chi2 < crit, chi2


def test_uniform_is_a_pure_function_of_its_key_and_looks_uniform():
    assert uniform(7, 3, 0, TOKEN) == uniform(7, 3, 0, TOKEN)
    assert len({uniform(7, i, 0, TOKEN) for i in range(1000)}) == 1000
    assert uniform(7, 3, 0, TOKEN) != uniform(7, 3, 0, ACCEPT) != uniform(8, 3, 0, ACCEPT)
    us = torch.tensor([uniform(1, i, 0, TOKEN) for i in range(20000)])
    assert 0 <= float(us.min()) and float(us.max()) < 1
    counts = torch.histc(us, bins=V, min=0, max=1)
    ok, chi2 = _chi2_ok(counts, torch.full((V,), 1 / V, dtype=torch.float64), 20000)
    assert ok, chi2


def test_target_probs_applies_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = target_probs(logits, Sampling(temperature=1.0))
    assert torch.allclose(p, torch.softmax(logits.double(), -1))
    hot = target_probs(logits, Sampling(temperature=0.5))
    assert hot[0, 0] > p[0, 0]
    k2 = target_probs(logits, Sampling(temperature=1.0, top_k=2))[0]
    assert (k2[2:] == 0).all() and math.isclose(float(k2.sum()), 1.0)
    top_p = target_probs(logits, Sampling(temperature=1.0, top_p=0.6))[0]
    # softmax = .57, .21, ...: 0.57 < 0.6, so the smallest set reaching 0.6 is the first two tokens
    assert (top_p[:2] > 0).all() and (top_p[2:] == 0).all()
    assert target_probs(logits, Sampling()).argmax().item() == 0  # greedy: one-hot argmax


def test_sampling_draws_follow_the_target_distribution_and_repeat_with_the_seed():
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0, -2.0]])
    s = Sampling(temperature=0.9, top_k=5, seed=11)
    p = target_probs(logits, s)[0]
    n = 6000
    counts = torch.zeros(V, dtype=torch.float64)
    for i in range(n):
        counts[int(sample(logits, s, i)[0])] += 1
    ok, chi2 = _chi2_ok(counts, p, n)
    assert ok, (chi2, counts.tolist(), p.tolist())
    again = [int(sample(logits, s, i)[0]) for i in range(50)]
    assert again == [int(sample(logits, s, i)[0]) for i in range(50)]
    assert again != [int(sample(logits, Sampling(temperature=0.9, top_k=5, seed=12), i)[0]) for i in range(50)]
    assert int(sample(logits, Sampling(), 0)[0]) == 0  # greedy


@pytest.mark.parametrize("draft_logits", [[0.1, 1.5, -0.3, 0.4, 0.0, 0.9], [1.0, 0.2, -0.5, 0.8, 0.0, -2.0]])
def test_the_rejection_rule_emits_exactly_the_target_distribution(draft_logits):
    """Two drafts per round on a 6-token vocabulary: the first emitted token is distributed as the target's
    first position, and the second (when the first draft was accepted) as the target's second position (the
    target is the same at both here, so the pair's marginals are checked against it)."""
    s = Sampling(temperature=1.0, seed=3)
    target = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0, -2.0], [0.0, -1.0, 2.0, 0.5, 0.5, -0.5]], dtype=torch.float64)
    logits = torch.cat([target, target[1:]], dim=0)  # [g + 1 = 3, V]
    q = draft_dist(torch.tensor(draft_logits), s, support=4)  # a draft that cannot propose 2 of the 6 tokens
    p = target_probs(target, s)
    n = 5000
    first = torch.zeros(V, dtype=torch.float64)
    second = torch.zeros(V, dtype=torch.float64)
    n_second = 0
    accepted = 0
    for r in range(n):
        idx = 10 * r  # each round its own answer places (the uniforms' index)
        d = [draft_token(q, s, idx), draft_token(q, s, idx + 1)]
        out = verify_round(logits, d, [q, q], s, idx)
        assert len(out) == 3
        first[out[0]] += 1
        if out[0] == d[0]:
            accepted += 1
            second[out[1]] += 1
            n_second += 1
        else:
            assert out[0] != d[0]  # a rejection emits the residual's draw, never the draft
    ok, chi2 = _chi2_ok(first, p[0], n)
    assert ok, ("first", chi2, first.tolist(), p[0].tolist())
    ok, chi2 = _chi2_ok(second, p[1], n_second)
    assert ok, ("second", chi2, second.tolist(), p[1].tolist())
    # the acceptance rate of the first draft is sum_x min(p, q) (the overlap of the two distributions)
    overlap = float(torch.minimum(p[0], q.dense(V)).sum())
    assert abs(accepted / n - overlap) < 4 * math.sqrt(overlap * (1 - overlap) / n) + 1e-3


def test_identical_draft_and_target_accept_every_draft():
    s = Sampling(temperature=0.7, seed=5)
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0, -2.0]] * 4)
    q = draft_dist(logits[0], s, support=V)
    for r in range(200):
        d = [draft_token(q, s, 4 * r + i) for i in range(3)]
        assert verify_round(logits, d, [q] * 3, s, 4 * r)[:3] == d


def test_bad_settings_and_bad_draft_distributions_are_refused():
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2), dict(top_p=0), dict(seed=-1)):
        with pytest.raises(InputError):
            Sampling(**bad)
    check_dists([DraftDist((1, 2), (0.25, 0.75))], vocab=6)
    for bad in (
        DraftDist((), ()),
        DraftDist((1, 1), (0.5, 0.5)),
        DraftDist((1, 9), (0.5, 0.5)),
        DraftDist((1,), (0.7,)),
    ):
        with pytest.raises(ValueError):
            check_dists([bad], vocab=6)


# -- through the tiers (in one process; every message encoded and decoded) -----------------------------------------
def _generate(device, x, n: int, k, session: int, s: Sampling):
    from runtime_support import generate_on

    return generate_on(device, x, n, k, session, s)


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny"])
def test_a_split_samples_the_same_tokens_as_the_model_alone(name):
    from runtime_support import in_process_tiers

    m, tiers = in_process_tiers(name, (2, 4))
    x = m.make_inputs(seq_len=5, seed=2)
    s = Sampling(temperature=1.3, top_k=40, top_p=0.95, seed=9)
    ref = m.generate(x, 12, sampling=s)
    assert not torch.equal(ref, m.generate(x, 12))  # not greedy (hot enough to leave the argmax)
    assert torch.equal(_generate(tiers[0], x, 12, None, 1, s).tokens, ref)
    assert not torch.equal(m.generate(x, 12, sampling=Sampling(temperature=1.3, top_k=40, top_p=0.95, seed=10)), ref)
    assert torch.equal(_generate(tiers[0], x, 12, None, 2, Sampling(seed=9)).tokens, m.generate(x, 12))  # T=0
    assert all(len(t.sessions) == 0 for t in tiers)


def test_speculative_sampling_is_reproducible_and_exact_in_the_greedy_limit():
    from runtime_support import in_process_tiers

    m, tiers = in_process_tiers("builtin:llama-tiny", (2, 4))
    x = m.make_inputs(seq_len=6, seed=4)
    s = Sampling(temperature=1.0, seed=21)
    a = _generate(tiers[0], x, 16, 3, 1, s)
    assert a.spec is not None and a.spec.rounds < 15
    assert torch.equal(a.tokens, _generate(tiers[0], x, 16, 3, 2, s).tokens)
    # top_k=1: both distributions are one-hot on their argmax, so the rule must give greedy decoding exactly
    one = _generate(tiers[0], x, 16, 4, 3, Sampling(temperature=1.0, top_k=1, seed=5))
    assert torch.equal(one.tokens, m.generate(x, 16))
    assert all(len(t.sessions) == 0 for t in tiers)


@pytest.mark.slow  # 400 generations through three tiers: ~1 min quiet, several on a loaded machine
def test_speculative_sampling_over_the_tiers_follows_the_full_model_distribution():
    """The second token of an answer comes from a verified draft (the first comes from the prefill; the first
    round of a 3-token answer drafts one): grouped by the first token, its distribution over many seeds is the
    full model's."""
    from runtime_support import in_process_tiers

    m, tiers = in_process_tiers("builtin:llama-tiny", (2, 4))
    x = m.make_inputs(seq_len=4, seed=7)
    base = dict(temperature=2.0, top_k=4)
    firsts: dict[int, list[int]] = {}
    for seed in range(400):
        r = _generate(tiers[0], x, 3, 1, seed, Sampling(**base, seed=seed))
        assert r.spec is not None and r.spec.drafts_per_round[0] == 1
        firsts.setdefault(int(r.tokens[0, 0]), []).append(int(r.tokens[0, 1]))
    first, seconds = max(firsts.items(), key=lambda kv: len(kv[1]))
    assert len(seconds) >= 100
    ids = torch.cat([x["input_ids"], torch.tensor([[first]])], dim=1)
    state = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(5).unsqueeze(0)}
    p = target_probs(m.output(m.run(state))[0, -1], Sampling(**base))
    counts = torch.zeros_like(p)
    for t in seconds:
        counts[t] += 1
    ok, chi2 = _chi2_ok(counts, p, len(seconds))
    assert ok, (chi2, counts[p > 0].tolist(), p[p > 0].tolist())


def test_three_processes_sample_the_same_tokens_as_the_model_alone(tmp_path):
    """Sampling fields travel in the binary infer header and the JSON verify message; the local fallback (the
    model alone) would give the same answer."""
    from aiflow_cli.bench.decode import fixed_plan
    from aiflow_cli.models import load_model
    from aiflow_cli.plan.schema import save_plan
    from aiflow_cli.runtime.cluster import LocalCluster

    m = load_model("builtin:llama-tiny")
    save_plan(fixed_plan(m, (2, 4)), tmp_path / "plan.json")
    x = m.make_inputs(seq_len=5, seed=8)
    s = Sampling(temperature=1.2, top_p=0.9, seed=77)
    ref = m.generate(x, 14, sampling=s)
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c:
        with c.pipeline(timeout_s=60) as plain, c.pipeline(timeout_s=60, speculate=3) as fast:
            assert torch.equal(plain.run(inputs=x, max_new_tokens=14, sampling=s).tokens, ref)
            a = fast.run(inputs=x, max_new_tokens=14, sampling=s)
            assert a.speculation["rounds"] < 13 and a.tokens.shape == ref.shape
            assert torch.equal(fast.run(inputs=x, max_new_tokens=14, sampling=s).tokens, a.tokens)


def test_a_draft_model_that_is_the_target_is_always_accepted_when_sampling_within_its_support():
    """With top_k <= the draft support, the draft model's distribution is the target's exactly, so the rejection
    rule must accept every draft (an off-by-one in the answer places or the distributions would not)."""
    from runtime_support import in_process_tiers

    from aiflow_cli.runtime.drafters import make_drafter

    m, tiers = in_process_tiers("builtin:llama-tiny", (2, 4))
    device = tiers[0]
    device.drafter = make_drafter("builtin:llama-tiny", device.model, 2)
    x = m.make_inputs(seq_len=5, seed=3)
    r = _generate(device, x, 12, 3, 1, Sampling(temperature=1.5, top_k=8, seed=4))
    assert r.spec.drafted > 0 and r.spec.accepted == r.spec.drafted, r.spec
    assert all(len(t.sessions) == 0 for t in tiers)
