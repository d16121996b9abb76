"""Liveness of tier-to-tier connections (issue 14): a tier SIGKILLed mid-generation is noticed within seconds
(the QUIC idle timeout; keep-alives hold live connections open), not at the request's deadline: the device gets a
TransportError naming the dead tier, or with ``fallback="local"`` finishes on its own. Real processes on loopback.

The measured figures are printed: ``python -m pytest -q -s tests/test_liveness.py``."""

from __future__ import annotations

import threading
import time

import torch
from runtime_support import three_tier_plan

from aiflow_cli.errors import TransportError
from aiflow_cli.models import load_model
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.transport import Limits

MODEL = "builtin:gpt2-tiny"
#: The promise: a dead peer is reported (or the fallback started) within this many seconds of its death. The
#: idle timeout (2 s) leaves about 1 s for a loaded machine.
NOTICED_WITHIN_S = 3.0
#: Deadline of the requests: far beyond the promise, so that only liveness can make them fail in time.
DEADLINE_S = 60.0


def test_a_tier_killed_mid_generation_is_noticed_within_seconds(tmp_path):
    lm = load_model(MODEL)
    three_tier_plan(MODEL, tmp_path / "plan.json", codec="raw")
    text, n = "a long generation", 200  # >= 4 s at the emulated cloud speed: the kill lands mid-generation
    ref = lm.generate(lm.prepare(text=text), n)
    idle_s = Limits().idle_timeout_ms / 1e3
    with (
        LocalCluster(tmp_path / "plan.json", tmp_path, speeds={"cloud": 0.05}) as c,
        c.pipeline(timeout_s=DEADLINE_S) as plain,
        c.pipeline(timeout_s=DEADLINE_S, fallback="local") as falling,
    ):
        # idle but alive for longer than the idle timeout: the keep-alives keep the connection
        assert torch.equal(plain.run(text=text, max_new_tokens=2).tokens, ref[:, :2])
        conn = plain.node.next.connection_id
        time.sleep(idle_s * 1.5)
        assert torch.equal(plain.run(text=text, max_new_tokens=2).tokens, ref[:, :2])
        assert plain.node.next.connection_id == conn
        # two devices generate; the cloud dies mid-generation: the edge notices and tells both, naming the cloud;
        # the one with fallback="local" starts finishing on its own then
        fallback_at: list[float] = []
        run_locally = falling._run_locally

        def recording(*a, **kw):
            fallback_at.append(time.monotonic())
            return run_locally(*a, **kw)

        falling._run_locally = recording  # type: ignore[method-assign]
        outcome: dict[str, object] = {}

        def generate(name: str, p) -> None:
            try:
                outcome[name] = p.run(text=text, max_new_tokens=n)
            except TransportError as e:
                outcome[name] = (e, time.monotonic())

        threads = [threading.Thread(target=generate, args=a) for a in (("plain", plain), ("falling", falling))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        c.servers["cloud"].kill()
        for t in threads:
            t.join(DEADLINE_S)
    err, failed_at = outcome["plain"]
    took, fell = failed_at - killed_at, fallback_at[0] - killed_at
    print(f"\ndead cloud reported {took:.2f} s after its SIGKILL: {err}\nfallback started {fell:.2f} s after it")
    assert isinstance(err, TransportError)
    assert "request to cloud" in str(err) and "idle_timeout_ms" in str(err)
    assert took < NOTICED_WITHIN_S, took
    r = outcome["falling"]
    assert r.fallback and "cloud" in r.fallback
    assert fell < NOTICED_WITHIN_S, fell
    assert torch.equal(r.tokens, ref)
