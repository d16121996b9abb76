"""Timing shared by the profiler, the runtime and the benchmarks: the median of repeated calls (wall clock), and
the clock that measures a thread's own work."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_s(fn: Callable[[], object], repeats: int, *, warmup: bool = False, budget_s: float | None = None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in seconds.

    ``warmup``: one untimed call first (allocations, caches). ``budget_s``: stop early once this many seconds
    have passed since timing began, keeping at least 3 samples.
    """
    if warmup:
        fn()
    times = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if deadline is not None and time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in milliseconds (no warm-up, no budget)."""
    return median_s(fn, repeats) * 1e3


def work_clock(device: str = "cpu") -> Callable[[], float]:
    """A clock (seconds) for the work of the calling thread: its CPU time when the work runs in this thread (CPU,
    torch with one intra-op thread, as every aiflow tier runs), else the wall clock. On a loaded machine the wall
    time of a computation grows with the load while its CPU time stays what the work costs: the profiler
    measures stages with this clock and the runtime stretches emulated tiers by it, so the two agree."""
    import torch

    if str(device) == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter
