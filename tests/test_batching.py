"""Batched decode across sessions (aiflow_cli/runtime/batching.py, models/families/batched.py): concurrent sessions
with different prompt lengths give the tokens each gives alone, sessions join and leave between steps, a failed
batch answers each of its requests with an error and the tier keeps serving, the batch-size metric sees > 1."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from runtime_support import Direct
from test_metrics import scrape, total

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import InputError
from aiflow_cli.models import load_stages
from aiflow_cli.models.families import batched
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.runtime import batching
from aiflow_cli.runtime.batching import BatchSettings
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.metrics import TierMetrics
from aiflow_cli.runtime.node import Payload, TierNode
from aiflow_cli.runtime.protocol import PREFILL

MODELS = ("builtin:gpt2-tiny", "builtin:llama-tiny")


def _prompts(model, n: int) -> list[dict]:
    return [model.make_inputs(seq_len=3 + 4 * i, seed=i) for i in range(n)]  # ragged: 3, 7, 11, ... tokens


@pytest.mark.parametrize("name", MODELS + ("smollm2",))  # smollm2: the real SmolLM2-135M (llama layout, 30 layers)
def test_batched_passes_match_solo_passes(name):
    """One prefill pass for 4 prompts of different lengths, then decode passes for the 4 sessions with different
    pasts == each session alone: logits within float tolerance, same tokens, each cache exactly its own positions."""
    m = load_stages(name)
    ds, stages = m.decode_start, range(m.decode_start, m.num_stages)
    prompts = [m.run(p, range(ds)) for p in _prompts(m, 4)]
    solo_caches, batch_caches, steps = [m.new_cache() for _ in prompts], [m.new_cache() for _ in prompts], []
    assert {batched.step_kind(p, c) for p, c in zip(prompts, batch_caches)} == {"prefill"}
    outs = batched.batched_pass("prefill", m, stages, prompts, batch_caches)
    for p, c, o in zip(prompts, solo_caches, outs):
        ref = m.output(m.run(p, stages, c))
        torch.testing.assert_close(m.output(o), ref, rtol=1e-4, atol=2e-4)
        steps.append(m.next_inputs(m.decode_inputs_of(p), ref[:, -1].argmax(-1)))
    assert batched.unbatchable(m, batch_caches[0]) is None
    assert {batched.step_kind(s, c) for s, c in zip(steps, batch_caches)} == {"decode"}
    for _ in range(3):  # three steps in a row: the second reads caches that are rows of the first's batch
        outs = batched.batched_step(m, stages, steps, batch_caches)
        nxt = []
        for s, c, o in zip(steps, solo_caches, outs):
            ref = m.output(m.run(s, stages, c))
            torch.testing.assert_close(m.output(o), ref, rtol=1e-4, atol=2e-4)
            assert torch.equal(m.output(o)[:, -1].argmax(-1), ref[:, -1].argmax(-1))
            nxt.append(m.next_inputs(s, ref[:, -1].argmax(-1)))
        steps = nxt
    for a, b in zip(solo_caches, batch_caches):
        for la, lb in zip(a.kv.layers, b.kv.layers):
            torch.testing.assert_close(lb.keys, la.keys, rtol=1e-4, atol=2e-4)
            assert lb.values.shape == la.values.shape


def test_captioner_cache_does_not_batch():
    m = load_stages("builtin:captioner-tiny")
    assert batched.unbatchable(m, m.new_cache()) is not None


def test_bad_settings_are_one_line_errors():
    with pytest.raises(InputError, match="batch_max=0"):
        BatchSettings(0)
    with pytest.raises(InputError, match="batch_window_ms"):
        BatchSettings(8, -1)


def _tiers(name: str, settings: BatchSettings):
    """Edge and cloud nodes of a thin-device plan in this process (edge: embed + blocks, drives the generation;
    cloud: last block + head), the edge reaching the cloud through its handler."""
    full = load_stages(name)
    plan = fixed_plan(full, (1, full.num_stages - 2))
    cloud = TierNode(plan, "cloud", model=full, batching=settings)
    edge = TierNode(plan, "edge", model=full, next_client=Direct(cloud), batching=settings)
    return full, edge, cloud


def _generate(edge, full, jobs, start_delay_s=0.0):
    """Runs ``jobs`` ([(prompt, max_new_tokens)]) as concurrent sessions on ``edge``; job i starts after
    i * start_delay_s. Returns tokens (or the exception) per job."""

    def session(i: int) -> torch.Tensor:
        prompt, n = jobs[i]
        time.sleep(i * start_delay_s)
        deadline = time.monotonic() + 60
        return edge.step(
            ("peer", 1000 + i), PREFILL, 1, Payload(state=prompt), max_new_tokens=n, deadline=deadline
        ).tokens

    return _concurrently(session, len(jobs))


def _concurrently(fn, n: int, prepare=lambda i: None) -> list:
    """``fn(i)`` for i < n on n threads that start together (after ``prepare(i)``); its result or exception each."""
    out: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            prepare(i)
            barrier.wait()
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - checked by the tests
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_concurrent_sessions_equal_solo_runs_and_join_and_leave(name):
    """8 sessions of different prompt lengths and lengths of answer, started 3 ms apart: each one's tokens are
    the model's own greedy generation; batches formed (> 1 session a pass) while sessions came and went."""
    full, edge, cloud = _tiers(name, BatchSettings(16, window_ms=2))
    metrics = TierMetrics(cloud)
    cloud.observer = metrics
    prompts = _prompts(full, 8)
    jobs = [(p, 3 + (i * 5) % 9) for i, p in enumerate(prompts)]  # 3..11 new tokens: sessions leave at different steps
    got = _generate(edge, full, jobs, start_delay_s=0.003)
    for (p, n), tokens in zip(jobs, got):
        assert isinstance(tokens, torch.Tensor), tokens
        assert torch.equal(tokens, full.generate(p, n))
    assert edge.batcher.largest > 1 and cloud.batcher.largest > 1
    assert edge.batcher.steps == sum(n for _, n in jobs)  # every prefill and decode step went through the batcher
    count = metrics.registry.get_sample_value("aiflow_batch_size_count", {"tier": "cloud"})
    sessions = metrics.registry.get_sample_value("aiflow_batch_size_sum", {"tier": "cloud"})
    assert sessions == len(jobs) + sum(n - 1 for _, n in jobs)  # prefills (1 each) + every decode step
    assert count < sessions  # some passes held several sessions
    assert len(edge.sessions) == len(cloud.sessions) == 0  # every session ended and left


def test_a_failed_batch_reruns_its_steps_alone_and_the_tier_keeps_serving(monkeypatch):
    """The cloud's first multi-session pass raises half-way (after its first stage): it changed no cache, so its
    steps run again one at a time and every request still gets its exact tokens; the next generations too."""
    full, edge, cloud = _tiers("builtin:gpt2-tiny", BatchSettings(16, window_ms=5))
    real = batching.batched_pass
    failed: list[int] = []

    class FailsAtSecondStage:  # the model, but its second stage of the pass raises
        def __init__(self, model):
            self.model, self.calls = model, 0

        def __getattr__(self, name):
            return getattr(self.model, name)

        def run_stage(self, i, state, cache):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("injected fault in a batched pass")
            return self.model.run_stage(i, state, cache)

    def flaky(kind, model, stages, states, caches):
        if not failed and kind == "decode" and len(states) > 1 and stages.start == cloud.stages.start:
            failed.append(len(states))
            return real(kind, FailsAtSecondStage(model), stages, states, caches)
        return real(kind, model, stages, states, caches)

    monkeypatch.setattr(batching, "batched_pass", flaky)
    prompts = _prompts(full, 6)
    jobs = [(p, 5) for p in prompts]
    got = _generate(edge, full, jobs)
    assert failed and failed[0] > 1  # a multi-session pass raised
    for (p, n), g in zip(jobs, got):
        assert isinstance(g, torch.Tensor), g
        assert torch.equal(g, full.generate(p, n))
    assert len(edge.sessions) == len(cloud.sessions) == 0  # every session ended on both tiers
    again = _generate(edge, full, jobs)  # the tier keeps serving
    for (p, n), g in zip(jobs, again):
        assert isinstance(g, torch.Tensor) and torch.equal(g, full.generate(p, n))


def test_batching_off_steps_one_session_at_a_time():
    full, edge, cloud = _tiers("builtin:gpt2-tiny", BatchSettings(1))
    assert edge.batcher is None and cloud.batcher is None
    jobs = [(p, 4) for p in _prompts(full, 3)]
    for (p, n), g in zip(jobs, _generate(edge, full, jobs)):
        assert torch.equal(g, full.generate(p, n))


def run_on_cluster(tmp_path, texts: list[str], n: int):
    """``texts`` as concurrent devices (one connection each, opened by an untimed one-token request) of a real
    device + edge + cloud run of gpt2-tiny (QUIC, mutual TLS, batching on), ``n`` tokens each; returns each
    device's result (or exception), the references (each prompt alone) and each server's metric samples."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (1, full.num_stages - 2))
    save_plan(plan, tmp_path / "plan.json")
    refs = [full.generate(full.raw_input(text=t), n) for t in texts]
    metrics = {"edge": "127.0.0.1:0", "cloud": "127.0.0.1:0"}
    with LocalCluster(tmp_path / "plan.json", tmp_path, metrics=metrics, batching=BatchSettings(32, window_ms=3)) as c:
        pipes = [c.pipeline(timeout_s=60) for _ in texts]
        try:
            out = _concurrently(
                lambda i: pipes[i].run(text=texts[i], max_new_tokens=n),
                len(texts),
                prepare=lambda i: pipes[i].run(text="warm up", max_new_tokens=1),  # opens its connection
            )
        finally:
            for p in pipes:
                p.close()
        samples = {t: scrape(c.servers[t].ready.metrics) for t in ("edge", "cloud")}
    return out, refs, samples


def test_three_processes_batch_and_match_solo_outputs(tmp_path):
    """A real device + edge + cloud run (QUIC, mutual TLS): 8 devices at once, each with its own connection and
    prompt, get their prompt's own greedy tokens; the edge's batch-size metric has seen passes of > 1 session."""
    texts = [f"device {i} says " + "x" * (i * 3) for i in range(8)]
    out, refs, samples = run_on_cluster(tmp_path, texts, 6)
    for got, ref in zip(out, refs):
        assert not isinstance(got, Exception), got
        assert torch.equal(got.tokens, ref)
    for tier, s in samples.items():
        passes = total(s, "aiflow_batch_size_count", tier=tier)
        sessions = total(s, "aiflow_batch_size_sum", tier=tier)
        assert sessions == len(texts) * 6 + 1 * len(texts)  # 6 steps a request + the warm-up's prefill
        assert passes < sessions, f"{tier}: no pass held more than one session"


def test_a_lone_sessions_decode_steps_do_not_wait_for_the_window(monkeypatch):
    """``window_ms`` waits for other sessions' steps: a tier holding one session waits at its prefill (a new session
    may send one) and never at its decode steps; with a second live session a decode step waits again."""
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    monkeypatch.setattr(batching, "time", type("T", (), {"sleep": staticmethod(sleep), "monotonic": time.monotonic}))
    full, edge, cloud = _tiers("builtin:gpt2-tiny", BatchSettings(16, window_ms=20))
    (prompt,) = _prompts(full, 1)
    assert torch.equal(_generate(edge, full, [(prompt, 6)])[0], full.generate(prompt, 6))
    assert sleeps == [0.02, 0.02]  # the two prefills (edge, cloud); none of the 2 x 5 decode steps

    sleeps.clear()
    m = full
    live = [1]  # sessions the tier holds
    b = batching.DecodeBatcher(m, BatchSettings(16, window_ms=20), live=lambda: live[0])
    stages = range(m.decode_start, m.num_stages)
    for live[0], waits in ((1, []), (2, [0.02])):
        cache = m.new_cache()
        state = m.run(prompt, range(m.decode_start), cache)
        out = m.run(state, stages, cache)
        b.run(stages, m.next_inputs(m.decode_inputs_of(state), m.output(out)[:, -1].argmax(-1)), cache)
        assert sleeps == waits, live[0]
