"""Wall-clock timing of repeated calls, shared by the profiler and the benchmarks."""

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
