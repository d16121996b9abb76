"""A tier as a pool of replicas (docs/scale.md): the consistent-hash ring, the replay log and the autoscaling policy
alone; a session moved off a dead replica mid-generation with its cache rebuilt (output identical to the
monolithic model's), first with two in-process cloud servers, then with two Ray actors (skipped without ray);
a pool on Ray scaling on active sessions (marked slow).

The failover delays are printed: ``python -m pytest -q -s tests/test_ray_pool.py``."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from typing import Optional

import pytest
import torch
from conftest import wait_until
from runtime_support import three_tier_plan

from aiflow_cli.errors import InputError, TransportError
from aiflow_cli.models import load_model
from aiflow_cli.runtime.autoscale import Autoscaler, ScalePolicy
from aiflow_cli.runtime.cluster import identities
from aiflow_cli.runtime.pipeline import Pipeline
from aiflow_cli.runtime.protocol import DECODE, PREFILL, Infer
from aiflow_cli.runtime.routing import HashRing, PoolClient, ReplayLog, Sent, parse_replicas
from aiflow_cli.runtime.serve import TierServer, TierSpec
from aiflow_cli.transport import Identity

MODEL = "builtin:gpt2-tiny"


# -- the ring ---------------------------------------------------------------------------------------------------
def test_ring_is_deterministic_and_walks_every_replica_once():
    a, b = HashRing(["r1", "r2", "r3"]), HashRing(["r3", "r1", "r2"])
    for sid in range(200):
        assert list(a.walk(sid)) == list(b.walk(sid))
        assert sorted(a.walk(sid)) == ["r1", "r2", "r3"]
    assert HashRing().pick(5) is None
    assert a.pick(7, avoid=["r1", "r2", "r3"]) is None


def test_ring_spreads_sessions_and_moves_few_when_a_replica_joins_or_leaves():
    ring = HashRing(["r1", "r2", "r3"])
    sids = range(3000)
    before = {s: ring.pick(s) for s in sids}
    counts = {n: sum(1 for v in before.values() if v == n) for n in ring.nodes}
    assert min(counts.values()) > 3000 / 3 * 0.7, counts  # within 30 % of even at 64 points per replica
    ring.set_nodes(["r1", "r2", "r3", "r4"])
    after = {s: ring.pick(s) for s in sids}
    moved = [s for s in sids if after[s] != before[s]]
    assert all(after[s] == "r4" for s in moved)  # sessions only move to the new replica
    assert 0.15 < len(moved) / 3000 < 0.35  # about 1/4 of them
    # a replica leaves: only its sessions move, each to the next replica of its own walk
    ring.set_nodes(["r1", "r2", "r3"])
    for s in sids:
        owner = ring.pick(s)
        assert ring.pick(s, avoid=[owner]) == list(ring.walk(s))[1]
        assert ring.pick(s) == before[s]


def test_parse_replicas():
    assert parse_replicas(" 127.0.0.1:1, 127.0.0.1:2 ,") == ["127.0.0.1:1", "127.0.0.1:2"]
    with pytest.raises(InputError, match="names no replica"):
        parse_replicas(" , ")


def test_pool_cli_refuses_bad_options_in_one_line(tmp_path):
    """`aiflow serve --replicas` checks its options before it starts Ray (exit 3, one line, no traceback)."""
    ident = Identity.generate(tmp_path / "keys")
    base = ["serve", "--role", "cloud", "--plan", str(tmp_path / "plan.json"), "--identity", str(tmp_path / "keys")]
    cases = [
        (["--replicas", "2", "--max-replicas", "1", "--trust", ident.fingerprint], "--max-replicas 1: must be >= "),
        (["--replicas", "2", "--insecure-dev"], "a pool's replicas need --trust"),
    ]
    for extra, message in cases:
        r = subprocess.run(
            [sys.executable, "-m", "aiflow_cli", *base, *extra], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 3, r.stderr
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- the replay log ---------------------------------------------------------------------------------------------
def _sent(phase: str, nbytes: int = 100, last: bool = False) -> Sent:
    return Sent(Infer("h", "edge", phase, 3, (), 8, last), [b"x" * nbytes], [[1]])


def test_replay_log_keeps_a_session_until_its_last_step():
    log = ReplayLog()
    log.pin(1, "a", new=True)
    log.record(1, _sent(PREFILL), ended=False)
    log.record(1, _sent(DECODE), ended=False)
    assert [s.msg.phase for s in log.history(1)] == [PREFILL, DECODE]
    log.pin(1, "b", new=False)  # failover: the history stays, the pin moves
    assert log.replica_of(1) == "b" and len(log.history(1)) == 2
    log.pin(1, "a", new=True)  # a new prefill on the same id starts afresh
    assert log.history(1) == []
    log.record(1, _sent(DECODE, last=True), ended=True)
    assert log.replica_of(1) is None and log.history(1) == [] and len(log) == 0
    log.record(2, _sent(PREFILL), ended=False)  # never pinned: nothing kept
    assert len(log) == 0


def test_replay_log_is_bounded_in_bytes_and_idle_time():
    log = ReplayLog(limit_bytes=3 * (1000 + 256))
    for sid in range(5):
        log.pin(sid, "a", new=True)
        log.record(sid, _sent(PREFILL, 1000), ended=False)
    assert sorted(log.sessions()) == [2, 3, 4]  # least recently used first
    assert log.total_bytes <= log.limit_bytes
    log.idle_s = 0.0
    time.sleep(0.01)
    log.pin(9, "a", new=True)
    log.record(9, _sent(PREFILL), ended=False)
    assert sorted(log.sessions()) == [9]


# -- the autoscaling policy -------------------------------------------------------------------------------------
def test_autoscaler_scales_up_at_once_and_down_after_a_streak_on_idle_replicas_only():
    a = Autoscaler(ScalePolicy(min_replicas=1, max_replicas=3, target_sessions=4, down_after=2))
    assert a.decide({"r1": 4}).target == 1
    assert a.decide({"r1": 5}).target == 2  # over target: up now
    assert a.decide({"r1": 20, "r2": 20}).target == 3  # capped at max
    assert a.decide({"r1": 1, "r2": 1, "r3": 0}).target == 3  # 1 poll low
    d = a.decide({"r1": 1, "r2": 1, "r3": 0})  # 2 polls low: remove the idle one only
    assert (d.target, d.remove) == (2, ("r3",))
    a.decide({"r1": 1, "r2": 1})
    d = a.decide({"r1": 1, "r2": 1})  # low, but both hold a session: no cache is thrown away
    assert d.target == 2 and d.remove == () and "every replica holds" in d.reason
    assert a.decide({}).target == 1  # every replica died: back to the minimum
    with pytest.raises(InputError, match="max_replicas"):
        ScalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(InputError, match="target_sessions"):
        ScalePolicy(target_sessions=0)


# -- failover with real servers ---------------------------------------------------------------------------------
def _setup(tmp_path, text: str, n: int):
    """A three-tier plan of the model, the tiers' identities, the fingerprints to trust and the monolithic
    model's ``n`` tokens for ``text``."""
    lm = load_model(MODEL)
    plan = tmp_path / "plan.json"
    three_tier_plan(MODEL, plan, codec="raw")
    keys = identities(tmp_path)
    return plan, keys, tuple(k.fingerprint for k in keys.values()), lm.generate(lm.prepare(text=text), n)


def _generate_and_kill(pipe: Pipeline, pool: PoolClient, kill, text: str, n: int, after_steps: int):
    """Runs a generation in a thread, calls ``kill(replica)`` on its replica once ``after_steps`` steps went
    through the pool, and returns (tokens, the killed replica, the session id, when it was killed)."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["r"] = pipe.run(text=text, max_new_tokens=n)
        except Exception as e:  # reported below
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    sid, replica = wait_until(
        lambda: next(((s, r) for s, r in pool.log.sessions().items() if len(pool.log.history(s)) >= after_steps), None),
        timeout_s=60,
        what="the generation's steps through the pool",
    )
    killed_at = time.monotonic()
    kill(replica)
    t.join(120)
    assert "e" not in out, f"the device saw an error, not a delay: {out.get('e')}"
    return out["r"].tokens, replica, sid, killed_at


def test_a_session_moves_to_another_replica_when_its_replica_dies(tmp_path):
    """Two in-process cloud servers behind one edge (``--next A,B``): the replica of a generation is closed
    mid-generation; the edge replays the session's stored steps on the other and the output is unchanged."""
    text, n = "failover", 40
    plan, keys, trust, ref = _setup(tmp_path, text, n)
    clouds = [
        TierServer("cloud", plan, listen="127.0.0.1:0", identity=keys["cloud"], trust=trust, speed=0.2)
        for _ in range(2)
    ]
    by_addr = {c.address: c for c in clouds}
    edge = TierServer(
        "edge", plan, listen="127.0.0.1:0", identity=keys["edge"], trust=trust, next_addr=",".join(by_addr)
    )
    try:
        pool = edge.node.next
        assert isinstance(pool, PoolClient)
        with Pipeline(plan, edge=edge.address, identity=keys["device"], trust=trust, timeout_s=60) as pipe:
            # sticky: every step of a generation goes to the replica the ring picks for its session
            assert torch.equal(pipe.run(text=text, max_new_tokens=4).tokens, ref[:, :4])
            assert pool.failovers == []
            tokens, dead, sid, killed_at = _generate_and_kill(
                pipe, pool, lambda r: by_addr[r].close(), text, n, after_steps=8
            )
            assert dead == pool.ring.pick(sid)
            assert torch.equal(tokens, ref)
            (f,) = pool.failovers
            assert f["from"] == dead and f["to"] != dead and f["replayed"] >= 8
            print(
                f"\nfailover, in-process replica closed: {f['replayed']} steps replayed in {f['s'] * 1e3:.0f} ms, "
                f"the step done {(f['at'] - killed_at) * 1e3:.0f} ms after the close"
            )
            # the next sessions avoid the dead replica
            assert torch.equal(pipe.run(text=text, max_new_tokens=3).tokens, ref[:, :3])
            assert len(pool.failovers) == 1
            # the last replica gone too: the device gets the transport's error (and could fall back), in one line
            for c in clouds:
                c.close()
            with pytest.raises(TransportError, match="cloud"):
                pipe.run(text=text, max_new_tokens=3)
    finally:
        edge.close()
        for c in clouds:
            c.close()


def test_the_device_moves_a_session_to_another_edge_when_its_edge_dies(tmp_path):
    """A pool of two edges in front of one cloud (``Pipeline(edge="A,B")``, ``aiflow run --edge A,B``): the
    device pins the session to one edge and, when it is closed mid-generation, replays its steps on the other,
    which reopens the session on the cloud under the same key (both edges share one identity)."""
    text, n = "edge pool", 40
    plan, keys, trust, ref = _setup(tmp_path, text, n)
    cloud = TierServer("cloud", plan, listen="127.0.0.1:0", identity=keys["cloud"], trust=trust, speed=0.2)
    edges = [
        TierServer("edge", plan, listen="127.0.0.1:0", identity=keys["edge"], trust=trust, next_addr=cloud.address)
        for _ in range(2)
    ]
    by_addr = {e.address: e for e in edges}
    try:
        with Pipeline(plan, edge=",".join(by_addr), identity=keys["device"], trust=trust, timeout_s=60) as pipe:
            pool = pipe.node.next
            assert isinstance(pool, PoolClient)
            tokens, dead, _, _ = _generate_and_kill(pipe, pool, lambda r: by_addr[r].close(), text, n, after_steps=8)
            assert torch.equal(tokens, ref)
            (f,) = pool.failovers
            assert f["from"] == dead and f["replayed"] >= 8
    finally:
        for e in edges:
            e.close()
        cloud.close()


# -- on Ray -----------------------------------------------------------------------------------------------------
def _raylets() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "raylet" in line or "gcs_server" in line]


@contextlib.contextmanager
def _on_ray(tmp_path, text: str, n: int, replicas: int, policy: Optional[ScalePolicy] = None):
    """A local Ray (num_cpus=2, half a CPU per replica) running ``replicas`` cloud replicas (emulated at 0.2x, so
    a generation lasts), an in-process edge routing to them with the pool's client (refreshed from Ray) and a
    device; yields (pool, the edge's client, the device's pipeline, the monolithic model's tokens for ``text``).
    Afterwards no Ray process is left."""
    ray = pytest.importorskip("ray")
    from aiflow_cli.runtime.ray_pool import RayPool

    assert not _raylets(), "a Ray instance was already running"
    plan, keys, trust, ref = _setup(tmp_path, text, n)
    spec = TierSpec("cloud", str(plan), str(keys["cloud"].cert_path.parent), trust, speed=0.2, threads=1)
    edge = None
    try:
        with RayPool(spec, replicas, replica_cpus=0.5, num_cpus=2, policy=policy) as pool:
            reps = list(pool.replicas.values())
            assert {r.fingerprint for r in reps} == {keys["cloud"].fingerprint}  # the tier's own certificate
            client = pool.client(identity=keys["edge"], trust=trust, timeout_s=60)
            edge = TierServer(
                "edge", plan, listen="127.0.0.1:0", identity=keys["edge"], trust=trust, next_client=client
            )
            with Pipeline(plan, edge=edge.address, identity=keys["device"], trust=trust, timeout_s=60) as pipe:
                yield pool, client, pipe, ref
    finally:
        if edge is not None:
            edge.close()
        if ray.is_initialized():
            ray.shutdown()
    wait_until(lambda: not _raylets(), timeout_s=20, what="Ray's processes to exit")


def test_a_cloud_pool_on_ray_survives_a_killed_replica(tmp_path):
    """Two cloud replicas as Ray actors with their own QUIC listeners; one replica's process is killed (ray.kill)
    mid-generation: the device sees a delay, the output equals the monolithic model's."""
    text, n = "a pool on ray", 60
    t0 = time.monotonic()
    with _on_ray(tmp_path, text, n, 2) as (pool, client, pipe, ref):
        started_s = time.monotonic() - t0
        by_addr = {r.address: r.name for r in pool.replicas.values()}
        assert len(by_addr) == 2
        tokens, dead, sid, killed_at = _generate_and_kill(
            pipe, client, lambda r: pool.kill(by_addr[r]), text, n, after_steps=10
        )
        assert torch.equal(tokens, ref)
        (f,) = client.failovers
        assert f["from"] == dead and f["replayed"] >= 10
        print(
            f"\nray pool: 2 replicas up in {started_s:.1f} s; replica process killed (ray.kill) mid-generation: "
            f"{f['replayed']} steps replayed in {f['s'] * 1e3:.0f} ms, the step done "
            f"{(f['at'] - killed_at) * 1e3:.0f} ms after the kill"
        )
        # Ray knows the replica is gone; healing brings the pool back to 2, the client's next refresh sees it
        wait_until(lambda: len(pool.loads()) == 1, timeout_s=10, what="Ray dropping the killed replica")
        assert pool.heal() == 1 and len(pool.addresses()) == 2
        assert dead not in client.refresh()
        assert torch.equal(pipe.run(text=text, max_new_tokens=3).tokens, ref[:, :3])
        assert sum(v["active_sessions"] for v in pool.loads().values()) == 0  # ended sessions free their caches


@pytest.mark.slow
def test_a_ray_pool_scales_on_active_sessions(tmp_path):
    """The pool grows while sessions are active beyond the target per replica and shrinks back, stopping only the
    idle replica, once they ended (one replica at first, a target of 1 session per replica)."""
    text, n = "scale", 60
    policy = ScalePolicy(min_replicas=1, max_replicas=2, target_sessions=1, down_after=2)
    with _on_ray(tmp_path, text, n, 1, policy) as (pool, client, pipe, ref):
        out: dict[str, object] = {}

        def active() -> int:
            return sum(v["active_sessions"] for v in pool.loads().values())

        t = threading.Thread(target=lambda: out.update(r=pipe.run(text=text, max_new_tokens=n)))
        t.start()
        wait_until(lambda: active() == 1, timeout_s=60, what="a session active on the pool")
        d = pool.autoscale()  # 1 session at a target of 1 per replica: 1 replica is enough
        assert d.target == 1 and len(pool.replicas) == 1
        # a second session: 2 active on 1 replica at a target of 1 -> 2 replicas
        t2 = threading.Thread(target=lambda: out.update(r2=pipe.run(text=text, max_new_tokens=n)))
        t2.start()
        wait_until(lambda: active() == 2, timeout_s=60, what="two sessions active on the pool")
        d = pool.autoscale()
        assert d.target == 2 and len(pool.replicas) == 2, d
        t.join(120)
        t2.join(120)
        assert torch.equal(out["r"].tokens, ref) and torch.equal(out["r2"].tokens, ref)
        assert client.failovers == []  # pinned sessions stayed where they were while the pool grew
        # all ended: after down_after polls the idle replica (the new one or the old) is stopped
        assert pool.autoscale().target == 2
        d = pool.autoscale()
        assert d.target == 1 and len(d.remove) == 1 and len(pool.replicas) == 1, d
        assert torch.equal(pipe.run(text=text, max_new_tokens=3).tokens, ref[:, :3])
