"""Timing shared by the profiler, the runtime and the benchmarks: the median of repeated calls (wall clock), the
clock that measures a thread's own work, and the stretch of a tier emulated at another speed (torch-free: the CLI
checks ``--speed`` / ``--dilation`` with it before importing torch)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

from aiflow_cli.errors import InputError


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


def check_speed(speed: float, dilation: float = 1.0) -> float:
    """The stretch factor of a tier emulated at ``speed`` x this CPU under time dilation ``dilation``
    (``dilation / speed`` >= 1); refuses, in one line, a speed the emulation cannot give."""
    if not dilation >= 1:
        raise InputError(f"dilation={dilation}: must be >= 1 (1: no dilation)", param="dilation")
    if not 0 < speed <= dilation:
        if dilation == 1:
            raise InputError(
                f"speed={speed}: without time dilation a tier can only be emulated slower than this "
                f"machine (0 < speed <= 1); for a faster one give dilation={speed:g} or more",
                param="speed,dilation",
            )
        raise InputError(
            f"speed={speed}: must be in (0, {dilation:g}] under dilation={dilation:g} (the fastest "
            f"tier runs at this CPU's real speed)",
            param="speed,dilation",
        )
    return dilation / speed
