"""Per-request timings: compute and codec time per tier, bytes and wire time per link.

Every tier adds its own figures to those of the tiers behind it, so the reply that reaches the device describes
the whole request. Wire time of a link = the round trip its sender measured minus the time the receiver spent
handling the message (so it holds serialisation, propagation, queueing and the transport's own work).
All times are milliseconds, summed over every step of the request (prefill and decode steps).

On the wire (:meth:`Timings.to_wire`, inside every result message) each tier and link is an array of its fields
in declaration order: ``{"tiers": {"edge": [compute_ms, encode_ms, decode_ms, handle_ms, steps]}, "links":
{"edge-cloud": [bytes_up, bytes_down, wire_ms, messages]}}``.
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
    # per message on every tier: plain attribute dicts, not dataclasses.fields() (3x slower)
    mine = into.__dict__
    for k, v in other.__dict__.items():
        mine[k] += v


_TYPES: dict[type, list[Any]] = {c: [type(f.default) for f in fields(c)] for c in (TierTiming, LinkTiming)}


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
        return {
            "tiers": {k: asdict(v) for k, v in self.tiers.items()},
            "links": {k: asdict(v) for k, v in self.links.items()},
        }

    def to_wire(self) -> dict[str, Any]:
        """The compact form carried in result messages (see the module docstring)."""
        return {
            "tiers": {k: list(vars(v).values()) for k, v in self.tiers.items()},
            "links": {k: list(vars(v).values()) for k, v in self.links.items()},
        }

    @classmethod
    def from_wire(cls, data: Any) -> "Timings":
        """Parses :meth:`to_wire`'s form; raises ValueError/TypeError on anything else."""
        if type(data) is not dict or set(data) - {"tiers", "links"}:
            raise ValueError("expected {tiers, links}")
        out = cls()
        sections: tuple[tuple[str, dict[str, Any], Any], ...] = (
            ("tiers", out.tiers, TierTiming),
            ("links", out.links, LinkTiming),
        )
        for key, into, kind in sections:
            types = _TYPES[kind]
            entries = data.get(key, {})
            if type(entries) is not dict:
                raise ValueError(f"{key} must be a mapping")
            for k, v in entries.items():
                if type(v) is not list or len(v) != len(types) or not all(type(x) in (int, float) for x in v):
                    raise ValueError(f"{key} entry {str(k)[:20]!r} must be {len(types)} numbers")
                into[k] = kind(*(t(x) for t, x in zip(types, v)))
        return out
