"""What a connection learns about its link, and when that is reason enough to re-plan. I/O-free: the device feeds
it figures, it answers with estimates and decisions (aiflow_cli/runtime/replan.py does the I/O).

:class:`LinkWatch` keeps the last ``window`` messages sent over one link: bytes up, bytes down and the time the
message spent on the wire (the round trip as the sender timed it, minus the time the next tier reports it
spent handling the message: its compute, codec and everything behind it). From them:

- ``rtt_ms``: the smallest wire time of the last ``rtt_window`` messages (a few decode steps: after a change
  of network it follows within one generation; the smallest message's round trip: propagation, plus the
  fixed cost of one message, plus the serialisation of a few hundred bytes). QUIC's own smoothed RTT of the
  connection (``path_rtt_ms``, from the transport's path statistics) is kept beside it for reports; it is not
  used for the model because it includes the queueing of large transfers;
- ``uplink_mbps``: bytes sent up by the last ``rate_window`` *large* messages of the window (at least
  ``big_bytes`` and 4x the smallest message; the prefill's hidden states, not a decode step's) over their wire
  time beyond ``rtt_ms``: two prompts, so that one new prompt on a changed link moves the estimate most of the way.
  The downlink is not estimated (replies to generation steps are a few token ids; too small to time).

:class:`ReplanPolicy` decides with hysteresis: a new plan is proposed only when the estimate rests on at least
``min_samples`` large messages seen since the last switch and ``min_interval_s`` have passed since it; when the
measured link differs from the one the current plan was last solved for by at least ``change`` (relative, rate
or RTT); and when the best plan for the measured link is predicted at least ``margin`` (relative) cheaper than the
current plan on that same link. So a steady link never flaps: after a solve, the link it was solved for is the
measured one, and nothing is re-solved until the measurement moves again by ``change``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from aiflow_cli.errors import InputError
from aiflow_cli.links import LinkProfile

#: A message at least this large (bytes up) times the uplink rate (with 4x the window's smallest).
DEFAULT_BIG_BYTES = 4096
#: Shortest serialisation time credited to a sample (ms): a message timed faster than its RTT says nothing.
MIN_SERIAL_MS = 0.05


@dataclass(frozen=True)
class LinkSample:
    """One message over the link: ``bytes_up`` / ``bytes_down`` (frames as sent), ``wire_ms`` (round trip
    minus the time the receiver reports handling it), ``at_s`` (a monotonic time)."""

    bytes_up: int
    bytes_down: int
    wire_ms: float
    at_s: float


@dataclass(frozen=True)
class LinkEstimate:
    """The measured link: ``rtt_ms`` (smallest wire time), ``uplink_mbps`` (None: no large message yet),
    ``samples`` / ``big_samples`` in the window, ``path_rtt_ms`` (QUIC's smoothed RTT; None if unknown)."""

    rtt_ms: float
    uplink_mbps: Optional[float]
    samples: int
    big_samples: int
    path_rtt_ms: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "rtt_ms": round(self.rtt_ms, 3),
            "uplink_mbps": None if self.uplink_mbps is None else round(self.uplink_mbps, 3),
            "samples": self.samples,
            "big_samples": self.big_samples,
            "path_rtt_ms": None if self.path_rtt_ms is None else round(self.path_rtt_ms, 3),
        }

    def apply(self, assumed: LinkProfile) -> LinkProfile:
        """``assumed`` with the measured RTT and uplink (the downlink keeps its ratio to the uplink)."""
        if self.uplink_mbps is None:
            return assumed.model_copy(update={"rtt_ms": self.rtt_ms, "jitter_ms": min(assumed.jitter_ms, self.rtt_ms)})
        ratio = assumed.downlink_mbps / assumed.uplink_mbps
        return assumed.model_copy(
            update={
                "name": f"{assumed.name} (measured)",
                "rtt_ms": self.rtt_ms,
                "jitter_ms": min(assumed.jitter_ms, self.rtt_ms),
                "uplink_mbps": self.uplink_mbps,
                "downlink_mbps": self.uplink_mbps * ratio,
            }
        )


class LinkWatch:
    """The last ``window`` messages of one link (see the module docstring). Not thread-safe by itself: the
    caller serialises :meth:`observe` (the device's pipeline holds a lock)."""

    def __init__(self, window: int = 32, big_bytes: int = DEFAULT_BIG_BYTES, rtt_window: int = 8, rate_window: int = 2):
        if window < 2 or not 1 <= rtt_window <= window:
            raise InputError(f"window={window}, rtt_window={rtt_window}: need 1 <= rtt_window <= window, window >= 2")
        self.samples: deque[LinkSample] = deque(maxlen=window)
        self.rtt_window = rtt_window
        self.rate_window = max(1, rate_window)
        self.big_bytes = big_bytes
        self.path_rtt_ms: Optional[float] = None
        self.total = 0

    def observe(self, bytes_up: int, bytes_down: int, wire_ms: float, at_s: float) -> None:
        """One message; a negative or non-finite wire time (clock trouble) is dropped."""
        if not (wire_ms >= 0 and wire_ms < float("inf")) or bytes_up < 0 or bytes_down < 0:
            return
        self.samples.append(LinkSample(int(bytes_up), int(bytes_down), float(wire_ms), float(at_s)))
        self.total += 1

    def observe_path(self, info: Optional[dict[str, Any]]) -> None:
        """QUIC's path statistics of the connection (``Client.path_info()``: ``rtt_us``, ...); None: unknown."""
        if info and isinstance(info.get("rtt_us"), int):
            self.path_rtt_ms = info["rtt_us"] / 1e3

    def big(self, since_s: float = float("-inf")) -> list[LinkSample]:
        """The window's large messages (at ``since_s`` or later): what the uplink rate is timed on."""
        if not self.samples:
            return []
        floor = max(self.big_bytes, 4 * min(s.bytes_up for s in self.samples))
        return [s for s in self.samples if s.bytes_up >= floor and s.at_s >= since_s]

    def estimate(self) -> Optional[LinkEstimate]:
        """The current estimate, or None before the first sample."""
        if not self.samples:
            return None
        recent = list(self.samples)[-self.rtt_window :]
        rtt = min(s.wire_ms for s in recent)
        big = self.big()[-self.rate_window :]
        rate = None
        if big:
            bits = sum(8.0 * s.bytes_up for s in big)
            ms = sum(max(s.wire_ms - rtt, MIN_SERIAL_MS) for s in big)
            rate = bits / ms / 1e3  # bit/ms -> Mbit/s
        return LinkEstimate(rtt, rate, len(self.samples), len(big), self.path_rtt_ms)


def relative_change(a: float, b: float) -> float:
    """``max(a, b) / min(a, b) - 1``: 0 when equal, 9 for a 10x change either way (inf against 0)."""
    lo, hi = min(a, b), max(a, b)
    return float("inf") if lo <= 0 else hi / lo - 1.0


@dataclass(frozen=True)
class ReplanPolicy:
    """When to propose a new plan (see the module docstring). ``margin``: the new plan must be predicted at
    least this much cheaper (relative) than the current one on the measured link; ``change``: the measured
    rate or RTT must differ this much (relative) from the link last solved for; ``min_samples``: large messages
    measured since the last switch; ``min_interval_s``: seconds since the last switch; ``min_rtt_ms``: RTT
    changes below this many ms count as none (timer noise on loopback)."""

    margin: float = 0.2
    change: float = 0.5
    min_samples: int = 3
    min_interval_s: float = 1.0
    min_rtt_ms: float = 2.0

    def check(self) -> "ReplanPolicy":
        for name in ("margin", "change", "min_interval_s", "min_rtt_ms"):
            v = getattr(self, name)
            if not v >= 0:
                raise InputError(f"{name}={v}: must be >= 0", param=name)
        if self.margin >= 1:
            raise InputError(f"margin={self.margin}: a relative margin must be < 1", param="margin")
        if self.min_samples < 1:
            raise InputError(f"min_samples={self.min_samples}: must be >= 1", param="min_samples")
        return self

    def link_moved(self, measured: LinkProfile, solved: LinkProfile) -> bool:
        """Whether ``measured`` is far enough from the link the current plan was last solved for."""
        rate = relative_change(measured.uplink_mbps, solved.uplink_mbps) >= self.change
        rtt = (
            abs(measured.rtt_ms - solved.rtt_ms) >= self.min_rtt_ms
            and relative_change(max(measured.rtt_ms, 1e-3), max(solved.rtt_ms, 1e-3)) >= self.change
        )
        return rate or rtt

    def ready(self, watch: LinkWatch, now_s: float, switched_at_s: float) -> bool:
        """Enough evidence since the last switch (or since the start, ``switched_at_s = -inf``)."""
        return (
            now_s - switched_at_s >= self.min_interval_s and len(watch.big(since_s=switched_at_s)) >= self.min_samples
        )

    def better(self, new_ms: float, current_ms: float) -> bool:
        """Whether a plan predicted at ``new_ms`` beats one at ``current_ms`` by the margin."""
        return new_ms < current_ms * (1.0 - self.margin)
