"""A failed request does not leave its session (KV cache) on the tiers behind the failure until idle expiry: the
tier that saw it fail sends an ``End`` down the chain and every tier drops the session at once."""

from __future__ import annotations

import time

import pytest
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
