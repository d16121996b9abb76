"""Link profiles: what a network hop between two tiers looks like (bandwidth, RTT, jitter, loss).

Link profiles are TOML files in ``profiles/links/`` (shipped in the package, see :mod:`aiflow_cli.shipped`) or
anywhere, by path. They feed the planner's cost model
and the userspace link emulator (``aiflow netem``). Units are in the field names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from aiflow_cli.errors import InputError
from aiflow_cli.schema import Strict, load_model
from aiflow_cli.shipped import LINKS_DIR, shipped_names


class LinkProfile(Strict):
    """One network hop. Rates are Mbit/s (10^6 bit/s); times are milliseconds; loss is a percentage."""

    schema_version: Literal[1] = 1
    name: str
    description: str = ""
    source: str = Field(description="where the figures come from")
    uplink_mbps: float = Field(gt=0, description="towards the cloud (device->edge, edge->cloud)")
    downlink_mbps: float = Field(gt=0, description="back towards the device")
    rtt_ms: float = Field(ge=0, description="round-trip time without queueing")
    jitter_ms: float = Field(default=0.0, ge=0, description="std-dev of one-way delay variation")
    loss_pct: float = Field(default=0.0, ge=0, lt=100, description="random packet loss per direction")
    queue_ms: float = Field(default=100.0, gt=0, description="drop-tail buffer, expressed as ms at the link rate")

    @model_validator(mode="after")
    def _sane(self) -> "LinkProfile":
        if self.jitter_ms > self.rtt_ms and self.rtt_ms > 0:
            raise ValueError("jitter_ms larger than rtt_ms is not a plausible link")
        return self

    @property
    def one_way_ms(self) -> float:
        return self.rtt_ms / 2.0

    def transfer_ms(self, n_bytes: float, *, up: bool = True) -> float:
        """Serialisation time of ``n_bytes`` at the link rate (ms), without RTT and without loss."""
        rate = self.uplink_mbps if up else self.downlink_mbps
        return n_bytes * 8.0 / (rate * 1e6) * 1e3

    def scaled(self, *, uplink_mbps: float | None = None, downlink_mbps: float | None = None) -> "LinkProfile":
        """A copy with other rates (for bandwidth sweeps)."""
        return self.model_copy(
            update={
                "uplink_mbps": uplink_mbps if uplink_mbps is not None else self.uplink_mbps,
                "downlink_mbps": downlink_mbps if downlink_mbps is not None else self.downlink_mbps,
            }
        )


def resolve_link_path(name_or_path: str) -> Path:
    """``lte`` -> profiles/links/lte.toml; a path is taken as it is."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in name_or_path:
        return p
    return LINKS_DIR / f"{name_or_path}.toml"


def load_link(name_or_path: str) -> LinkProfile:
    """Loads a link profile by name (``lte``) or path; errors name the file and the field."""
    path = resolve_link_path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"unknown link profile {name_or_path!r}: no file {path}; shipped: {', '.join(available_links())}"
        )
    return load_model(LinkProfile, path, kind="link profile")


def available_links() -> list[str]:
    """Names of the shipped link profiles (``lte``, ``wifi``, ...)."""
    return shipped_names(LINKS_DIR, ".toml")
