"""Emulating tier speeds: the CPU-time stretch (predictable under load) and time dilation (tiers faster than
this CPU). Quick, on tiny models; the one timing test compares a dilated run with an undilated one of the same
plan, so that a loaded machine moves both."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from aiflow_cli.errors import InputError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.runtime.dilation import Dilation
from aiflow_cli.runtime.node import TierNode, check_speed
from aiflow_cli.runtime.pipeline import RunResult
from aiflow_cli.runtime.timings import Timings


def test_dilation_scales_links_and_divides_reported_times():
    lte = load_link("lte")
    d = Dilation(4)
    x = d.link(lte)
    assert x.rtt_ms == 4 * lte.rtt_ms and x.jitter_ms == 4 * lte.jitter_ms
    assert x.uplink_mbps == lte.uplink_mbps / 4 and x.downlink_mbps == lte.downlink_mbps / 4
    assert x.uplink_mbps * x.queue_ms == pytest.approx(lte.uplink_mbps * lte.queue_ms)  # same queue in bytes
    assert x.loss_pct == lte.loss_pct
    t = Timings()
    t.tier("edge").compute_ms = 80.0
    t.link("device-edge").wire_ms = 40.0
    t.link("device-edge").bytes_up = 1000
    r = d.result(RunResult(tokens=None, output=None, text=None, total_ms=200.0, timings=t))
    assert r.total_ms == 50.0 and r.timings.tiers["edge"].compute_ms == 20.0
    assert r.timings.links["device-edge"].wire_ms == 10.0 and r.timings.links["device-edge"].bytes_up == 1000
    assert Dilation.for_speeds({"device": 0.1, "edge": 1.0, "cloud": 8.0}).factor == 8.0
    assert Dilation.for_speeds({"device": 0.25, "edge": 1.0}).factor == 1.0


def test_no_dilation_is_todays_emulation():
    """D = 1 changes nothing: links and results pass through, and a tier is stretched by 1 / speed."""
    d = Dilation(1)
    lte = load_link("lte")
    assert d.link(lte) is lte and not d.active
    r = RunResult(tokens=None, output=None, text=None, total_ms=123.0, timings=Timings())
    assert d.result(r) is r
    assert check_speed(0.25) == 4.0 and check_speed(1.0) == 1.0


def test_speeds_above_this_cpu_need_dilation():
    with pytest.raises(InputError, match="slower"):
        check_speed(2.0)
    with pytest.raises(InputError, match="dilation=4"):
        check_speed(8.0, 4.0)
    assert check_speed(8.0, 8.0) == 1.0 and check_speed(0.1, 8.0) == pytest.approx(80.0)
    with pytest.raises(InputError):
        Dilation(0.5)


def _busy(seconds_cpu: float) -> None:
    t = time.thread_time()
    x = 0
    while time.thread_time() - t < seconds_cpu:
        x += 1


def _stretched_run(stretch: float, cpu_s: float) -> tuple[float, float, float]:
    """Runs ``cpu_s`` of CPU work, stretched as a TierNode does; returns (total wall s, the work's own wall s,
    cpu s)."""
    import torch

    node = SimpleNamespace(stretch=stretch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every tier runs (LocalCluster, the demo): then torch works in this thread
    t0, c0 = TierNode._clocks(node)
    _busy(cpu_s)
    work, cpu = time.perf_counter() - t0, time.thread_time() - c0
    TierNode._stretch(node, t0, c0)
    torch.set_num_threads(threads)
    return time.perf_counter() - t0, work, cpu


def test_stretch_follows_cpu_time_not_the_load():
    """Two competing CPU-bound processes (more than this 2-core machine's share) inflate the wall time of the
    work; a stretch by wall time would multiply that, the stretch by thread CPU time does not: the total is
    ``stretch`` x the CPU time (unless the work alone already took longer, which no slowdown can undo)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        runs = [_stretched_run(10.0, 0.02) for _ in range(5)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    ratios = [total / max(10 * cpu, work) for total, work, cpu in runs]
    assert statistics.median(ratios) == pytest.approx(1.0, rel=0.15), runs
    assert max(work / cpu for _, work, cpu in runs) > 1.0  # the competition was felt


def test_stretch_below_one_does_nothing():
    total, work, _ = _stretched_run(1.0, 0.01)
    assert total < work + 0.005


def test_dilated_run_matches_its_prediction(tmp_path):
    """One plan (the edge computes, the cloud relays nothing: edge-only) run twice on loopback: undilated with the
    edge at 1x, and dilated x4 with the edge at 1x and the cloud at 4x (so the edge is stretched 4x and the links
    slowed 4x). Each is compared with its own prediction: the dilated run must match as well as the undilated one
    does (within 15 %, or within the undilated run's own miss + 5 % on a loaded machine)."""
    import torch

    from aiflow_cli.plan.problem import Overheads
    from aiflow_cli.plan.schema import save_plan
    from aiflow_cli.plan.strategies import solve_strategies
    from aiflow_cli.profile import profile_model
    from aiflow_cli.runtime.cluster import LocalCluster
    from aiflow_cli.runtime.demo import timed_request

    torch.set_num_threads(1)
    prof = profile_model("builtin:gpt2-tiny", repeats=2, warmup=1, codecs=["raw"])
    link = LinkProfile(
        name="test",
        source="test",
        uplink_mbps=50.0,
        downlink_mbps=50.0,
        rtt_ms=40.0,
        jitter_ms=0.0,
        loss_pct=0.0,
        queue_ms=200.0,
    )
    links = {"device-edge": link, "edge-cloud": link}
    errors = {}
    for d in (1.0, 4.0):
        speeds = {"device": 1.0, "edge": 1.0, "cloud": d}
        plan = solve_strategies(prof, links, speeds, names=["edge-only"], tokens=4, overheads=Overheads())["edge-only"]
        path = tmp_path / f"plan-{d:g}.json"
        save_plan(plan, path)
        dil = Dilation(d)
        with LocalCluster(path, tmp_path / f"d{d:g}", links=dil.links(links), speeds=speeds, dilation=d) as c:
            with c.pipeline(timeout_s=120) as p:
                for _ in range(2):
                    p.run(text="dilation", max_new_tokens=4)
                ms = [timed_request(p, {"text": "dilation"}, 4, dil).result.total_ms for _ in range(5)]
        measured = statistics.median(ms)
        errors[d] = abs(plan.prediction.total_ms - measured) / measured
    # the dilated run must predict as well as the undilated one: within 15 %, or within the undilated run's own
    # miss + 5 % where the machine's load already spoils the undilated prediction
    assert errors[4.0] <= max(0.15, errors[1.0] + 0.05), errors
