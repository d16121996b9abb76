"""The runtime under faults and load: refused peers, dead tiers, fallback, restarts, malformed messages, 32
concurrent devices, bounded session memory. Cloud and edge are real processes on loopback."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from runtime_support import three_tier_plan

from aiflow_cli.errors import AiflowError, InputError, LimitExceeded, PeerRejected, TransportError
from aiflow_cli.models import load_model
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.pipeline import Pipeline
from aiflow_cli.runtime.serve import TierProcess, TierSpec
from aiflow_cli.runtime.sessions import SessionStore
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.transport import Client, Identity, Message

MODEL = "builtin:gpt2-tiny"


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL)


def _reference(lm, text: str, n: int) -> torch.Tensor:
    return lm.generate(lm.prepare(text=text), n)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    three_tier_plan(MODEL, d / "plan.json", codec="raw")
    with LocalCluster(d / "plan.json", d) as c:
        yield c


def test_a_device_with_another_plan_is_refused_naming_the_side(cluster, tmp_path):
    three_tier_plan(MODEL, tmp_path / "other.json", codec="int8")
    with Pipeline(
        tmp_path / "other.json",
        edge=cluster.addresses["edge"],
        identity=cluster.keys["device"],
        trust=cluster.fingerprints(),
        timeout_s=20,
    ) as p:
        with pytest.raises(PeerRejected, match="plan mismatch: edge holds plan"):
            p.hello()
        with pytest.raises(PeerRejected, match="plan mismatch"):
            p.run(text="hi", max_new_tokens=2)


def test_an_untrusted_device_is_refused_at_the_handshake(cluster, tmp_path):
    stranger = Identity.generate(tmp_path / "stranger")
    with Pipeline(
        cluster.plan_path, edge=cluster.addresses["edge"], identity=stranger, trust=cluster.fingerprints(), timeout_s=20
    ) as p:
        with pytest.raises(PeerRejected):
            p.run(text="hi", max_new_tokens=2)


def _numbers(cls) -> int:
    """How many int and float fields dataclass ``cls`` has (its binary header's fixed block, with its bools)."""
    return sum(f.type in ("int", "float") for f in dataclasses.fields(cls))


def test_malformed_messages_get_errors_and_the_edge_keeps_serving(cluster, lm):
    c = Client(cluster.addresses["edge"], identity=cluster.keys["device"], trust=cluster.fingerprints(), timeout_s=20)
    plan_hash = protocol.plan_hash(
        Pipeline(
            cluster.plan_path,
            edge=cluster.addresses["edge"],
            identity=cluster.keys["device"],
            trust=cluster.fingerprints(),
        ).plan
    )
    base = {
        "v": protocol.PROTOCOL_VERSION,
        "plan_hash": plan_hash,
        "from": "test",
        "phase": "prefill",
        "stage": 2,
        "max_new_tokens": 1,
    }
    hidden = ["hidden_states", "hidden", "raw"]
    bad = [
        (Message("nonsense", dict(base)), "unknown message kind"),
        (
            Message(protocol.INFER, {**base, "v": 1}),
            f"version mismatch: this tier speaks version {protocol.PROTOCOL_VERSION}, the peer sent version 1",
        ),
        (Message(protocol.INFER, {k: v for k, v in base.items() if k != "v"}), "version mismatch"),
        (Message(protocol.INFER, {**base, "phase": "sideways"}), "unknown phase"),
        (Message(protocol.INFER, {**base, "stage": "2"}), "field 'stage' must be an integer"),
        (Message(protocol.INFER, {**base, "tensors": [{"name": "hidden_states"}]}, [b"AIFW"]), "field 'tensors'"),
        (Message(protocol.INFER, {**base, "tensors": [hidden]}, [b"not a frame"]), ""),
        (Message(protocol.INFER, {**base, "tensors": [hidden, ["x", "hidden", "raw"]]}, [b"AIFW"]), "2 tensors but"),
        (Message(protocol.INFER, {**base, "stage": 99, "tensors": []}), "stage 99"),
        (Message(protocol.INFER, {**base, "phase": "decode", "tensors": []}, [], session_id=12345), ""),
        (Message(protocol.INFER, {"v": protocol.PROTOCOL_VERSION, "phase": "prefill", "stage": 0}), "'plan_hash'"),
        (Message(protocol.RESULT, {"v": protocol.PROTOCOL_VERSION, "timings": {}}), "reply, not a request"),
    ]
    # the same with binary headers (what a tier sends): foreign version, truncated, oversized, mutated
    good = protocol.encode(protocol.Infer(plan_hash, "test", "prefill", 2, (), 1)).meta
    cut = protocol.encode(protocol.Infer(plan_hash, "tëst", "prefill", 2, (), 1)).meta
    one = protocol.encode(
        protocol.Infer(plan_hash, "test", "prefill", 2, (protocol.TensorSpec("x", "hidden", "raw"),), 1)
    ).meta
    at = next(i for i, (x, y) in enumerate(zip(good, one)) if x != y)  # the tensor count: 0 in one, 1 in the other
    bad += [
        (Message(protocol.INFER, bytes([1]) + good[1:]), "this tier speaks version"),
        (Message(protocol.INFER, good[:5] + b"\0"), "malformed infer message: field 'the fixed fields': truncated"),
        (
            Message(protocol.INFER, good[:at] + b"\xff\xff\xff\xff" + good[at + 4 :]),
            "field 'tensors': declares 4294967295",
        ),
        (Message(protocol.INFER, good + b"\0"), "1 bytes after the last field"),
        (Message(protocol.INFER, cut.replace("ë".encode(), b"\xff\xfe")), "field 'sender': a string is not UTF-8"),
        (  # the fixed fields (8 bytes per int or float, 1 for the bool), an empty plan_hash, 1 byte of sender's length
            Message(protocol.INFER, good[:5] + bytes(8 * _numbers(protocol.Infer) + 1 + 4 + 1)),
            "malformed infer message: field 'sender': truncated",
        ),
        (Message(protocol.HELLO, good), "hello message has no binary form"),
        (Message(protocol.RESULT, protocol.encode(protocol.Result(Timings())).meta), "reply, not a request"),
    ]
    for m, why in bad:
        reply = c.request(m)
        assert reply.kind == protocol.ERROR, (m.kind, m.meta, reply.meta)
        assert reply.meta["message"] and why in reply.meta["message"], (why, reply.meta)
    c.close()
    with cluster.pipeline(timeout_s=20) as p:
        assert torch.equal(p.run(text="still fine", max_new_tokens=3).tokens, _reference(lm, "still fine", 3))


def test_32_concurrent_devices_each_get_their_own_answer(cluster, lm):
    texts = [f"device number {i} says {'hi ' * (i % 5)}" for i in range(32)]
    expected = {t: _reference(lm, t, 4) for t in texts}
    pipes = [cluster.pipeline(timeout_s=120) for _ in texts]
    barrier = threading.Barrier(len(texts))

    def one(i: int):
        barrier.wait()
        return pipes[i].run(text=texts[i], max_new_tokens=4).tokens

    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(one, range(len(texts))))
    for p in pipes:
        p.close()
    for t, tokens in zip(texts, got):
        assert torch.equal(tokens, expected[t]), t


def test_a_dead_tier_fails_fast_then_fallback_and_restart_recover(tmp_path, lm):
    three_tier_plan(MODEL, tmp_path / "plan.json", codec="raw")
    text, n = "a long generation", 200  # >= 4 s at the emulated cloud speed: the kill lands mid-generation
    ref = _reference(lm, text, n)
    # the cloud is emulated slow so that it is surely killed mid-generation
    with LocalCluster(tmp_path / "plan.json", tmp_path, speeds={"cloud": 0.05}) as c:
        with c.pipeline(timeout_s=6) as p:
            assert torch.equal(p.run(text=text, max_new_tokens=3).tokens, ref[:, :3])
            killer = threading.Timer(0.5, c.servers["cloud"].kill)
            killer.start()
            t0 = time.monotonic()
            with pytest.raises(TransportError) as err:
                p.run(text=text, max_new_tokens=n)
            took = time.monotonic() - t0
            killer.join()
            assert took < 6 + 1.0, took
            assert "cloud" in str(err.value)
        # --fallback local: the device finishes on its own stages plus a local copy, with the same tokens
        with c.pipeline(timeout_s=3, fallback="local") as p:
            r = p.run(text=text, max_new_tokens=n)
            assert r.fallback  # whichever deadline fired first (edge -> cloud, or device -> edge)
            assert torch.equal(r.tokens, ref)
        # a restarted cloud is reached again without restarting the edge or the device
        edge_pid = c.servers["edge"].proc.pid
        c.restart("cloud")
        with c.pipeline(timeout_s=30) as p:
            r = p.run(text=text, max_new_tokens=5)
            assert r.fallback is None and torch.equal(r.tokens, ref[:, :5])
        assert c.servers["edge"].proc.pid == edge_pid and c.servers["edge"].alive()


class _FakeCache:
    def __init__(self, nbytes: int):
        self.kv = torch.zeros(nbytes // 4)
        self.side = {}


def test_session_memory_is_bounded_and_evicted_sessions_fail_clearly():
    store = SessionStore(lambda: _FakeCache(400 << 10), limit_bytes=1 << 20, tier="edge")
    keys = [("peer", i) for i in range(3)]
    for k in keys:
        s = store.open(k)
        store.done_step(k, s)
    assert len(store) == 2  # 3 x 400 KiB > 1 MiB: the least recently used one went
    with pytest.raises(LimitExceeded, match="evicted .*KV cache was full"):
        store.get(keys[0])
    s = store.get(keys[2])
    store.done_step(keys[2], s)
    store.close(keys[2])
    with pytest.raises(LimitExceeded, match="no session"):
        store.get(keys[2])
    big = SessionStore(lambda: _FakeCache(2 << 20), limit_bytes=1 << 20, tier="cloud")
    s = big.open(("p", 1))
    with pytest.raises(LimitExceeded, match="more than the limit"):
        big.done_step(("p", 1), s)


def test_a_tier_that_fails_to_start_names_itself_in_one_line_and_stops_the_other(tmp_path):
    """LocalCluster starts both server processes at once: the edge's bad metrics address fails its start after
    the cloud listens; the error names the edge in one line and the cloud's process is stopped too."""
    three_tier_plan(MODEL, tmp_path / "plan.json", codec="raw")
    c = LocalCluster(tmp_path / "plan.json", tmp_path, metrics={"edge": "no-port"})
    with pytest.raises(InputError, match="^the edge tier did not start: ") as e:
        with c:
            pass
    assert "\n" not in str(e.value)
    assert e.value.param == "metrics"  # the child's parameter comes through: the CLI names its flag
    assert set(c.servers) == {"cloud", "edge"} and not any(s.alive() for s in c.servers.values())


def test_a_tier_process_that_dies_before_its_spec_is_reported_in_one_line(tmp_path):
    p = TierProcess("cloud", tmp_path / "cloud.log")
    p.proc.kill()
    p.proc.wait(10)
    spec = TierSpec(role="cloud", plan_path=str(tmp_path / "plan.json"), identity_dir=str(tmp_path), trust=("ab",))
    with pytest.raises(TransportError, match=r"^the cloud tier did not start \(exit -9\): .*cloud\.log\)$") as e:
        p.start(spec)
    assert "\n" not in str(e.value) and not p.alive()


def test_a_tier_process_imports_aiflow_from_where_its_parent_did(tmp_path, monkeypatch):
    """A working directory that holds another ``aiflow_cli`` (another checkout) does not change the child's code:
    this one answers, with the parent's own failure report for a plan that does not exist."""
    (tmp_path / "aiflow_cli").mkdir()
    (tmp_path / "aiflow_cli" / "__init__.py").write_text("raise SystemExit(7)\n")
    monkeypatch.chdir(tmp_path)
    spec = TierSpec(role="cloud", plan_path=str(tmp_path / "no-plan.json"), identity_dir=str(tmp_path), trust=("ab",))
    with pytest.raises(AiflowError, match="^the cloud tier did not start: .*no-plan.json") as e:
        TierProcess(spec, tmp_path / "cloud.log")
    assert not isinstance(e.value, TransportError), e.value  # a TierFailed report, not a child that died
