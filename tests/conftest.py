"""Shared test helpers.

:func:`wait_until` replaces fixed sleeps: servers bump their counters after the reply is on the wire, relays
deliver after their emulated delay, processes take a moment to die. Poll for the condition with a bound instead
of sleeping for a guess, so a loaded machine gives a slower test, not a flaky one.

:func:`own_cache` gives a test module a fresh ``AIFLOW_CACHE_DIR`` (``pytestmark =
pytest.mark.usefixtures("own_cache")``).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, TypeVar

import pytest

T = TypeVar("T")


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory) -> Iterator[None]:
    """``AIFLOW_CACHE_DIR`` in a fresh directory for the module: measurements and references go there, so a test
    must measure, not read an old answer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("aiflow-cache")))
        yield


def wait_until(predicate: Callable[[], T], timeout_s: float = 5.0, interval_s: float = 0.01, what: str = "") -> T:
    """Calls ``predicate`` every ``interval_s`` until it returns something truthy, and returns that; fails the
    test (AssertionError naming ``what`` or the predicate) if ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g} s waiting for {what or getattr(predicate, '__name__', 'a condition')}"
            )
        time.sleep(interval_s)


def settled(read: Callable[[], object], quiet_s: float = 0.1) -> Callable[[], bool]:
    """A predicate for :func:`wait_until`: true once ``read()`` has returned the same value for ``quiet_s`` (for
    counters that stop moving when in-flight work is done)."""
    last: list[object] = []
    since = [time.monotonic()]

    def check() -> bool:
        now, value = time.monotonic(), read()
        if not last or value != last[0]:
            last[:] = [value]
            since[0] = now
            return False
        return now - since[0] >= quiet_s

    return check
