"""Hostile peers against today's features: speculative ``verify`` rounds whose drafts, distributions, cache
lengths or positions do not add up, sampled ``infer`` steps out of range in the binary header, malformed decode steps
mixed into the batches of good sessions. Every one is answered with a one-line ``TransportError`` reply, the servers
keep serving and every good session gets the monolithic model's tokens. Edge and cloud are real processes."""

from __future__ import annotations

import math
import re
import socket
import threading
import time

import pytest
import torch

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import TransportError
from aiflow_cli.models import load_stages
from aiflow_cli.models.sampling import Sampling
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime import speculate as spec
from aiflow_cli.runtime.batching import BatchSettings
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.protocol import Infer, Verify
from aiflow_cli.runtime.routing import PoolClient
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.runtime.wire import pack_state, unpack_state
from aiflow_cli.transport import Client, Identity, Message, Server

MODEL = "builtin:gpt2-tiny"


# -- messages alone ----------------------------------------------------------------------------------------------
def test_a_round_never_carries_more_drafts_than_the_protocol_accepts():
    assert spec.MAX_K <= protocol.MAX_DRAFTS and spec.AUTO_MAX <= protocol.MAX_DRAFTS
    v = Verify("h", "x", 2, (), 5, tuple(range(protocol.MAX_DRAFTS)), 3).to_wire()
    assert Verify.from_wire(v).draft == tuple(range(protocol.MAX_DRAFTS))
    for draft in ([0] * (protocol.MAX_DRAFTS + 1), [0] * 10**6):
        with pytest.raises(TransportError, match=f"at most {protocol.MAX_DRAFTS} token ids"):
            Verify.from_wire({**v, "draft": draft})


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("temperature", -1.0, "temperature"),
        ("temperature", math.nan, "temperature"),
        ("temperature", math.inf, "temperature"),
        ("temperature", 101.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_p", math.nan, "top_p"),
        ("top_k", -1, "top_k"),
        ("seed", -1, "seed"),
        ("index", -1, "index"),
    ],
)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sampling_fields_out_of_range_in_a_binary_header_are_refused(field, value, why, temperature):
    msg = Infer("h", "x", "decode", 2, (), 3, temperature=temperature)
    setattr(msg, field, value)
    env = protocol.encode(msg)
    assert isinstance(env.meta, bytes)  # the binary header path, not JSON
    with pytest.raises(TransportError, match=f"malformed infer message: .*{why}") as e:
        protocol.decode(env)
    assert "\n" not in str(e.value)


def test_a_meta_that_is_no_json_object_is_refused():
    for meta in ([1, 2], "infer", 7):
        with pytest.raises(TransportError, match="not a JSON object"):
            protocol.decode(Message(protocol.VERIFY, meta))  # type: ignore[arg-type]


# -- real processes ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    full = load_stages(MODEL)
    save_plan(fixed_plan(full, (2, 4)), d / "plan.json")  # device drives (embed + a block), edge, cloud: head
    with LocalCluster(d / "plan.json", d, batching=BatchSettings(16, window_ms=5)) as c:
        yield full, c


def _recorded(cluster, sampling: Sampling, speculate, n: int) -> list[Message]:
    """The messages a device sends to the edge during one generation."""
    sent: list[Message] = []
    with cluster.pipeline(timeout_s=30, speculate=speculate) as p:
        real = p.node.next.request

        def record(env, timeout_s=None):
            sent.append(env)
            return real(env, timeout_s=timeout_s)

        p.node.next.request = record
        p.run(text="the hostile peer", max_new_tokens=n, sampling=sampling)
    return sent


def _client(cluster) -> Client:
    return Client(
        cluster.addresses["edge"], identity=cluster.keys["device"], trust=cluster.fingerprints(), timeout_s=30
    )


def _error(reply: Message) -> tuple[str, str]:
    assert reply.kind == protocol.ERROR, reply.kind
    return reply.meta["error_kind"], reply.meta["message"]


def test_inconsistent_verify_rounds_get_one_line_errors_and_the_tiers_keep_serving(setup):
    full, cluster = setup
    x = full.raw_input(text="the hostile peer")
    vocab = full.output(full.run(full.prepare(text="v")))[0].shape[-1]
    sent = _recorded(cluster, Sampling(temperature=1.0, seed=3), 3, 8)
    prefill = sent[0]
    verify = next(m for m in sent if m.kind == protocol.VERIFY)
    v = verify.meta
    g = len(v["draft"])
    assert g >= 1 and len(v["dists"]) == g and "temperature" in v
    one = [[0], [1.0]]
    bad = [
        ({"draft": [vocab] * g, "dists": [[[vocab], [1.0]]] * g}, "past the vocabulary"),
        ({"dists": [[[vocab], [1.0]]] + v["dists"][1:]}, "past the vocabulary"),  # a valid draft, a bad dist
        ({"draft": [vocab + 7] * g, "temperature": 0.0}, "past the vocabulary"),  # greedy: the same check
        ({"draft": [0] * 50_000, "dists": [one] * 50_000}, "at most 32 token ids"),  # under the 1 MiB meta limit
        ({"dists": v["dists"] + [one] * 50_000}, "dists"),
        ({"cache_len": 10**9}, "cache_len 1000000000 is past the"),
        ({"cache_len": -1}, "must be >= 0"),
        ({"remaining": 0}, "remaining 0 >= 1"),
        ({"remaining": -(2**70)}, "remaining"),
        ({"index": -1}, "index"),
        ({"draft": v["draft"][:-1], "dists": v["dists"][:-1]}, f"{g - 1} drafts need {g} positions"),
        ({"draft": v["draft"] + [0], "dists": v["dists"] + [one]}, f"{g + 1} drafts need {g + 2} positions"),
        ({"dists": [[[0, 1], [0.9, 0.9]]] + v["dists"][1:]}, "sum to 1"),
        ({"dists": [[[0, 0], [0.5, 0.5]]] + v["dists"][1:]}, "distinct"),
        ({"temperature": "hot"}, "temperature"),  # (NaN is no JSON: the transport refuses it)
        ({"top_p": 0}, "top_p"),
        ({"seed": 2**63}, "seed"),
    ]
    c = _client(cluster)
    try:
        for i, (change, why) in enumerate(bad):
            sid = 700_000 + i
            assert c.request(Message(prefill.kind, prefill.meta, prefill.frames, sid)).kind == protocol.RESULT
            kind, message = _error(c.request(Message(protocol.VERIFY, {**v, **change}, verify.frames, sid)))
            assert kind == "TransportError" and why in message, (change.keys(), kind, message)
            assert "\n" not in message and "Traceback" not in message
        # the recorded round itself is still answered, on a fresh session, and so are whole generations
        sid = 800_000
        assert c.request(Message(prefill.kind, prefill.meta, prefill.frames, sid)).kind == protocol.RESULT
        ok = c.request(Message(protocol.VERIFY, v, verify.frames, sid))
        assert ok.kind == protocol.RESULT and len(protocol.decode(ok).tokens[0]) == g + 1
    finally:
        c.close()
    with cluster.pipeline(timeout_s=30, speculate=2) as p:
        assert torch.equal(p.run(text="the hostile peer", max_new_tokens=6).tokens, full.generate(x, 6))
    for tier in ("edge", "cloud"):
        assert cluster.servers[tier].alive()
        assert "Traceback" not in cluster.servers[tier].log_path.read_text(errors="replace")


def _mangled(env: Message, sid: int, how: str) -> Message:
    """``env`` (a decode step) for session ``sid`` with its state broken as ``how`` says."""
    msg = protocol.decode(env)
    state, roles, _ = unpack_state(msg.tensors, env.frames)
    if how == "wide":  # one more hidden unit than the model has
        state["hidden_states"] = torch.cat([state["hidden_states"], state["hidden_states"][..., :1]], dim=-1)
    elif how == "mask":  # an attention mask one position longer than the session's past + 1
        state["attention_mask"] = torch.cat([state["attention_mask"], state["attention_mask"][:, :1]], dim=1)
    elif how == "position":  # a position far past GPT-2's position table
        state["position_ids"] = state["position_ids"] + 10**6
    packed = pack_state(state, roles, "raw")
    msg.tensors = tuple(packed.tensors)
    return protocol.encode(msg, packed.frames, sid)


def test_malformed_steps_in_the_batches_of_good_sessions_fail_only_their_own_request(setup):
    """8 good devices generate at once while a hostile peer keeps opening sessions and sending decode steps whose
    state is wrong (hidden size, mask length, positions) or that it abandons mid-step: every good session gets
    the monolithic model's tokens, the hostile steps get error replies, and the batches did mix them."""
    full, cluster = setup
    sent = _recorded(cluster, Sampling(), None, 3)
    prefill, step = sent[0], sent[1]
    assert protocol.decode(step).phase == protocol.DECODE
    texts = [f"good device {i} " + "y" * (3 * i) for i in range(8)]
    refs = [full.generate(full.raw_input(text=t), 10) for t in texts]
    pipes = [cluster.pipeline(timeout_s=60) for _ in texts]
    for p in pipes:
        p.run(text="warm up", max_new_tokens=1)  # opens its connection
    stop = threading.Event()
    hostile_replies: list[tuple[str, str, str]] = []  # (how, reply kind, error message)

    def hostile() -> None:
        c, i = _client(cluster), 0
        try:
            while not stop.is_set():
                i += 1
                sid = 900_000 + i
                c.request(Message(prefill.kind, prefill.meta, prefill.frames, sid))
                how = ("wide", "mask", "position", "abandon")[i % 4]
                if how == "abandon":  # the peer gives up at once: the server answers into a closed stream
                    quitter = _client(cluster)
                    quitter.request(Message(prefill.kind, prefill.meta, prefill.frames, sid))
                    with pytest.raises(TransportError):
                        quitter.request(Message(step.kind, step.meta, step.frames, sid), timeout_s=0.001)
                    quitter.close()
                    continue
                reply = c.request(_mangled(step, sid, how))
                hostile_replies.append(
                    (how, reply.kind, reply.meta.get("message", "") if reply.kind == "error" else "")
                )
        except Exception as e:  # noqa: BLE001 - checked below
            hostile_replies.append(("raised", type(e).__name__, str(e)))
        finally:
            c.close()

    out: list = [None] * len(texts)

    def good(i: int) -> None:
        try:
            out[i] = [pipes[i].run(text=texts[i], max_new_tokens=10).tokens for _ in range(2)]
        except Exception as e:  # noqa: BLE001 - checked below
            out[i] = e

    h = threading.Thread(target=hostile)
    h.start()
    threads = [threading.Thread(target=good, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    h.join(60)
    for p in pipes:
        p.close()
    for got, ref in zip(out, refs):
        assert isinstance(got, list), got
        assert all(torch.equal(g, ref) for g in got)
    assert not [r for r in hostile_replies if r[0] == "raised"], hostile_replies
    wide = [r for r in hostile_replies if r[0] == "wide"]
    assert wide and all(kind == protocol.ERROR for _, kind, _ in wide), wide  # a state the model cannot run
    assert all("\n" not in message for _, _, message in hostile_replies)
    # (a longer mask or far positions run on this split's blocks: the peer's own session, its own tokens)
    for tier in ("edge", "cloud"):
        assert cluster.servers[tier].alive()
        assert "Traceback" not in cluster.servers[tier].log_path.read_text(errors="replace")


# -- a pool of replicas ------------------------------------------------------------------------------------------
def _dead_addresses(n: int) -> list[str]:
    """Loopback addresses where no server listens (ports just bound and released)."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        out.append(f"127.0.0.1:{s.getsockname()[1]}")
        s.close()
    return out


def _prefill(sid: int) -> Message:
    return protocol.encode(Infer("h", "test", protocol.PREFILL, 2, (), 3, last=False), [], sid)


def test_a_pool_moves_new_sessions_off_a_replica_that_no_longer_listens(tmp_path):
    """A replica whose server is gone (nobody answers the QUIC handshake) is failed over like one that died
    mid-session: a session the ring gives it is answered by a live replica, and it is skipped afterwards."""
    me, server_key = Identity.generate(tmp_path / "me"), Identity.generate(tmp_path / "server")
    answered: list[int] = []

    def handler(env: Message, peer) -> Message:
        answered.append(env.session_id)
        return protocol.encode(protocol.Result(Timings(), tokens=[[7]]))

    with Server("127.0.0.1:0", identity=server_key, trust=[me], handler=handler) as live:
        dead = _dead_addresses(1)[0]
        pool = PoolClient([dead, live.address], identity=me, trust=[server_key], timeout_s=10)
        try:
            sid = next(s for s in range(1000) if next(pool.ring.walk(s)) == dead)
            t0 = time.monotonic()
            reply = protocol.expect_reply(pool.request(_prefill(sid)), protocol.Result)
            assert reply.tokens == [[7]] and answered == [sid]
            assert time.monotonic() - t0 < 8  # one handshake timeout, not the request's whole deadline
            assert pool.failovers and pool.failovers[0]["from"] == dead and pool.failovers[0]["to"] == live.address
            t0 = time.monotonic()
            other = next(s for s in range(1000, 2000) if next(pool.ring.walk(s)) == dead)
            protocol.expect_reply(pool.request(_prefill(other)), protocol.Result)
            assert time.monotonic() - t0 < 1.0  # the gone replica is skipped now
        finally:
            pool.close()


def test_a_pool_whose_replicas_are_all_gone_fails_in_bounded_time_with_one_line(tmp_path):
    me, server_key = Identity.generate(tmp_path / "me"), Identity.generate(tmp_path / "server")
    pool = PoolClient(_dead_addresses(3), identity=me, trust=[server_key], timeout_s=4)
    try:
        for sid in (1, 2):  # (QUIC gives up an unanswered handshake after about 3 s)
            t0 = time.monotonic()
            with pytest.raises(TransportError) as e:
                pool.request(_prefill(sid))
            assert time.monotonic() - t0 < 4 + 1.0
            assert "\n" not in str(e.value)
            assert re.search("is a server listening there|no live replica|no replica answered", str(e.value)), e.value
    finally:
        pool.close()


# -- a damaged or forged exit adapter file ------------------------------------------------------------------------
def test_a_damaged_exit_adapter_file_is_one_line_model_error(tmp_path):
    import json

    from safetensors.torch import save_file

    from aiflow_cli.errors import ModelError
    from aiflow_cli.models.exit_adapter import META_KEY, ExitAdapter

    good = {"down.weight": torch.zeros(4, 16), "up.weight": torch.zeros(16, 4)}
    meta = {META_KEY: json.dumps({"exit_layer": 1, "model_hash": "abc"})}
    cases = {
        "shapes": ({"down.weight": torch.zeros(4, 16), "up.weight": torch.zeros(8, 4)}, meta, "shapes"),
        "one-dim": ({"down.weight": torch.zeros(4), "up.weight": torch.zeros(4)}, meta, "shapes"),
        "meta-list": (good, {META_KEY: "[1, 2]"}, "TypeError"),
        "no-layer": (good, {META_KEY: json.dumps({"model_hash": "abc"})}, "exit_layer"),
        "bad-layer": (good, {META_KEY: json.dumps({"exit_layer": "x"})}, "ValueError"),
        "no-meta": (good, None, "KeyError"),
    }
    for name, (tensors, md, why) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=md)
        with pytest.raises(ModelError, match=why) as e:
            ExitAdapter.load(path)
        assert "\n" not in str(e.value), name
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="not an aiflow exit adapter"):
        ExitAdapter.load(tmp_path / "junk.safetensors")
    save_file(good, str(tmp_path / "ok.safetensors"), metadata=meta)
    assert ExitAdapter.load(tmp_path / "ok.safetensors", "abc").exit_layer == 1


def test_json_integers_past_64_bits_are_refused_before_a_tier_re_sends_them_in_binary():
    base = Infer("h", "x", "prefill", 2, (), 3).to_wire() | {"v": protocol.PROTOCOL_VERSION}
    for key in ("max_new_tokens", "stage"):
        with pytest.raises(TransportError, match=f"field '{key}' must be an integer within 64 bits"):
            protocol.decode(Message(protocol.INFER, {**base, key: 2**70}))
    for key in ("index", "top_k"):
        with pytest.raises(TransportError, match=f"field '{key}' must be an integer within 64 bits"):
            protocol.decode(Message(protocol.INFER, {**base, "temperature": 0.5, key: 2**70}))
    v = Verify("h", "x", 2, (), 5, (1,), 3).to_wire() | {"v": protocol.PROTOCOL_VERSION}
    with pytest.raises(TransportError, match="field 'cache_len' must be an integer within 64 bits"):
        protocol.decode(Message(protocol.VERIFY, {**v, "cache_len": 2**64}))
