"""Drafting over a truncated vocabulary (aiflow_cli/runtime/drafters.py ``KIND:N``, the counted
:class:`~aiflow_cli.models.exit_adapter.DraftVocab`): greedy output stays the full model's token for token, sampled
speculation with a draft distribution that is zero outside the subset still emits the target's distribution, the
vocabulary is counted reproducibly, and bad parameters are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from runtime_support import generate_on
from test_draft import _tiers
from test_sampling import _chi2_ok

from aiflow_cli.errors import InputError
from aiflow_cli.models import load_model
from aiflow_cli.models.exit_adapter import DraftVocab, build_vocab, find_vocab, rank_vocab, vocab_path
from aiflow_cli.models.sampling import Sampling, draft_token, target_probs, verify_round
from aiflow_cli.runtime.drafters import ExitDrafter, choose, make_drafter, parse_draft


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny"])
def test_truncated_vocabulary_greedy_equals_plain_greedy(name):
    m = load_model(name)
    x = m.make_inputs(seq_len=6, seed=1)
    ref = m.generate(x, 24)
    v = m.adapter.config.vocab_size
    half = torch.randperm(v, generator=torch.Generator().manual_seed(0))[: v // 2]
    common = torch.mode(ref[0]).values  # the answer's most frequent token
    with_answer = torch.unique(torch.cat([half, ref[0]]))  # drafts can be accepted
    without = with_answer[with_answer != common]  # drafts of the answer's most frequent token are impossible
    rates = []
    for keep in (with_answer, without):
        _, tiers = _tiers(name, (2, 4), ExitDrafter(None, keep))
        drafted = accepted = 0
        for i, k in enumerate((1, 4, "auto")):
            r = generate_on(tiers[0], x, 24, k, i)
            assert torch.equal(r.tokens, ref), (name, k, r.tokens, ref)
            assert all(len(t.sessions) == 0 for t in tiers)
            assert r.spec.policy["draft_vocab"] == keep.numel()
            drafted, accepted = drafted + r.spec.drafted, accepted + r.spec.accepted
        rates.append(accepted / drafted)
    assert rates[0] > 0 and rates[1] < 1 and rates[1] < rates[0], rates
    # every draft came from the subset: a drafter over a subset never proposes a token outside it
    out = ExitDrafter(None, keep).logits(m, m.run(x, range(m.num_stages - 1))["hidden_states"])
    assert out[0].shape == (keep.numel(),) and out[1] is keep


def test_a_truncated_draft_distribution_keeps_the_target_distribution():
    """Two drafts per round on a 6-token vocabulary, each drawn from the drafter's distribution over the subset
    {0, 2, 3} (zero elsewhere, as :func:`choose` makes it from the truncated head's logits): the first emitted
    token is distributed as the target's first position, the second (after an accepted first draft) as the
    second position's."""
    s = Sampling(temperature=1.0, seed=11)
    target = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0, -2.0], [0.0, -1.0, 2.0, 0.5, 0.5, -0.5]], dtype=torch.float64)
    logits = torch.cat([target, target[1:]], dim=0)
    ids = torch.tensor([0, 2, 3])
    sub = torch.tensor([0.3, 1.5, 0.1])  # the truncated head's logits of tokens 0, 2, 3
    p = target_probs(target, s)
    n = 5000
    first = torch.zeros(6, dtype=torch.float64)
    second = torch.zeros(6, dtype=torch.float64)
    n_second = 0
    for r in range(n):
        idx = 10 * r
        dists: list = []
        d = [choose(sub, s, idx, dists, ids), choose(sub, s, idx + 1, dists, ids)]
        assert set(d) <= {0, 2, 3} and set(dists[0].ids) == {0, 2, 3}
        assert d[0] == draft_token(dists[0], s, idx)
        out = verify_round(logits, d, dists, s, idx)
        first[out[0]] += 1
        if out[0] == d[0]:
            second[out[1]] += 1
            n_second += 1
    ok, chi2 = _chi2_ok(first, p[0], n)
    assert ok, ("first", chi2, first.tolist(), p[0].tolist())
    ok, chi2 = _chi2_ok(second, p[1], n_second)
    assert ok, ("second", chi2, second.tolist(), p[1].tolist())
    assert first[1] > 0 and first[4] > 0  # tokens the draft cannot propose are still emitted (by the residual)


def test_sampled_speculation_with_a_truncated_draft_is_reproducible():
    m = load_model("builtin:llama-tiny")
    x = m.make_inputs(seq_len=5, seed=2)
    keep = torch.arange(0, m.adapter.config.vocab_size, 3)
    s = Sampling(temperature=1.0, seed=4)
    runs = []
    for i in range(2):
        _, tiers = _tiers("builtin:llama-tiny", (2, 4), ExitDrafter(None, keep))
        runs.append(generate_on(tiers[0], x, 12, 3, i, s).tokens)
    assert torch.equal(runs[0], runs[1])
    # top_k=1: both distributions one-hot: greedy decoding exactly, though the draft's argmax is the subset's
    _, tiers = _tiers("builtin:llama-tiny", (2, 4), ExitDrafter(None, keep))
    one = generate_on(tiers[0], x, 12, 4, 9, Sampling(temperature=1.0, top_k=1, seed=5))
    assert torch.equal(one.tokens, m.generate(x, 12))


def test_ranking_puts_eos_first_then_counts_then_ids():
    counts = torch.tensor([0, 5, 0, 7, 5, 0])
    assert rank_vocab(6, counts, [5]).tolist() == [5, 3, 1, 4, 0, 2]
    assert DraftVocab(rank_vocab(6, counts), {}).subset(3).tolist() == [1, 3, 4]


def test_the_vocabulary_is_counted_reproducibly_and_drafted_from(cache):
    name = "builtin:llama-tiny"
    v1, path, _ = build_vocab(name, tokens=6, max_texts=3)
    bytes1 = path.read_bytes()
    v2, _, _ = build_vocab(name, tokens=6, max_texts=3)
    assert path.read_bytes() == bytes1 and torch.equal(v1.ranking, v2.ranking)
    m = load_model(name)
    found = find_vocab(m.model_hash)
    assert found is not None and torch.equal(found.ranking, v1.ranking)
    assert found.meta["counted_positions"] > 0 and found.meta["held_out_positions"] > 0
    assert sorted(found.ranking.tolist()) == list(range(m.adapter.config.vocab_size))
    d = make_drafter("untrained:64", m, 3)
    assert isinstance(d, ExitDrafter) and d.vocab is not None and d.vocab.numel() == 64
    assert d.describe() == {"draft": "untrained", "draft_vocab": 64}


@pytest.mark.parametrize(
    "draft, says",
    [
        ("untrained:0", "untrained:N"),
        ("exit:abc", "exit:N"),
        ("auto:-3", "auto:N"),
        ("untrained:1000000", "1..1000"),
    ],
)
def test_bad_vocabulary_sizes_are_one_line_errors(cache, draft, says):
    build_vocab("builtin:llama-tiny", tokens=2, max_texts=1)
    m = load_model("builtin:llama-tiny")
    with pytest.raises(InputError) as e:
        make_drafter(draft, m, 3)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_no_counted_vocabulary_is_a_one_line_error(cache):
    m = load_model("builtin:llama-tiny")
    assert not vocab_path(m.model_hash).exists()
    with pytest.raises(InputError, match="aiflow draft vocab builtin:llama-tiny"):
        make_drafter("untrained:64", m, 3)
    assert parse_draft("builtin:gpt2-tiny") == ("builtin:gpt2-tiny", None)  # a model name keeps its colon
    assert parse_draft("exit:4096") == ("exit", 4096)


def test_cli_vocab_bad_model_is_one_line(cache):
    env = dict(os.environ, AIFLOW_CACHE_DIR=str(cache))
    r = subprocess.run(
        [sys.executable, "-m", "aiflow_cli", "draft", "vocab", "builtin:bert-tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len([ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]) <= 2, r.stderr


@pytest.mark.slow  # the real weights, three tiers in this process: about a minute on a loaded 2-core machine
def test_smollm2_truncated_vocabulary_greedy_equals_plain_greedy():
    """The real model's exit over a truncated vocabulary (the first 4096 ids: byte-level BPE merge order; what
    the counted vocabulary falls back to): token for token the full model's greedy output, and the drafts it
    could not propose are rejected, not emitted."""
    try:
        m = load_model("smollm2")
    except Exception as e:  # the real weights' package is an optional install
        pytest.skip(f"smollm2 unavailable: {e}")
    n = m.num_stages
    keep = torch.arange(4096)
    _, tiers = _tiers("smollm2", (n - 2, n - 1), ExitDrafter(None, keep))
    for i, text in enumerate(["What is the capital of France?", "Write a short poem about the sea."]):
        x = m.prepare(text=text)
        ref = m.generate(x, 16)
        r = generate_on(tiers[0], x, 16, 3 if i else "auto", i)
        assert torch.equal(r.tokens, ref), (text, r.tokens, ref)
        assert r.spec.policy["draft_vocab"] == 4096 and r.spec.accepted > 0
        assert all(len(t.sessions) == 0 for t in tiers)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--device-end", "1"], "--device-end 1"),
        (["--rtt", "abc"], "--rtt 'abc'"),
        (["--rtt", "-5"], "--rtt '-5'"),
    ],
)
def test_cli_cost_bad_input_is_one_line(args, says):
    r = subprocess.run(
        [sys.executable, "-m", "aiflow_cli", "draft", "cost", "builtin:llama-tiny", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = (r.stdout + r.stderr).strip()
    assert r.returncode != 0 and "Traceback" not in out and says in out, out
    assert len([ln for ln in out.splitlines() if ln.strip()]) <= 2, out


def test_cli_cost_prints_the_options_and_their_bound():
    r = subprocess.run(
        [sys.executable, "-m", "aiflow_cli", "draft", "cost", "builtin:llama-tiny", "--tokens", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["options"][0]["option"] == "untrained" and set(c["options"][0]["bound"]) == {"40", "100"}
    assert c["positions"] == 4 * c["prompts"] and c["device_ms_per_position"] > 0
