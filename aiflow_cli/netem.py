"""A userspace link emulator for UDP (so for QUIC): rate, one-way delay, jitter, loss and a bounded queue per
direction, from a link profile (``profiles/links/*.toml``). No root needed; the relay runs in Rust.

Clients send to :attr:`LinkEmulator.address`; datagrams go to ``forward`` through the *uplink* (``uplink_mbps``)
and replies come back through the *downlink* (``downlink_mbps``). Each direction delays datagrams by
``rtt_ms / 2`` plus normal jitter (std-dev ``jitter_ms``, delivery kept in order), drops ``loss_pct`` percent at
random, and holds at most ``queue_ms`` of traffic at the link rate (drop-tail). Rates count 28 bytes of IPv4 +
UDP header per datagram; datagrams above ``max_datagram_bytes`` (1472: a 1500-byte MTU) are dropped, as a real
link would.
"""

from __future__ import annotations

import time
from typing import Any

from aiflow_cli import _core
from aiflow_cli.links import LinkProfile, load_link

#: IPv4 + UDP header bytes the emulator counts against the rate for each datagram.
WIRE_OVERHEAD_BYTES = 28


class LinkEmulator:
    """A running emulator between ``listen`` (``host:port``; port 0 picks one) and ``forward``.

    ``link`` is a :class:`LinkProfile` or a profile name/path (``"lte"``). ``seed`` fixes the loss and jitter
    draws. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        forward: str,
        link: LinkProfile | str,
        max_datagram_bytes: int = 1472,
        seed: int = 0,
    ) -> None:
        self.link = load_link(link) if isinstance(link, str) else link
        lk = self.link
        self._emu = _core.LinkEmulator(
            listen,
            forward,
            lk.uplink_mbps,
            lk.downlink_mbps,
            lk.rtt_ms,
            lk.jitter_ms,
            lk.loss_pct,
            lk.queue_ms,
            max_datagram_bytes,
            seed,
        )
        self.forward = forward

    @property
    def address(self) -> str:
        """``host:port`` clients should send to."""
        return self._emu.address

    def stats(self) -> dict[str, Any]:
        """``{"uplink": {...}, "downlink": {...}, "flows": n}`` with datagrams/bytes in and out, ``lost``,
        ``queue_drops`` and ``too_big`` per direction."""
        return dict(self._emu.stats())

    def close(self) -> None:
        """Stops relaying and closes the sockets. Idempotent."""
        self._emu.close()

    def __enter__(self) -> "LinkEmulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(
    listen: str, forward: str, link: LinkProfile | str, *, duration_s: float | None = None, seed: int = 0, on_start=None
) -> dict[str, Any]:
    """Runs an emulator until ``duration_s`` passes (or forever / Ctrl-C) and returns its final stats.
    ``on_start(emulator)`` is called once it listens."""
    with LinkEmulator(listen, forward=forward, link=link, seed=seed) as emu:
        if on_start is not None:
            on_start(emu)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
        except KeyboardInterrupt:
            pass
        return emu.stats()


__all__ = ["LinkEmulator", "run", "WIRE_OVERHEAD_BYTES"]
