"""Faults in batched steps (protocol.InferBatch, runtime/batching.py) that a hostile or unlucky peer can cause: each
fails only its own session, and leaves no session pinned (busy) on the tier."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from test_batch_message import PEER, Recording, _cloud, _prefill_steps
from test_batching import _concurrently, _generate, _prompts

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.models import load_stages
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.batching import BatchSettings, HopGroup, HopItem, HopSeat
from aiflow_cli.runtime.node import Payload, TierNode, next_session_id
from aiflow_cli.runtime.protocol import PREFILL, BatchStep, Error, Infer, InferBatch, Result, ResultBatch
from aiflow_cli.runtime.routing import PoolClient
from aiflow_cli.runtime.wire import pack_state
from aiflow_cli.transport import Client, Identity, Message, Server


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


def test_a_pass_whose_states_together_exceed_the_batch_byte_limit_goes_on_in_several_messages(monkeypatch):
    """Three prefill states that each fit a batched message but not together (``MAX_BATCH_BYTES``): the edge
    sends them in more than one message and every session gets its token (one message would be refused whole)."""
    full, plan, cloud = _cloud("builtin:gpt2-tiny")
    link = Recording(cloud)
    edge = TierNode(plan, "edge", model=full, next_client=link, batching=BatchSettings(16))
    items = [
        HopItem(i, replace(m, sender="edge"), frames, 30.0)
        for i, (m, frames) in enumerate(_prefill_steps(full, plan, cloud, 3))
    ]
    monkeypatch.setattr(protocol, "MAX_BATCH_BYTES", max(sum(map(len, it.frames)) for it in items) + 1)
    answers = edge._send_batch(items)
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert all(a[0].tokens for a in answers)
    assert sum(link.kinds.values()) > 1


def test_a_peer_that_reuses_its_session_id_in_one_pass_does_not_fail_the_other_sessions_of_that_pass():
    """One peer sends two concurrent prefills with the same session id (its own affair); an honest peer's prefill
    joins the same pass. The pass goes on to the cloud without two steps of one id in one message (which the
    cloud refuses whole): the honest session gets its token."""
    full, plan, cloud = _cloud("builtin:gpt2-tiny")
    edge = TierNode(plan, "edge", model=full, next_client=Recording(cloud), batching=BatchSettings(16, window_ms=300))
    prompts = _prompts(full, 3)
    keys = [("hostile", 7), ("hostile", 7), ("honest", 8)]

    def session(i: int):
        deadline = time.monotonic() + 60
        return edge.step(keys[i], PREFILL, 1, Payload(state=prompts[i]), max_new_tokens=1, deadline=deadline).tokens

    got = _concurrently(session, 3)
    assert edge.batcher.largest == 3  # the three met in one pass
    assert isinstance(got[2], torch.Tensor), got[2]
    assert torch.equal(got[2], full.generate(prompts[2], 1))


def test_a_malformed_result_in_the_decode_loop_fails_only_its_own_generation(monkeypatch):
    """The cloud answers one session of a batched decode step with an empty token row: that generation fails,
    the others of the same decode loop get their exact tokens, and the edge ends every session."""
    full, plan, cloud = _cloud("builtin:gpt2-tiny")
    jobs = [(p, 6) for p in _prompts(full, 4)]
    refs = [full.generate(p, n) for p, n in jobs]
    unused = min(set(range(100)) - {int(t) for r in refs for t in r.flatten()})
    monkeypatch.setattr(full.adapter, "eos_token_ids", lambda: frozenset({unused}))  # a model with an EOS token
    mangled: list[int] = []

    class Mangles(Recording):
        def request(self, msg, timeout_s):
            env = super().request(msg, timeout_s)
            if env.kind == protocol.RESULT_BATCH and not mangled and msg.meta["steps"][0]["phase"] == "decode":
                mangled.append(msg.meta["steps"][0]["session"])
                results = [dict(r) for r in env.meta["results"]]
                results[0] = {"result": {**results[0]["result"], "tokens": [[]]}}
                env = Message(env.kind, {**env.meta, "results": results}, list(env.frames), env.session_id)
            return env

    edge = TierNode(plan, "edge", model=full, next_client=Mangles(cloud), batching=BatchSettings(16, window_ms=50))
    got = _generate(edge, full, jobs)
    assert mangled
    bad = {next_session_id(("peer", 1000 + i)): i for i in range(len(jobs))}[mangled[0]]  # the id it went on as
    assert isinstance(got[bad], Exception) and "not [1, 1]" in str(got[bad]), got[bad]
    for i, (ref, tokens) in enumerate(zip(refs, got)):
        if i != bad:
            assert isinstance(tokens, torch.Tensor), tokens
            assert torch.equal(tokens, ref)
    assert len(edge.sessions) == 0


def test_a_ragged_token_answer_on_a_middle_tier_fails_only_its_session_and_frees_it():
    """device (drives) -> edge (middle) -> cloud; the cloud answers one session of a batched decode step with
    ragged token rows: that session fails, the others of the message get their exact tokens, and the edge leaves
    no session behind (none pinned busy)."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (2, 4))
    settings = BatchSettings(16, window_ms=50)
    cloud = TierNode(plan, "cloud", model=full, batching=settings)
    mangled: list[int] = []

    class Ragged(Recording):
        def request(self, msg, timeout_s):
            env = super().request(msg, timeout_s)
            if env.kind == protocol.RESULT_BATCH and not mangled and msg.meta["steps"][0]["phase"] == "decode":
                mangled.append(msg.meta["steps"][0]["session"])
                results = [dict(r) for r in env.meta["results"]]
                results[0] = {"result": {**results[0]["result"], "tokens": [[1], [1, 2]]}}
                env = Message(env.kind, {**env.meta, "results": results}, list(env.frames), env.session_id)
            return env

    edge = TierNode(plan, "edge", model=full, next_client=Ragged(cloud), batching=settings)
    device = TierNode(plan, "device", model=full, next_client=Recording(edge), batching=settings)
    jobs = [(p, 5) for p in _prompts(full, 4)]
    refs = [full.generate(p, n) for p, n in jobs]

    def session(i: int):
        deadline = time.monotonic() + 60
        return device.step(("peer", 1000 + i), PREFILL, 0, Payload(state=jobs[i][0]), max_new_tokens=5,
                           deadline=deadline).tokens  # fmt: skip

    got = _concurrently(session, len(jobs))
    assert mangled
    # the id each session went on to the cloud as: mixed by the device, then by the edge (its peer: "test-peer")
    to_cloud = {next_session_id(("test-peer", next_session_id(("peer", 1000 + i)))): i for i in range(len(jobs))}
    bad = to_cloud[mangled[0]]
    assert isinstance(got[bad], Exception)
    for i, (ref, tokens) in enumerate(zip(refs, got)):
        if i != bad:
            assert isinstance(tokens, torch.Tensor), (i, tokens)
            assert torch.equal(tokens, ref)
    assert len(device.sessions) == len(edge.sessions) == 0


def test_a_far_deadline_is_waited_for_not_an_overflow():
    """A request whose deadline is centuries away (``timeout_s=1e11``: "no deadline"): the decode loop's wait for
    its generation and a hop group's wait for its message still work (Event.wait past threading.TIMEOUT_MAX raises
    OverflowError)."""
    full = load_stages("builtin:gpt2-tiny")
    tier = TierNode(fixed_plan(full, (0, 0)), "cloud", model=full, batching=BatchSettings(16))
    p = _prompts(full, 1)[0]
    far = time.monotonic() + 1e11
    got = tier.step(("peer", 1), PREFILL, 0, Payload(state=p), max_new_tokens=3, deadline=far).tokens
    assert torch.equal(got, full.generate(p, 3))

    group = HopGroup(2, lambda items: [("ok", it.session_id) for it in items])
    seats = [HopSeat(group), HopSeat(group)]
    out = _concurrently(lambda i: seats[i].request(HopItem(i, None, [], 1e11)), 2)
    assert out == [("ok", 0), ("ok", 1)], out


def test_batched_steps_to_a_pool_of_replicas_reach_each_session_s_own_replica(tmp_path, monkeypatch):
    """An edge that batches in front of a pool of two cloud replicas (routing.PoolClient: a session's cache lives
    on the replica its id hashes to): generations of different lengths (the longest ends alone) each get their
    exact tokens; no step reaches a replica that does not hold its session."""
    full, plan, _ = _cloud("builtin:gpt2-tiny")
    replicas = {a: TierNode(plan, "cloud", model=full, batching=BatchSettings(16)) for a in ("r1:1", "r2:2")}

    class Replica(Recording):
        def reset(self) -> None:
            pass

    me = Identity.generate(tmp_path / "me")
    pool = PoolClient(list(replicas), identity=me, trust=[me], timeout_s=30)
    links = {a: Replica(n) for a, n in replicas.items()}
    monkeypatch.setattr(pool, "_client", lambda addr: links[addr])
    edge = TierNode(plan, "edge", model=full, next_client=pool, batching=BatchSettings(16, window_ms=50))
    zero = pool.ring.pick(0)
    sids = [s for s in range(100, 200) if pool.ring.pick(s) != zero][:2] + [
        s for s in range(100, 200) if pool.ring.pick(s) == zero
    ][:2]
    prompts = _prompts(full, 4)
    lengths = [7, 5, 3, 2]
    refs = [full.generate(p, n) for p, n in zip(prompts, lengths)]

    def session(i: int):
        deadline = time.monotonic() + 60
        return edge.step(("peer", sids[i]), PREFILL, 1, Payload(state=prompts[i]), max_new_tokens=lengths[i],
                         deadline=deadline).tokens  # fmt: skip

    got = _concurrently(session, 4)
    for ref, tokens in zip(refs, got):
        assert isinstance(tokens, torch.Tensor), tokens
        assert torch.equal(tokens, ref)
    assert all(len(n.sessions) == 0 for n in replicas.values())


def test_a_peer_s_far_deadline_fails_no_other_session_of_its_pass(tmp_path):
    """Over the real transport: one peer's request carries a deadline ~1e300 s away (its ``deadline_ms`` is only
    checked to be a number); the pass it shares with two honest sessions goes on to the cloud with a budget the
    transport takes (a larger one panics in the extension, PanicException, which failed the whole pass)."""
    full, plan, cloud = _cloud("builtin:gpt2-tiny")
    a, b = Identity.generate(tmp_path / "a"), Identity.generate(tmp_path / "b")
    with Server("127.0.0.1:0", identity=a, trust=[b], handler=cloud.handle) as srv:
        client = Client(srv.address, identity=b, trust=[a])
        try:
            edge = TierNode(plan, "edge", model=full, next_client=client, batching=BatchSettings(16, window_ms=100))
            prompts = _prompts(full, 3)
            far = [1e300, 60.0, 60.0]

            def session(i: int):
                deadline = time.monotonic() + far[i]
                return edge.step(("peer", 10 + i), PREFILL, 1, Payload(state=prompts[i]), max_new_tokens=3,
                                 deadline=deadline).tokens  # fmt: skip

            got = _concurrently(session, 3)
        finally:
            client.close()
    for p, tokens in zip(prompts, got):
        assert isinstance(tokens, torch.Tensor), tokens
        assert torch.equal(tokens, full.generate(p, 3))


def test_a_batched_message_whose_first_step_fails_is_still_counted_once():
    """The link's message count sums to the messages sent (a batched message counts on one of its sessions): also
    when the cloud answers the message's first step with an error."""
    full, plan, cloud = _cloud("builtin:gpt2-tiny")
    link = Recording(cloud)
    edge = TierNode(plan, "edge", model=full, next_client=link, batching=BatchSettings(16))
    items = [
        HopItem(i, replace(m, sender="edge"), [b"garbage"] + frames[1:] if i == 0 else frames, 30.0)
        for i, (m, frames) in enumerate(_prefill_steps(full, plan, cloud, 3))
    ]
    answers = edge._send_batch(items)
    assert isinstance(answers[0], Exception) and all(isinstance(a, tuple) for a in answers[1:]), answers
    assert sum(a[2] for a in answers[1:]) == sum(link.kinds.values()) == 1
