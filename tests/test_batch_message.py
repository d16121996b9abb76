"""The batched hop (protocol.InferBatch -> ResultBatch, runtime/batching.py HopGroup): the sessions of one batch
pass cross to the next tier as one message; the receiver runs them as one pass and answers each session, a failing
session alone with its error; malformed or oversized batches are refused and the tier keeps serving; generations
over the batched hop give each session's own tokens, in-process and across three processes."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from runtime_support import Direct
from test_batching import _concurrently, _generate, _prompts, run_on_cluster
from test_metrics import total

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import Timeout, TransportError
from aiflow_cli.models import load_stages
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.batching import BatchSettings, HopGroup, HopItem, HopSeat
from aiflow_cli.runtime.node import Payload, TierNode, next_session_id
from aiflow_cli.runtime.protocol import (
    DECODE,
    PREFILL,
    BatchStep,
    Error,
    Infer,
    InferBatch,
    Result,
    ResultBatch,
    TensorSpec,
)
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.runtime.wire import pack_state
from aiflow_cli.transport import Message, PeerInfo

PEER = PeerInfo("127.0.0.1:0", "test-peer", 1)


class Recording(Direct):
    """:class:`Direct` that also counts the messages it carries by kind."""

    def __init__(self, target) -> None:
        super().__init__(target)
        self.kinds: dict[str, int] = {}
        self._lock = threading.Lock()

    def request(self, msg, timeout_s):
        with self._lock:
            self.kinds[msg.kind] = self.kinds.get(msg.kind, 0) + 1
        return super().request(msg, timeout_s)


def _roundtrip(msg, frames=()):
    env = protocol.encode(msg, list(frames))
    assert env.kind == msg.KIND and type(env.meta) is dict  # batches travel as JSON
    return protocol.decode(Message(env.kind, env.meta, list(env.frames), 0))


def _infer(stage: int, n_tensors: int, **kw) -> Infer:
    specs = tuple(TensorSpec(f"t{i}", "hidden", "raw") for i in range(n_tensors))
    return Infer("ph", "edge", kw.pop("phase", DECODE), stage, specs, **kw)


def test_batch_messages_round_trip_with_every_session_field():
    steps = (
        BatchStep(7, _infer(3, 2, max_new_tokens=5, last=False, deadline_ms=1234.5, traceparent="00-" + "a" * 49)),
        BatchStep(2**63 + 5, _infer(3, 1, phase=PREFILL, temperature=0.7, top_k=5, top_p=0.9, seed=11, index=4)),
        BatchStep(0, _infer(4, 3)),
    )
    msg = InferBatch("ph", "edge", steps, 999.0)
    frames = [bytes([i]) * (i + 1) for i in range(6)]
    got = _roundtrip(msg, frames)
    assert got == msg
    assert [f for _, fs in got.split(frames) for f in fs] == frames
    assert [len(fs) for _, fs in got.split(frames)] == [2, 1, 3]

    t = Timings()
    t.tier("cloud").compute_ms = 1.5
    results = (
        Result(t, [[5]]),
        Error("Timeout", "too late", "cloud"),
        Result(Timings(), None, (TensorSpec("output", "hidden", "raw"),)),
    )
    rb = _roundtrip(ResultBatch(results), [b"out"])
    assert rb.results[0].tokens == [[5]] and rb.results[0].timings.tier("cloud").compute_ms == 1.5
    assert isinstance(rb.results[1], Error) and isinstance(rb.results[1].exception(), Timeout)
    parts = rb.split([b"out"])
    assert parts[0][1] == [] and parts[1] is rb.results[1] and parts[2][1] == [b"out"]


def _cloud(name: str):
    full = load_stages(name)
    plan = fixed_plan(full, (1, full.num_stages - 2))
    return full, plan, TierNode(plan, "cloud", model=full)


def _prefill_steps(full, plan, cloud, n: int) -> list[tuple[Infer, list]]:
    """The cloud's prefill steps of ``n`` prompts of different lengths, as the edge would send them."""
    start = cloud.stages.start
    out = []
    for p in _prompts(full, n):
        state = full.run(p, range(start))
        packed = pack_state(state, full.roles(state), "raw")
        out.append((Infer(cloud.plan_hash, "edge", PREFILL, start, packed.tensors, 4, False), packed.frames))
    return out


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny"])
def test_a_batch_answers_what_single_messages_answer_and_a_failing_session_fails_alone(name):
    """5 prefills as one batch == each sent alone to another cloud; then a batch of decode steps in which one
    session is unknown to the cloud and one carries a garbled state: those two get their errors (the same as sent
    alone), the others their tokens."""
    full, plan, batched_cloud = _cloud(name)
    single_cloud = TierNode(plan, "cloud", model=full)
    steps = _prefill_steps(full, plan, batched_cloud, 5)
    singles = []
    for sid, (m, frames) in enumerate(steps):
        reply = single_cloud.handle(protocol.encode(m, frames, sid), PEER)
        singles.append(protocol.expect_reply(reply, Result).tokens)
    batch = InferBatch(batched_cloud.plan_hash, "edge", tuple(BatchStep(sid, m) for sid, (m, _) in enumerate(steps)))
    env = batched_cloud.handle(protocol.encode(batch, [f for _, fs in steps for f in fs]), PEER)
    got = protocol.expect_reply(env, ResultBatch)
    assert [r.tokens for r in got.results] == singles
    assert batched_cloud.batcher.largest == 5  # one pass for the five, no window waited for
    assert len(batched_cloud.sessions) == 5

    # decode steps: session 1 unknown to the cloud (id 99), session 3's state garbled; the others as sent alone
    entries, frames_all, singles_decode = [], [], []
    for sid in range(5):
        state = _solo_decode_input(full, batched_cloud, sid, singles[sid][0][0])
        packed = pack_state(state, full.roles(state), "raw")
        frames = [b"garbage"] + packed.frames[1:] if sid == 3 else packed.frames
        m = Infer(batched_cloud.plan_hash, "edge", DECODE, batched_cloud.stages.start, packed.tensors, 0, False)
        entries.append(BatchStep(99 if sid == 1 else sid, m))
        frames_all += frames
        singles_decode.append(
            protocol.decode(single_cloud.handle(protocol.encode(m, frames, entries[-1].session_id), PEER))
        )
    batch = InferBatch(batched_cloud.plan_hash, "edge", tuple(entries))
    got = protocol.expect_reply(batched_cloud.handle(protocol.encode(batch, frames_all), PEER), ResultBatch)
    assert isinstance(got.results[1], Error) and "99" in got.results[1].message  # unknown session
    assert isinstance(got.results[3], Error) and "frame" in got.results[3].message.lower()
    for i in (0, 2, 4):
        assert isinstance(got.results[i], Result) and got.results[i].tokens == singles_decode[i].tokens
    assert isinstance(singles_decode[1], Error) and isinstance(singles_decode[3], Error)  # singles fail the same way


def _solo_decode_input(full, cloud, sid: int, token: int):
    """The state the edge sends the cloud for session ``sid``'s first decode step (its own KV cache, rebuilt)."""
    p = _prompts(full, 5)[sid]
    cache = full.new_cache()
    full.run(p, range(cloud.stages.start), cache)
    step = full.next_inputs(full.decode_inputs_of(full.run(p, range(full.decode_start))), torch.tensor([token]))
    return full.run(step, range(full.decode_start, cloud.stages.start), cache)


def test_malformed_and_oversized_batches_are_refused_and_the_tier_keeps_serving(monkeypatch):
    full, plan, cloud = _cloud("builtin:gpt2-tiny")
    steps = _prefill_steps(full, plan, cloud, 2)
    good = InferBatch(cloud.plan_hash, "edge", tuple(BatchStep(i, m) for i, (m, _) in enumerate(steps)))
    frames = [f for _, fs in steps for f in fs]
    meta = protocol.encode(good, frames).meta

    def refused(m: dict, fr=frames, match: str = "malformed infer_batch") -> None:
        reply = protocol.decode(cloud.handle(Message(protocol.INFER_BATCH, m, list(fr), 0), PEER))
        assert isinstance(reply, Error) and match in reply.message, reply

    refused({**meta, "steps": "no"})
    refused({**meta, "steps": []}, [], "0 entries")
    refused({**meta, "steps": [meta["steps"][0], 5]})
    refused({**meta, "steps": [meta["steps"][0], {**meta["steps"][1], "session": 0}]}, match="appears twice")
    refused({**meta, "steps": [meta["steps"][0], {**meta["steps"][1], "session": -1}]})
    refused({**meta, "steps": [meta["steps"][0], {**meta["steps"][1], "phase": "x"}]}, match="malformed infer")
    refused(meta, frames[:-1], "frames")
    many = [{**meta["steps"][0], "session": i} for i in range(protocol.MAX_BATCH_SESSIONS + 1)]
    refused({**meta, "steps": many}, frames * (protocol.MAX_BATCH_SESSIONS + 1), f"1 to {protocol.MAX_BATCH_SESSIONS}")
    monkeypatch.setattr(protocol, "MAX_BATCH_BYTES", sum(map(len, frames)) - 1)
    refused(meta, frames, "frame bytes")
    monkeypatch.undo()
    assert len(cloud.sessions) == 0  # nothing refused opened a session
    reply = protocol.expect_reply(cloud.handle(Message(protocol.INFER_BATCH, meta, list(frames), 0), PEER), ResultBatch)
    assert all(isinstance(r, Result) and r.tokens for r in reply.results)  # still serving


def test_a_hop_group_sends_once_for_its_seats_and_a_seat_that_leaves_is_not_waited_for():
    sent: list[list[int]] = []

    def send(items):
        sent.append([it.session_id for it in items])
        return [("ok", it.session_id) if it.session_id != 2 else TransportError("bad 2") for it in items]

    group = HopGroup(4, send)
    seats = [HopSeat(group) for _ in range(4)]
    out: list = [None] * 4

    def run(i):
        try:
            if i == 3:
                seats[i].leave()
                seats[i].leave()  # idempotent
            else:
                out[i] = seats[i].request(HopItem(i, None, [], 10.0))
        except Exception as e:  # noqa: BLE001
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(sent) == 1 and sorted(sent[0]) == [0, 1, 2]
    assert out[0] == ("ok", 0) and out[1] == ("ok", 1) and isinstance(out[2], TransportError) and out[3] is None

    def broken(items):
        raise TransportError("link down")

    g = HopGroup(2, broken)
    s = [HopSeat(g), HopSeat(g)]
    res = _concurrently(lambda i: s[i].request(HopItem(i, None, [], 10.0)), 2)
    assert all(isinstance(r, TransportError) for r in res)


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny", "smollm2"])
def test_generations_over_the_batched_hop_equal_solo_runs(name):
    """8 concurrent sessions through an in-process edge + cloud: the edge's passes cross to the cloud as batched
    messages (fewer messages than steps), and every session gets the model's own greedy tokens."""
    full = load_stages(name)
    plan = fixed_plan(full, (1, full.num_stages - 2))
    settings = BatchSettings(16, window_ms=3)
    cloud = TierNode(plan, "cloud", model=full, batching=settings)
    link = Recording(cloud)
    edge = TierNode(plan, "edge", model=full, next_client=link, batching=settings)
    n, new = (8, 5) if name != "smollm2" else (4, 3)
    jobs = [(p, new) for p in _prompts(full, n)]
    got = _generate(edge, full, jobs)
    for (p, k), tokens in zip(jobs, got):
        assert isinstance(tokens, torch.Tensor), tokens
        assert torch.equal(tokens, full.generate(p, k))
    assert link.kinds.get(protocol.INFER_BATCH, 0) > 0
    assert sum(link.kinds.values()) < n * new  # fewer messages than the steps they carried
    assert len(edge.sessions) == len(cloud.sessions) == 0


def test_three_processes_carry_batched_steps_between_edge_and_cloud(tmp_path):
    """Real device + edge + cloud processes (QUIC, mutual TLS), 8 devices at once: each gets its prompt's own
    tokens, and the cloud received batched messages, fewer messages than steps; its metrics count every session
    step as a request (as with batching off), with its own compute and codec times, and the messages apart."""
    texts = [f"device {i} asks " + "y" * (i * 2) for i in range(8)]
    out, refs, samples = run_on_cluster(tmp_path, texts, 6)
    cloud = samples["cloud"]
    for got, ref in zip(out, refs):
        assert not isinstance(got, Exception), got
        assert torch.equal(got.tokens, ref)
    steps = len(texts) * 7  # 6 steps a request + the warm-up's prefill, on each tier
    assert total(cloud, "aiflow_batch_messages_total", tier="cloud") > 0
    assert total(cloud, "aiflow_requests_total", tier="cloud", kind=protocol.INFER_BATCH) == 0
    assert total(cloud, "aiflow_requests_total", tier="cloud", kind=protocol.INFER, phase=PREFILL) == 2 * len(texts)
    assert total(cloud, "aiflow_requests_total", tier="cloud", kind=protocol.INFER, phase=DECODE) == 5 * len(texts)
    assert total(cloud, "aiflow_request_errors_total", tier="cloud") == 0
    # the edge drives: it receives each request's prefill and answers it with all its tokens (its decode loop's
    # steps are in that request's figures); the cloud receives every step
    for tier, requests in (("edge", 2 * len(texts)), ("cloud", steps)):
        s = samples[tier]
        assert total(s, "aiflow_requests_total", tier=tier, kind=protocol.INFER) == requests, tier
        assert total(s, "aiflow_request_duration_seconds_count", tier=tier) == requests, tier
        assert total(s, "aiflow_stage_compute_seconds_count", tier=tier) == requests, tier
        assert 0 < total(s, "aiflow_stage_compute_seconds_sum", tier=tier) < 60, tier
        assert total(s, "aiflow_codec_seconds_count", tier=tier, op="decode") == requests, tier
        assert total(s, "aiflow_batch_size_sum", tier=tier) == steps, tier  # every step in one pass
    # the link's message count (a batch counts once, on one of its sessions) is fewer messages than steps
    sent = sum(r.timings.links["edge-cloud"].messages for r in out)
    assert 0 < sent < len(texts) * 6
    # bytes: what the edge sent up (and got back) is what the cloud received (and answered), batches included
    for direction in ("up", "down"):
        e = total(samples["edge"], "aiflow_link_bytes_total", link="edge-cloud", direction=direction)
        assert e > 0 and e == total(cloud, "aiflow_link_bytes_total", link="edge-cloud", direction=direction)


def test_a_tier_that_drives_and_outputs_steps_all_its_generations_in_one_loop():
    """The whole model on one tier (``--split 0,0``: the cloud drives and picks tokens): 8 concurrent generations
    of different lengths are stepped by its decode loop together and each gets its own greedy tokens."""
    full = load_stages("builtin:llama-tiny")
    plan = fixed_plan(full, (0, 0))
    cloud = TierNode(plan, "cloud", model=full, batching=BatchSettings(16))
    assert cloud.loop is not None and cloud.is_output
    jobs = [(p, 2 + i % 5) for i, p in enumerate(_prompts(full, 8))]
    got = _concurrently(
        lambda i: (
            cloud.step(
                ("peer", i),
                PREFILL,
                0,
                Payload(state=jobs[i][0]),
                max_new_tokens=jobs[i][1],
                deadline=time.monotonic() + 60,
            ).tokens
        ),
        len(jobs),
    )
    for (p, n), tokens in zip(jobs, got):
        assert isinstance(tokens, torch.Tensor), tokens
        assert torch.equal(tokens, full.generate(p, n))
    assert cloud.batcher.largest > 1 and len(cloud.sessions) == 0


def test_a_generation_that_fails_in_the_decode_loop_fails_alone():
    """Mid-generation the cloud loses one session (as if evicted): that request fails with the cloud's error, the
    other generations of the same loop get their exact tokens, and both tiers end every session."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (1, full.num_stages - 2))
    cloud = TierNode(plan, "cloud", model=full, batching=BatchSettings(16))

    dropped: list[int] = []
    sid = next_session_id(("peer", 1003))

    class DropsOne(Recording):
        def request(self, msg, timeout_s):
            steps = msg.meta["steps"] if msg.kind == protocol.INFER_BATCH else []
            if not dropped and any(s["session"] == sid and s["phase"] == DECODE for s in steps):
                dropped.append(len(steps))
                cloud.sessions.close(("test-peer", sid))  # job 3's session (the id the edge sends it on as)
            return super().request(msg, timeout_s)

    edge = TierNode(plan, "edge", model=full, next_client=DropsOne(cloud), batching=BatchSettings(16))
    jobs = [(p, 8) for p in _prompts(full, 6)]
    got = _generate(edge, full, jobs)
    assert dropped and dropped[0] > 1  # dropped from a batched message of several sessions
    assert isinstance(got[3], Exception) and f"no session {sid}" in str(got[3])
    for i, ((p, n), tokens) in enumerate(zip(jobs, got)):
        if i != 3:
            assert isinstance(tokens, torch.Tensor), tokens
            assert torch.equal(tokens, full.generate(p, n))
    assert len(edge.sessions) == len(cloud.sessions) == 0


def _middle_chain(settings: BatchSettings):
    """gpt2-tiny on device [0:2) (it drives) + edge [2:4) (a middle tier: it keeps a cache but neither drives nor
    outputs) + cloud [4:7), in-process, with recording links."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (2, 4))
    cloud = TierNode(plan, "cloud", model=full, batching=settings)
    to_cloud = Recording(cloud)
    edge = TierNode(plan, "edge", model=full, next_client=to_cloud, batching=settings)
    to_edge = Recording(edge)
    device = TierNode(plan, "device", model=full, next_client=to_edge, batching=settings)
    assert device.is_driver and not edge.is_driver and not edge.is_output and edge.batcher is not None
    return full, device, edge, cloud, to_edge, to_cloud


def test_a_middle_tier_runs_a_batch_as_one_pass_and_sends_it_on_as_one_message():
    """The edge between a driving device and the cloud: each batched message it receives runs as one pass on the
    receiving thread (no thread per step) and goes on to the cloud as one message; every session
    gets the model's own greedy tokens and every tier ends every session."""
    full, device, edge, cloud, to_edge, to_cloud = _middle_chain(BatchSettings(16))
    jobs = [(p, 5) for p in _prompts(full, 6)]
    got = _generate(device, full, jobs)
    for (p, k), tokens in zip(jobs, got):
        assert isinstance(tokens, torch.Tensor), tokens
        assert torch.equal(tokens, full.generate(p, k))
    assert to_edge.kinds.get(protocol.INFER_BATCH, 0) > 0
    # each batch goes on as one message (single steps that meet in the edge's batcher may join into one more)
    assert 0 < sum(to_cloud.kinds.values()) <= sum(to_edge.kinds.values())
    assert to_cloud.kinds.get(protocol.INFER_BATCH, 0) >= to_edge.kinds[protocol.INFER_BATCH]
    assert edge._batch_pool is None  # no step ran on a thread of its own
    assert len(device.sessions) == len(edge.sessions) == len(cloud.sessions) == 0


def test_a_generation_that_outlives_its_wait_leaves_the_decode_loop():
    """A decode step that hangs past a generation's deadline (+ the loop's grace): its request fails with a
    Timeout, the loop drops that generation (its session freed) before its next step, and the other generation of
    the loop goes on to its exact tokens."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (1, full.num_stages - 2))
    cloud = TierNode(plan, "cloud", model=full, batching=BatchSettings(16))
    blocked: list[int] = []

    class Hangs(Recording):
        def request(self, msg, timeout_s):
            if msg.kind == protocol.INFER_BATCH and not blocked and msg.meta["steps"][0]["phase"] == DECODE:
                blocked.append(len(msg.meta["steps"]))
                time.sleep(2.0)  # past the short request's deadline + grace
            return super().request(msg, timeout_s)

    link = Hangs(cloud)
    edge = TierNode(plan, "edge", model=full, next_client=link, batching=BatchSettings(16))
    edge.loop.grace_s = 0.1
    (short, long_) = _prompts(full, 2)

    def session(i: int):
        deadline = time.monotonic() + (0.8 if i == 0 else 60)
        return edge.step(
            ("peer", 1000 + i), PREFILL, 1, Payload(state=(short, long_)[i]), max_new_tokens=8, deadline=deadline
        ).tokens

    got = _concurrently(session, 2)
    assert blocked == [2]  # both generations were in the hung step
    assert isinstance(got[0], Timeout) and "did not end within its deadline" in str(got[0]), got[0]
    assert torch.equal(got[1], full.generate(long_, 8))
    for _ in range(100):  # the loop ends once the long generation has its tokens
        if not edge.loop._running:
            break
        time.sleep(0.05)
    assert not edge.loop._running
    assert len(edge.sessions) == 0
    # the edge ended the failed session on the cloud too (an End message, sent on a thread), as after any failed
    # request: not at the idle expiry
    for _ in range(100):
        if len(cloud.sessions) == 0:
            break
        time.sleep(0.05)
    assert len(cloud.sessions) == 0 and link.kinds.get(protocol.END) == 1
