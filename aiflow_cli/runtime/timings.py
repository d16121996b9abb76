"""Per-request timings: compute and codec time per tier, bytes and wire time per link.

Every tier adds its own figures to those of the tiers behind it, so the reply that reaches the device describes
the whole request. Wire time of a link = the round trip its sender measured minus the time the receiver spent
handling the message (so it holds serialisation, propagation, queueing and the transport's own work).
All times are milliseconds, summed over every step of the request (prefill and decode steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TierTiming:
    compute_ms: float = 0.0
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    handle_ms: float = 0.0
    steps: int = 0


@dataclass
class LinkTiming:
    bytes_up: int = 0
    bytes_down: int = 0
    wire_ms: float = 0.0
    messages: int = 0


def _add(into: Any, other: Any) -> None:
    for f in fields(into):
        setattr(into, f.name, getattr(into, f.name) + getattr(other, f.name))


def _like(default: Any, value: Any) -> Any:
    """``value`` as the type of the field's ``default`` (int counters stay ints)."""
    return type(default)(value)


@dataclass
class Timings:
    """Figures of one request, keyed by tier name and link name (``device-edge``)."""

    tiers: dict[str, TierTiming] = field(default_factory=dict)
    links: dict[str, LinkTiming] = field(default_factory=dict)

    def tier(self, name: str) -> TierTiming:
        return self.tiers.setdefault(name, TierTiming())

    def link(self, name: str) -> LinkTiming:
        return self.links.setdefault(name, LinkTiming())

    def merge(self, other: "Timings") -> None:
        for k, tier in other.tiers.items():
            _add(self.tier(k), tier)
        for k, link in other.links.items():
            _add(self.link(k), link)

    def to_json(self) -> dict[str, Any]:
        return {"tiers": {k: asdict(v) for k, v in self.tiers.items()},
                "links": {k: asdict(v) for k, v in self.links.items()}}

    @classmethod
    def from_json(cls, data: Any) -> "Timings":
        out = cls()
        if isinstance(data, dict):
            for k, v in (data.get("tiers") or {}).items():
                out.tiers[str(k)] = TierTiming(**{f.name: _like(f.default, v.get(f.name, 0)) for f in fields(TierTiming)})
            for k, v in (data.get("links") or {}).items():
                out.links[str(k)] = LinkTiming(**{f.name: _like(f.default, v.get(f.name, 0)) for f in fields(LinkTiming)})
        return out
