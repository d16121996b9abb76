"""The per-forward setup shared by the block stages of one run (aiflow_cli/models/stage_setup.py).

- a run of stages (``StagedModel.run``, a tier's ``run_stages``) builds the attention mask once per step, where
  stages run one by one (the profiler) build it once per block;
- every boundary's state is bitwise the same either way (prefill, decode steps with a KV cache, padded batches);
- a value is reused only for the same inputs: another state, a grown cache, another model rebuild it.
"""

from __future__ import annotations

import threading

import pytest
import torch

import aiflow_cli.models.families.bert as bert_mod
import aiflow_cli.models.families.gpt2 as gpt2_mod
from aiflow_cli.models import load_model, stage_setup
from aiflow_cli.models.stage_setup import setup, shared_setup


@pytest.fixture
def count_masks(monkeypatch):
    """Counts the calls of the mask builders the gpt2 and bert stages use (the library's functions, wrapped)."""
    calls = {"causal": 0, "bidirectional": 0}

    def wrap(mod, name, key):
        real = getattr(mod, name)

        def counted(*a, **kw):
            calls[key] += 1
            return real(*a, **kw)

        monkeypatch.setattr(mod, name, counted)

    wrap(gpt2_mod, "create_causal_mask", "causal")
    wrap(bert_mod, "create_bidirectional_mask", "bidirectional")
    return calls


def _boundaries(m, state, stages, cache=None, shared=False):
    out = []

    def go(state):
        for i in stages:
            state = m.run_stage(i, state, cache)
            out.append(state)

    if shared:
        with shared_setup():
            go(state)
    else:
        go(state)
    return out


def _same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:bert-tiny", "builtin:llama-tiny"])
def test_every_boundary_is_bitwise_the_same_with_shared_setup(name):
    m = load_model(name)
    x = m.make_inputs(batch=2, seq_len=9, seed=3)
    x["attention_mask"][1, 6:] = 0  # one row right-padded: the mask is not the trivial causal one
    stages = range(m.num_stages)
    _same(_boundaries(m, x, stages), _boundaries(m, x, stages, shared=True))


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny"])
def test_decode_steps_with_a_cache_are_bitwise_the_same(name):
    m = load_model(name)
    x = m.make_inputs(seq_len=5, seed=4)
    runs = []
    for shared in (False, True):
        cache, state, seen = m.new_cache(), x, []
        for _ in range(4):  # prefill, then decode steps whose cache grows by one each
            seen += _boundaries(m, state, range(m.decode_start, m.num_stages), cache, shared)
            state = m.next_inputs(m.decode_inputs_of(state), m.output(seen[-1])[:, -1].argmax(-1))
        runs.append(seen)
    _same(*runs)


def test_a_run_builds_the_mask_once_and_stage_by_stage_builds_it_per_block(count_masks):
    m = load_model("builtin:gpt2-tiny")
    blocks = sum(s.kind == "block" for s in m.stages)
    assert blocks >= 2
    x = m.make_inputs(seq_len=7)
    _boundaries(m, x, range(m.num_stages))  # as the profiler times them: every block pays its own setup
    assert count_masks["causal"] == blocks
    count_masks["causal"] = 0
    m.run(x)
    assert count_masks["causal"] == 1
    count_masks["causal"] = 0
    m.generate(x, 4)  # prefill + 3 decode steps, one run each: the cache grows, so each step builds its own
    assert count_masks["causal"] == 4
    assert not stage_setup.active()


def test_encoder_run_builds_its_mask_once(count_masks):
    m = load_model("builtin:bert-tiny")
    blocks = sum(s.kind == "block" for s in m.stages)
    x = m.make_inputs(seq_len=7)
    m.run(x)
    assert count_masks["bidirectional"] == 1
    count_masks["bidirectional"] = 0
    _boundaries(m, x, range(m.num_stages))
    assert count_masks["bidirectional"] == blocks


def test_other_inputs_rebuild(count_masks):
    m = load_model("builtin:gpt2-tiny")
    x, y = m.make_inputs(seq_len=7, seed=1), m.make_inputs(seq_len=7, seed=2)
    first = m.stage_names.index("block0")
    with shared_setup():
        s = m.run_stage(first - 1, m.run_stage(0, x))
        m.run_stage(first, s)
        m.run_stage(first, s)  # the same state again: reused
        assert count_masks["causal"] == 1
        t = m.run_stage(first - 1, m.run_stage(0, y))  # equal values, other tensors: built again
        m.run_stage(first, t)
        assert count_masks["causal"] == 2
        cache = m.new_cache()
        m.run_stage(first, t, cache)  # with a KV cache: its sizes are part of the key
        m.run_stage(first + 1, t, cache)  # the next layer's cache is as long: reused
        assert count_masks["causal"] == 3
        m.run_stage(first, t, cache)  # layer 0's cache now holds 7 positions: another mask
        assert count_masks["causal"] == 4


def test_setup_is_per_thread_and_dropped_after_the_block():
    builds = []

    def build():
        builds.append(1)
        return len(builds)

    key = torch.ones(2)
    assert setup("t", (key,), (1,), build) == 1 and setup("t", (key,), (1,), build) == 2  # no block: always built
    seen = {}
    with shared_setup():
        assert setup("t", (key,), (1,), build) == 3
        assert setup("t", (key,), (1,), build) == 3
        assert setup("t", (key,), (2,), build) == 4  # another plain value
        with shared_setup():  # nested: the outer memo
            assert setup("t", (key,), (2,), build) == 4
        key.add_(1)  # a normal tensor changed in place: its version moved
        assert setup("t", (key,), (2,), build) == 5
        th = threading.Thread(target=lambda: seen.update(active=stage_setup.active()))
        th.start()
        th.join()
    assert seen == {"active": False}
    assert not stage_setup.active()
    assert setup("t", (key,), (2,), build) == 6


def _decode_step(m, seed: int):
    """A session of ``m`` after its prefill: (its next decode-step input, its cache)."""
    cache = m.new_cache()
    state = m.run(m.make_inputs(seq_len=3 + seed, seed=seed), range(m.decode_start), cache)
    out = m.run(state, range(m.decode_start, m.num_stages), cache)
    return m.next_inputs(m.decode_inputs_of(state), m.output(out)[:, -1].argmax(-1)), cache


def test_a_pass_of_the_decode_loop_builds_the_mask_once(count_masks):
    """The driver's decode loop and a batched message run their steps through ``DecodeBatcher.run_many``: one
    mask per pass there too, alone or batched (it was one per block)."""
    from aiflow_cli.runtime.batching import BatchSettings, DecodeBatcher

    m = load_model("builtin:gpt2-tiny")
    assert sum(s.kind == "block" for s in m.stages) >= 2
    stages = range(m.decode_start, m.num_stages)
    batcher = DecodeBatcher(m, BatchSettings(16))
    alone = _decode_step(m, 0)
    count_masks["causal"] = 0
    assert not isinstance(batcher.run_many([(stages, *alone)])[0], BaseException)
    assert count_masks["causal"] == 1
    two = [_decode_step(m, 1), _decode_step(m, 2)]  # different pasts: one left-padded pass
    count_masks["causal"] = 0
    assert not any(isinstance(o, BaseException) for o in batcher.run_many([(stages, *s) for s in two]))
    assert count_masks["causal"] == 1 and batcher.largest == 2


def test_the_capture_check_skips_cuda_while_cuda_is_not_initialized(monkeypatch):
    """transformers' ``is_tracing`` asks whether a CUDA graph is being captured at every mask build; that CUDA call
    (30-80 us where no driver is found) is skipped while torch's CUDA is not initialized, and made once it is."""
    from transformers.utils import import_utils

    calls = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: calls.append(1) or True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert import_utils.is_cuda_stream_capturing() is False and calls == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert import_utils.is_cuda_stream_capturing() is True and calls == [1]
    stage_setup.cheap_capture_check()  # idempotent: not wrapped twice
    assert import_utils.is_cuda_stream_capturing() is True and calls == [1, 1]
