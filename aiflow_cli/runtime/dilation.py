"""Time dilation: emulating tiers faster than this CPU, honestly.

As in time-warped network emulation (Gupta et al., "To Infinity and Beyond: Time-Warped Network Emulation",
NSDI 2006): slow down everything the emulation controls by a factor ``D`` and divide every reported time by
``D``. With ``D`` = the fastest tier's speed (relative to this CPU):

- the fastest tier runs at this CPU's real speed; every other tier of speed ``s`` is stretched by ``D / s``
  (:class:`aiflow_cli.runtime.node.TierNode`, ``dilation=D``);
- every link's delays (RTT, jitter) are multiplied by ``D`` and its rates divided by ``D`` (:meth:`Dilation.link`;
  the queue keeps its size in bytes);
- measured times are divided by ``D`` (:meth:`Dilation.result`), and labelled as dilated.

What the emulation does not control runs in real time and so appears ``D`` times faster once divided: the
runtime's own per-message work (framing, Python hand-offs, the transport) and the link emulator's timer
overshoot. The planner is told so (``Overheads.dilated(D)``). ``D = 1`` is an ordinary (undilated) run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from aiflow_cli.errors import InputError
from aiflow_cli.links import LinkProfile
from aiflow_cli.runtime.pipeline import RunResult
from aiflow_cli.runtime.timings import LinkTiming, TierTiming, Timings

_MS_FIELDS = {TierTiming: ("compute_ms", "encode_ms", "decode_ms", "handle_ms"), LinkTiming: ("wire_ms",)}


@dataclass(frozen=True)
class Dilation:
    """Time dilation by ``factor`` (>= 1; 1 = none)."""

    factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise InputError(f"dilation factor {self.factor}: must be >= 1")

    @classmethod
    def for_speeds(cls, speeds: Mapping[str, float], headroom: float = 1.0) -> "Dilation":
        """The smallest dilation that lets every tier run (the fastest speed, or 1 if none is above 1), times
        ``headroom``: with ``headroom`` H > 1 even the fastest tier is stretched (by H), so that every tier's
        compute follows its CPU time, and a machine loaded less than H-fold does not show in the figures."""
        if not headroom >= 1:
            raise InputError(f"headroom={headroom}: must be >= 1", param="headroom")
        return cls(max([1.0, *speeds.values()]) * headroom)

    @property
    def active(self) -> bool:
        return self.factor > 1

    def label(self) -> str:
        return f"dilated x{self.factor:g}" if self.active else "real time"

    def link(self, link: LinkProfile) -> LinkProfile:
        """What the emulator must do so that, divided by ``factor``, the link behaves as ``link``."""
        if not self.active:
            return link
        d = self.factor
        return link.model_copy(
            update={
                "name": f"{link.name}@x{d:g}",
                "uplink_mbps": link.uplink_mbps / d,
                "downlink_mbps": link.downlink_mbps / d,
                "rtt_ms": link.rtt_ms * d,
                "jitter_ms": link.jitter_ms * d,
                "queue_ms": link.queue_ms * d,
            }
        )

    def links(self, links: Mapping[str, LinkProfile]) -> dict[str, LinkProfile]:
        return {k: self.link(v) for k, v in links.items()}

    def ms(self, real_ms: float) -> float:
        """Emulated milliseconds of ``real_ms`` measured."""
        return real_ms / self.factor

    def timings(self, t: Timings) -> Timings:
        """A copy of ``t`` with every time divided by ``factor`` (bytes and counts unchanged)."""
        out = Timings()
        for name, rec in t.tiers.items():
            out.tiers[name] = dataclasses.replace(
                rec, **{f: getattr(rec, f) / self.factor for f in _MS_FIELDS[TierTiming]}
            )
        for name, link in t.links.items():
            out.links[name] = dataclasses.replace(
                link, **{f: getattr(link, f) / self.factor for f in _MS_FIELDS[LinkTiming]}
            )
        return out

    def result(self, r: RunResult) -> RunResult:
        """A copy of ``r`` in emulated time."""
        if not self.active:
            return r
        return dataclasses.replace(r, total_ms=r.total_ms / self.factor, timings=self.timings(r.timings))


class TierSpeeds:
    """Mixin of a run's configuration with ``device_speed``, ``edge_speed`` and ``cloud_speed`` fields (multiples
    of this CPU): the speeds per tier and the dilation they need."""

    device_speed: float
    edge_speed: float
    cloud_speed: float
    headroom: float = 1.0

    @property
    def speeds(self) -> dict[str, float]:
        return {"device": self.device_speed, "edge": self.edge_speed, "cloud": self.cloud_speed}

    @property
    def dilation(self) -> Dilation:
        return Dilation.for_speeds(self.speeds, self.headroom)
