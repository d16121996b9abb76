"""`aiflow bench transport`'s round-trip figures: beside the times, CPU time and context switches per round trip
(the figures that hold on a loaded machine)."""

from __future__ import annotations

import sys
import time

import pytest

from aiflow_cli.bench.transport import RTT_BYTES, Tcp, context_switches, fp32_payload, measure_rtt


def test_round_trips_report_cpu_time_and_context_switches() -> None:
    t = Tcp(RTT_BYTES)
    try:
        row = measure_rtt(t, fp32_payload(RTT_BYTES), 200)
    finally:
        t.close()
    assert row.transport == "tcp" and row.payload_bytes == RTT_BYTES and row.samples == 200
    assert 0 < row.p50_us <= row.p99_us and row.cpu_us > 0
    if sys.platform.startswith("linux"):
        # a TCP echo served by a thread of this process: each round trip puts the client thread to sleep at least
        # once while the server thread works
        assert row.switches is not None and row.switches >= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_context_switches_only_grow() -> None:
    a = context_switches()
    time.sleep(0.01)  # a voluntary switch of this thread
    b = context_switches()
    assert a is not None and b is not None and b > a
