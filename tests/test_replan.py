"""Re-planning when the link changes (aiflow_cli/runtime/linkwatch.py, replan.py): the estimator and the
hysteresis alone, the switch message refused when malformed, and three real processes behind the link emulator
whose uplink drops mid-run: the plan switches, every output equals the monolithic model's, a session in flight
finishes under its plan, and a steady link never switches."""

from __future__ import annotations

import threading

import pytest
import torch

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import PeerRejected
from aiflow_cli.links import LinkProfile
from aiflow_cli.models import load_model, load_stages
from aiflow_cli.plan.problem import Limits, build_problem
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.plan.solver import solve_plan
from aiflow_cli.plan.synthetic import synthetic_profile
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.linkwatch import LinkWatch, ReplanPolicy, relative_change
from aiflow_cli.runtime.replan import ReplanConfig, placement_of, send_replan
from aiflow_cli.transport import Message

MODEL = "builtin:gpt2-tiny"


# -- the estimator and the policy, no network -------------------------------------------------------------------
def test_the_watch_times_rtt_on_small_messages_and_rate_on_large_ones():
    w = LinkWatch(window=8)
    assert w.estimate() is None
    for i in range(4):  # 680-byte decode steps over a 30 ms, 1 Mbit/s link; a 10 kB prefill
        w.observe(680, 8, 30 + 680 * 8 / 1e3, at_s=i)
    w.observe(10_000, 8, 30 + 10_000 * 8 / 1e3, at_s=5)
    e = w.estimate()
    assert e.rtt_ms == pytest.approx(35.44) and e.big_samples == 1
    assert e.uplink_mbps == pytest.approx(10_000 * 8 / (80 - 5.44) / 1e3, rel=1e-6)  # ~1.07 Mbit/s
    w.observe(100, 0, float("nan"), at_s=6)  # clock trouble: dropped
    assert w.estimate().samples == 5
    w.observe_path({"rtt_us": 31_000})
    assert w.estimate().path_rtt_ms == 31.0
    for i in range(4):  # the window forgets: a faster link takes over
        w.observe(20_000, 8, 5 + 20_000 * 8 / 1e5, at_s=10 + i)
        w.observe(680, 8, 5 + 680 * 8 / 1e5, at_s=10 + i)
    assert w.estimate().uplink_mbps > 50


def test_the_policy_needs_evidence_a_moved_link_and_a_margin():
    pol = ReplanPolicy(margin=0.2, change=0.5, min_samples=2, min_interval_s=1.0)
    lk = LinkProfile(name="a", source="t", uplink_mbps=100, downlink_mbps=100, rtt_ms=10)
    assert not pol.link_moved(lk.scaled(uplink_mbps=130), lk) and pol.link_moved(lk.scaled(uplink_mbps=10), lk)
    assert pol.link_moved(lk.model_copy(update={"rtt_ms": 40}), lk)
    assert not pol.link_moved(lk.model_copy(update={"rtt_ms": 11.5}), lk)  # under min_rtt_ms
    assert pol.better(79, 100) and not pol.better(81, 100)
    w = LinkWatch()
    w.observe(500, 0, 10, at_s=0.0)
    w.observe(10_000, 0, 50, at_s=0.0)
    assert not pol.ready(w, 5.0, float("-inf"))  # one large message
    w.observe(10_000, 0, 50, at_s=0.5)
    assert pol.ready(w, 5.0, float("-inf")) and not pol.ready(w, 5.0, 4.5)  # too soon after a switch
    assert not pol.ready(w, 5.0, 1.0)  # the samples predate the switch
    assert relative_change(1, 10) == pytest.approx(9) and relative_change(0, 1) == float("inf")
    with pytest.raises(Exception, match="margin"):
        ReplanPolicy(margin=1.5).check()


def _replan(plan_hash: str = "a" * 64, **kw) -> dict:
    return {
        "plan_hash": plan_hash,
        "from": "device",
        "plan": "{}",
        "new_hash": "b" * 64,
        **kw,
        "v": protocol.PROTOCOL_VERSION,
    }


@pytest.mark.parametrize(
    "meta",
    [
        {**_replan(), "plan": 5},
        {**_replan(), "new_hash": None},
        {k: v for k, v in _replan().items() if k != "plan"},
        {**_replan(), "plan": "x" * (protocol.MAX_PLAN_CHARS + 1)},
    ],
)
def test_a_malformed_replan_message_is_a_one_line_peer_rejected(meta):
    with pytest.raises(PeerRejected) as e:
        protocol.decode(Message(protocol.REPLAN, meta, [], 0))
    assert "\n" not in str(e.value)


def test_a_replan_whose_plan_does_not_validate_or_hash_is_refused():
    msg = protocol.decode(Message(protocol.REPLAN, _replan(), [], 0))
    with pytest.raises(PeerRejected, match="does not validate"):
        msg.new_plan()
    with pytest.raises(PeerRejected, match="version"):
        protocol.decode(Message(protocol.REPLAN, {**_replan(), "v": 99}, [], 0))


# -- three processes behind the link emulator ------------------------------------------------------------------
FAT = LinkProfile(name="fat", source="test", uplink_mbps=100, downlink_mbps=100, rtt_ms=2, queue_ms=1000)
THIN = LinkProfile(name="thin", source="test", uplink_mbps=1, downlink_mbps=1, rtt_ms=30, queue_ms=1000)


def _problem():
    """gpt2-tiny as a synthetic profile with even stage times (2 ms prefill, 1 ms per decode step at speed 1), a
    device 5x slower than edge and cloud, the prompt kept on the device: on FAT the device hands its embeddings up,
    on THIN it keeps every stage (a round trip per token costs more than the device's own compute)."""
    m = load_stages(MODEL, [])
    prof = synthetic_profile(m.num_stages, n_codecs=1, seed=2, model_hash=m.model_hash, input_stage=True)
    stages = [
        s.model_copy(update={"name": name, **({"prefill_ms": 2.0, "decode_ms": 1.0} if i else {})})
        for i, (s, name) in enumerate(zip(prof.stages, m.stage_names))
    ]
    prof = prof.model_copy(update={"stages": stages, "model": m.name, "family": m.family, "task": m.task})
    return build_problem(
        {"*": prof},
        {"device-edge": FAT, "edge-cloud": FAT},
        objective="generate",
        tokens=8,
        limits=Limits(require=frozenset({"device"}), codecs=("raw",)),
        speeds={"device": 0.2, "edge": 1.0, "cloud": 1.0},
    )


def test_the_uplink_drops_mid_run_the_plan_switches_and_nothing_is_dropped(tmp_path):
    """One cluster, in order: a steady link as assumed (no switch); the uplink drops 100x while a long
    generation is in flight; the next requests measure it and the device switches every tier to the plan that
    keeps every stage on the device; the generation in flight finishes under its plan; every output equals the
    monolithic model's. Then a pipeline still on the first plan, once two more switches dropped it on the
    tiers, is refused in one line, and a malformed switch is refused while the tiers keep serving."""
    problem = _problem()
    plan, _ = solve_plan(problem, verify=False)
    assert plan.tiers[0].end < plan.n_stages  # on the assumed link the device hands over
    save_plan(plan, tmp_path / "plan.json")
    m = load_model(MODEL)
    x, long_x = m.make_inputs(seq_len=40, seed=3), m.make_inputs(seq_len=8, seed=4)
    ref, long_ref = m.generate(x, 8), m.generate(long_x, 64)
    cfg = ReplanConfig(ReplanPolicy(min_samples=2, min_interval_s=0.0), problem=problem)
    with LocalCluster(tmp_path / "plan.json", tmp_path, links={"device-edge": FAT}) as c:
        with c.pipeline(timeout_s=60, replan=cfg) as p, c.pipeline(timeout_s=60) as stays:
            for _ in range(4):  # a steady link as assumed: no switch
                assert torch.equal(p.run(inputs=x, max_new_tokens=8).tokens, ref)
            assert p.replanner.events == [] and torch.equal(stays.run(inputs=x, max_new_tokens=8).tokens, ref)
            c.set_link("device-edge", THIN)
            p.close()  # its connection went through the old emulator (a new network): it reconnects
            stays.close()
            out: dict = {}
            in_flight = threading.Thread(target=lambda: out.setdefault("r", p.run(inputs=long_x, max_new_tokens=64)))
            in_flight.start()
            switched, alive_at_switch = None, False
            for _ in range(4):
                r = p.run(inputs=x, max_new_tokens=8)
                assert torch.equal(r.tokens, ref)
                if r.replan["switch"] and not switched:
                    switched, alive_at_switch = r.replan["switch"], in_flight.is_alive()
            in_flight.join(60)
            assert switched is not None, p.replanner.to_json()
            assert alive_at_switch  # the long generation was in flight when the tiers switched ...
            assert torch.equal(out["r"].tokens, long_ref)  # ... and finished under its plan, token for token
            assert switched["measured_link"]["uplink_mbps"] < 5 < switched["assumed_link"]["uplink_mbps"]
            assert (
                switched["predicted_new_ms"] < switched["predicted_old_ms"]
                and switched["new"] == f"device[0:{m.num_stages}]"
            )
            assert p.plan.tiers[0].end == p.plan.n_stages and len(p.replanner.events) == 1
            assert torch.equal(p.run(inputs=x, max_new_tokens=8).tokens, ref)
            assert "replan" in r.to_json()
            # the tiers keep two plans: one more switch drops the first, and its pipeline is refused cleanly
            other = fixed_plan(load_stages(MODEL, []), (2, 4))
            chain = send_replan(p._client, p.node.plan_hash, other, "device", 30)
            assert [i.stages for i in chain] == [(2, 4), (4, m.num_stages)]
            with pytest.raises(PeerRejected, match="plan mismatch") as e:
                stays.run(inputs=x, max_new_tokens=4)
            assert "\n" not in str(e.value)
            bad = Message(protocol.REPLAN, {**_replan(p.node.plan_hash), "plan": "{"}, [], 0)
            with pytest.raises(PeerRejected, match="does not validate"):
                protocol.expect_reply(p._client.request(bad, timeout_s=30), protocol.HelloReply)
            assert placement_of(other, problem).bounds == (0, 2, 4, m.num_stages)
            assert torch.equal(p.run(inputs=x, max_new_tokens=8).tokens, ref)  # still serving
