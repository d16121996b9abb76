"""Faults in batched steps (protocol.InferBatch, runtime/batching.py) that a hostile or unlucky peer can cause: each
fails only its own session, and leaves no session pinned (busy) on the tier."""

from __future__ import annotations

from test_batch_message import PEER, _cloud
from test_batching import _prompts

from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.batching import BatchSettings
from aiflow_cli.runtime.node import TierNode
from aiflow_cli.runtime.protocol import PREFILL, BatchStep, Error, Infer, InferBatch, Result, ResultBatch
from aiflow_cli.runtime.wire import pack_state


def test_a_batched_step_with_a_control_tensor_of_the_wrong_rank_fails_alone_and_frees_its_session():
    """Session 1's prefill carries a 1-D attention mask of one entry (a peer's garbled state): it fails with its
    own error, session 0 of the same batch gets its token, and no session is left busy (pinned forever)."""
    full, plan, _ = _cloud("builtin:gpt2-tiny")
    cloud = TierNode(plan, "cloud", model=full, batching=BatchSettings(16))
    start = cloud.stages.start
    entries, frames = [], []
    for i, p in enumerate(_prompts(full, 2)):
        state = full.run(p, range(start))
        if i == 1:
            state = {**state, "attention_mask": state["attention_mask"][0, :1]}
        packed = pack_state(state, full.roles(state), "raw")
        entries.append(BatchStep(i, Infer(cloud.plan_hash, "edge", PREFILL, start, packed.tensors, 4, False)))
        frames += packed.frames
    env = cloud.handle(protocol.encode(InferBatch(cloud.plan_hash, "edge", tuple(entries)), frames), PEER)
    got = protocol.expect_reply(env, ResultBatch)
    assert isinstance(got.results[0], Result) and got.results[0].tokens
    assert isinstance(got.results[1], Error)
    assert ("test-peer", 1) not in cloud.sessions._sessions  # the failed session closed
    assert not any(s.busy for s in cloud.sessions._sessions.values())
