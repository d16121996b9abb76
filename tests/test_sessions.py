"""What a session's KV cache is accounted at (aiflow_cli/runtime/sessions.py: ``cache_bytes``, per step on every
tier): the direct sum over a plain dynamic cache is what the generic walk over the cache's objects counts."""

from __future__ import annotations

import pytest
import torch

from aiflow_cli.models import load_model
from aiflow_cli.runtime import sessions


def _walked(cache) -> int:
    """``cache_bytes`` with the direct sum turned off (the generic walk)."""
    real = sessions._dynamic_bytes
    try:
        sessions._dynamic_bytes = lambda kv: None
        return sessions.cache_bytes(cache)
    finally:
        sessions._dynamic_bytes = real


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny", "builtin:captioner-tiny"])
def test_the_direct_sum_equals_the_walk(name):
    m = load_model(name)
    cache = m.new_cache()
    assert sessions.cache_bytes(cache) == _walked(cache) == 0  # empty
    m.generate(m.make_inputs(seed=1), 3, cache=cache)
    assert sessions._dynamic_bytes(cache.kv) is not None  # every generating family's cache takes the direct sum
    n = sessions.cache_bytes(cache)
    assert n > 0 and n == _walked(cache)
    if name == "builtin:captioner-tiny":  # the encoder's states (side) and the cross-attention cache count too
        assert cache.side and n > sessions._dynamic_bytes(cache.kv.self_attention_cache)


def test_another_cache_is_walked():
    class Odd:
        def __init__(self):
            self.parts = [torch.zeros(3, dtype=torch.float32), {"x": torch.zeros(2, dtype=torch.int64)}]

    cache = sessions.StageCache(Odd())
    assert sessions._dynamic_bytes(cache.kv) is None
    assert sessions.cache_bytes(cache) == 3 * 4 + 2 * 8
