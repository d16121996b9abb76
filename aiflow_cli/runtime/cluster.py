"""A whole plan on one machine: cloud and edge as server processes on loopback
(:class:`aiflow_cli.runtime.serve.TierProcess`), optional link emulators in front of each, and the device in
this process. Used by `aiflow demo`, the tests and the benchmarks.

    with LocalCluster(plan_path, workdir, links={"device-edge": "lte", "edge-cloud": "wan"}) as c:
        r = c.pipeline().run(image=img)

Start: both server processes at once; each imports torch and the runtime and loads its stages (most of a
tier's start) side by side. The edge is told its ``--next`` once the cloud listens and its emulator is up; the
edge's emulator comes last, and the device connects to it. Identities are made once per ``workdir`` (``keys/{device,edge,cloud}``), logs go to
``workdir/<tier>.log``. Every child is stopped on exit (SIGTERM to all at once, then SIGKILL) and dies with this
process if it is killed; a server that fails to start raises its own error, naming its tier, and stops the
others.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from aiflow_cli.errors import InputError, TransportError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.netem import LinkEmulator
from aiflow_cli.plan.schema import Plan
from aiflow_cli.runtime.batching import BatchSettings
from aiflow_cli.runtime.pipeline import Pipeline
from aiflow_cli.runtime.serve import TierProcess, TierSpec
from aiflow_cli.transport import Identity

TIERS = ("device", "edge", "cloud")
#: How long :meth:`LocalCluster.set_link` retries binding the old emulator's port.
REBIND_TIMEOUT_S = 5.0


def identities(workdir: Path) -> dict[str, Identity]:
    """``workdir/keys/<tier>`` for each tier, generated on first use."""
    out = {}
    for tier in TIERS:
        d = workdir / "keys" / tier
        out[tier] = Identity.load(d) if (d / "node.crt").exists() else Identity.generate(d)
    return out


def device_pipeline(plan: Plan | str | Path, workdir: str | Path, **kw: Any) -> Pipeline:
    """A :class:`Pipeline` for a plan whose device runs every stage (no server tier to start), with the device
    identity of ``workdir``; ``kw``: the pipeline's other settings (``speed``, ``dilation``, ``timeout_s``...)."""
    return Pipeline(plan, edge=None, identity=identities(Path(workdir))["device"], trust=[], **kw)


class LocalCluster:
    """Cloud and edge subprocesses for ``plan_path`` on loopback; see the module docstring.

    ``links``: ``{"device-edge": name|path|LinkProfile, "edge-cloud": ...}`` puts an emulator in front of the
    receiving tier (absent: a direct loopback connection). ``speeds``: tier -> emulated speed (<= 1).
    ``threads``: torch intra-op threads per server (default 1: tiers that share a machine must not oversubscribe
    its cores, or every op waits for a descheduled OpenMP thread; see docs/runtime.md).
    """

    def __init__(
        self,
        plan_path: str | Path,
        workdir: str | Path,
        *,
        links: Optional[dict[str, Any]] = None,
        speeds: Optional[dict[str, float]] = None,
        cache_mib: int = 1024,
        seed: int = 0,
        threads: Optional[int] = 1,
        dilation: float = 1.0,
        metrics: Optional[dict[str, str]] = None,
        batching: Optional[BatchSettings] = None,
    ):
        self.plan_path = Path(plan_path)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.links = {k: (v if isinstance(v, LinkProfile) else load_link(v)) for k, v in (links or {}).items()}
        self.speeds = speeds or {}
        self.cache_mib = cache_mib
        self.seed = seed
        self.threads = threads
        self.dilation = dilation  # time dilation (aiflow_cli/runtime/dilation.py): passed to every tier
        self.metrics = metrics or {}  # tier -> HOST:PORT of its Prometheus metrics (TierReady.metrics: bound)
        self.batching = batching or BatchSettings()  # decode batching of both servers (runtime/batching.py)
        self.keys = identities(self.workdir)
        self.servers: dict[str, TierProcess] = {}
        self.emulators: dict[str, LinkEmulator] = {}
        self.addresses: dict[str, str] = {}

    def fingerprints(self) -> list[str]:
        return [i.fingerprint for i in self.keys.values()]

    def spec(
        self, tier: str, next_addr: Optional[str] = None, listen: str = "127.0.0.1:0", *, next_later: bool = False
    ) -> TierSpec:
        """The :class:`TierSpec` of server tier ``tier``."""
        return TierSpec(
            role=tier,
            plan_path=str(self.plan_path),
            identity_dir=str(self.keys[tier].cert_path.parent),
            trust=tuple(self.fingerprints()),
            listen=listen,
            next_addr=next_addr,
            speed=self.speeds.get(tier, 1.0),
            cache_limit_bytes=self.cache_mib << 20,
            threads=self.threads,
            dilation=self.dilation,
            metrics=self.metrics.get(tier),
            batch_max=self.batching.max_batch,
            batch_window_ms=self.batching.window_ms,
            next_later=next_later,
        )

    def spawn(self, tier: str) -> TierProcess:
        """Starts the process of server tier ``tier`` (it imports while the caller goes on; see
        :meth:`TierProcess.start`) and tracks it, so that :meth:`close` stops it whatever happens next."""
        proc = TierProcess(tier, self.workdir / f"{tier}.log")
        self.servers[tier] = proc
        return proc

    def start_tier(self, tier: str, next_addr: Optional[str] = None, listen: str = "127.0.0.1:0") -> TierProcess:
        """Starts (or restarts, on the same ``listen``) one server tier and waits until it listens."""
        proc = self.spawn(tier)
        proc.start(self.spec(tier, next_addr, listen))
        return proc

    def _front(self, link: str, target: str) -> str:
        """The address to reach ``target`` through link ``link`` (an emulator if one is configured)."""
        if link not in self.links:
            return target
        emu = LinkEmulator("127.0.0.1:0", forward=target, link=self.links[link], seed=self.seed)
        self.emulators[link] = emu
        return emu.address

    def start(self) -> "LocalCluster":
        """Starts both server processes at once: they import and load their stages side by side; the edge learns
        its ``next_addr`` (the cloud, or its emulator) once the cloud listens, then listens itself."""
        cloud, edge = self.spawn("cloud"), self.spawn("edge")
        cloud.send(self.spec("cloud"))
        edge.send(self.spec("edge", next_later=True))
        cloud.wait_ready()
        self.addresses["cloud"] = self._front("edge-cloud", cloud.address)
        edge.send_next(self.addresses["cloud"])
        edge.wait_ready()
        self.addresses["edge"] = self._front("device-edge", edge.address)
        return self

    def restart(self, tier: str) -> TierProcess:
        """Kills ``tier`` (if alive) and starts it again on the same port."""
        old = self.servers[tier]
        old.kill()
        old.stop()
        nxt = self.addresses.get("cloud") if tier == "edge" else None
        return self.start_tier(tier, next_addr=nxt, listen=old.address)

    def pipeline(self, **kw: Any) -> Pipeline:
        """A device :class:`Pipeline` connected to the edge (through its emulator if any)."""
        kw.setdefault("speed", self.speeds.get("device", 1.0))
        kw.setdefault("dilation", self.dilation)
        return Pipeline(
            self.plan_path, edge=self.addresses["edge"], identity=self.keys["device"], trust=self.fingerprints(), **kw
        )

    def set_link(self, link: str, profile: LinkProfile | str) -> str:
        """Swaps the emulator of ``link`` for one of ``profile`` on the same address, so the servers keep running
        (and an edge whose ``--next`` is that address keeps it); returns the address. Connections made through the
        old emulator are cut: close the clients that used it (the next request reconnects)."""
        if link not in self.emulators:
            have = ", ".join(self.emulators) or "none"
            raise InputError(f"link {link!r} has no emulator to replace (emulated: {have})")
        old = self.emulators[link]
        profile = profile if isinstance(profile, LinkProfile) else load_link(profile)
        address = old.address
        old.close()
        deadline = time.monotonic() + REBIND_TIMEOUT_S
        while True:  # the old relay's tasks release the port within its close(); retry briefly in case they lag
            try:
                emu = LinkEmulator(address, forward=old.forward, link=profile, seed=self.seed)
                break
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.emulators[link] = emu
        self.links[link] = profile
        return address

    def link_stats(self) -> dict[str, Any]:
        return {k: e.stats() for k, e in self.emulators.items()}

    def close(self) -> None:
        for s in self.servers.values():  # all at once: each takes a moment to close its connections
            s.terminate()
        for s in self.servers.values():
            s.stop()
        for e in self.emulators.values():
            e.close()

    def __enter__(self) -> "LocalCluster":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
