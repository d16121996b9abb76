"""A failed request does not leave its session (KV cache) on the tiers behind the failure until idle expiry: the
tier that saw it fail sends an ``End`` down the chain and every tier drops the session at once."""

from __future__ import annotations

import time

import pytest
import torch
from runtime_support import Direct
from test_batching import _prompts

from aiflow_cli.bench.decode import fixed_plan
from aiflow_cli.errors import Timeout
from aiflow_cli.models import load_stages
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.batching import BatchSettings
from aiflow_cli.runtime.node import Payload, TierNode
from aiflow_cli.runtime.protocol import PREFILL


class FailsOnce(Direct):
    """The device's link to the edge: its ``fail_at``-th request times out before it reaches the edge (as when
    the request's deadline passes on the way); every other message goes through."""

    server = "edge.test:1"

    def __init__(self, target, fail_at: int) -> None:
        super().__init__(target)
        self.fail_at, self.sent, self.kinds = fail_at, 0, []

    def request(self, msg, timeout_s):
        self.kinds.append(msg.kind)
        if msg.kind != protocol.END:
            self.sent += 1
            if self.sent == self.fail_at:
                raise Timeout("device: the request's deadline passed before it could reach edge (test)")
        return super().request(msg, timeout_s)


def _until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("batching", [BatchSettings(1), BatchSettings(16)], ids=["solo", "batched"])
def test_a_generation_that_fails_mid_decode_drops_its_session_on_every_tier(batching):
    """gpt2-tiny on device [0:2) (it drives) + edge [2:4) + cloud [4:7), in-process: the device's second decode
    step fails on its link after edge and cloud opened the session at the prefill. The request fails, and both
    tiers behind drop the session within moments (not after the 300 s idle expiry)."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (2, 4))
    cloud = TierNode(plan, "cloud", model=full, batching=batching)
    edge = TierNode(plan, "edge", model=full, next_client=Direct(cloud), batching=batching)
    link = FailsOnce(edge, fail_at=3)  # the prefill and the first decode step go through
    device = TierNode(plan, "device", model=full, next_client=link, batching=batching)
    with pytest.raises(Timeout, match="deadline passed"):
        device.step(
            ("peer", 7),
            PREFILL,
            1,
            Payload(state=_prompts(full, 1)[0]),
            max_new_tokens=6,
            deadline=time.monotonic() + 60,
        )
    assert link.sent == 3 and len(device.sessions) == 0
    assert _until(lambda: len(edge.sessions) == len(cloud.sessions) == 0), (len(edge.sessions), len(cloud.sessions))
    assert link.kinds.count(protocol.END) == 1  # one End per failed request, however deep the failure


def test_an_end_for_an_unknown_session_is_answered_and_harmless():
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (2, 4))
    cloud = TierNode(plan, "cloud", model=full)
    edge = TierNode(plan, "edge", model=full, next_client=Direct(cloud))
    reply = Direct(edge).request(protocol.encode(protocol.End(edge.plan_hash, "device"), session_id=99), 5.0)
    assert isinstance(protocol.decode(reply), protocol.End)
    bad = Direct(edge).request(protocol.encode(protocol.End("0" * 64, "device"), session_id=99), 5.0)
    assert isinstance(protocol.decode(bad), protocol.Error)  # another plan: refused like any request


class DirectAs(Direct):
    """A device's link to the edge, as peer ``fingerprint``; ``after_first`` runs once its first request is done."""

    def __init__(self, target, fingerprint: str, after_first=None) -> None:
        super().__init__(target)
        self.fingerprint, self.after_first = fingerprint, after_first

    def request(self, msg, timeout_s):
        from aiflow_cli.transport import PeerInfo

        reply = self.target.handle(msg, PeerInfo("127.0.0.1:0", self.fingerprint, 1))
        hook, self.after_first = self.after_first, None
        if hook:
            hook()
        return reply


def test_two_devices_that_chose_the_same_session_id_never_share_a_session_behind_the_edge():
    """Devices A and B both call their request session 7. B's whole generation runs between A's prefill and A's
    first decode step: the cloud must keep them apart (its peer is the edge for both), so each answer is its own
    prompt's greedy output and no session is left anywhere."""
    full = load_stages("builtin:gpt2-tiny")
    plan = fixed_plan(full, (2, 4))
    cloud = TierNode(plan, "cloud", model=full)
    edge = TierNode(plan, "edge", model=full, next_client=Direct(cloud))
    prompts = _prompts(full, 2)
    refs = [full.generate(p, 6) for p in prompts]
    out: dict[str, object] = {}

    def run(name: str, client) -> None:
        device = TierNode(plan, "device", model=full, next_client=client)
        r = device.step(
            ("local", 7),
            PREFILL,
            1,
            Payload(state=prompts["AB".index(name)]),
            max_new_tokens=6,
            deadline=time.monotonic() + 60,
        )
        out[name] = r.tokens

    run("A", DirectAs(edge, "device-a", after_first=lambda: run("B", DirectAs(edge, "device-b"))))
    assert set(out) == {"A", "B"}
    for name, ref in zip("AB", refs):
        assert torch.equal(out[name], ref), name
    assert len(edge.sessions) == len(cloud.sessions) == 0
