"""A whole plan on one machine: cloud and edge as real `aiflow serve` subprocesses on loopback, optional link
emulators in front of each, and the device in this process. Used by `aiflow demo`, the tests and the e2e
benchmark.

    with LocalCluster(plan_path, workdir, links={"device-edge": "lte", "edge-cloud": "wan"}) as c:
        r = c.pipeline().run(image=img)

Start order: cloud, its emulator, edge (``--next`` = that emulator), the edge's emulator; the device connects
to the last. Identities are made once per ``workdir`` (``keys/{device,edge,cloud}``). Every subprocess is
stopped (SIGTERM, then SIGKILL) on exit; a server that fails to start raises with its stderr.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from aiflow_cli.errors import InputError, TransportError
from aiflow_cli.links import LinkProfile, load_link
from aiflow_cli.netem import LinkEmulator
from aiflow_cli.runtime.pipeline import Pipeline
from aiflow_cli.transport import Identity

TIERS = ("device", "edge", "cloud")
START_TIMEOUT_S = 120.0
#: How long :meth:`LocalCluster.set_link` retries binding the old emulator's port.
REBIND_TIMEOUT_S = 5.0


def identities(workdir: Path) -> dict[str, Identity]:
    """``workdir/keys/<tier>`` for each tier, generated on first use."""
    out = {}
    for tier in TIERS:
        d = workdir / "keys" / tier
        out[tier] = Identity.load(d) if (d / "node.crt").exists() else Identity.generate(d)
    return out


class ServerProcess:
    """One `aiflow serve` subprocess; :attr:`info` is its ``ready`` line."""

    def __init__(self, args: list[str], log_path: Path, env: Optional[dict[str, str]] = None):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "aiflow_cli", *args], stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True)
        self.info = self._wait_ready()

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                for line in buf.splitlines():
                    if line.startswith(b"{") and b'"ready"' in line:
                        return json.loads(line)
        self.stop()
        log = self.log_path.read_text(errors="replace")[-2000:]
        raise TransportError(f"`aiflow {' '.join(self.args[:3])}` did not start (exit {self.proc.returncode}): {log.strip()}")

    @property
    def address(self) -> str:
        return self.info["address"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


class LocalCluster:
    """Cloud and edge subprocesses for ``plan_path`` on loopback; see the module docstring.

    ``links``: ``{"device-edge": name|path|LinkProfile, "edge-cloud": ...}`` puts an emulator in front of the
    receiving tier (absent: a direct loopback connection). ``speeds``: tier -> emulated speed (<= 1).
    ``threads``: torch intra-op threads per server (default 1: tiers that share a machine must not oversubscribe
    its cores, or every op waits for a descheduled OpenMP thread; see docs/runtime.md).
    """

    def __init__(self, plan_path: str | Path, workdir: str | Path, *, links: Optional[dict[str, Any]] = None,
                 speeds: Optional[dict[str, float]] = None, cache_mib: int = 1024, seed: int = 0,
                 threads: Optional[int] = 1, dilation: float = 1.0):
        self.plan_path = Path(plan_path)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.links = {k: (v if isinstance(v, LinkProfile) else load_link(v)) for k, v in (links or {}).items()}
        self.speeds = speeds or {}
        self.cache_mib = cache_mib
        self.seed = seed
        self.threads = threads
        self.dilation = dilation  # time dilation (aiflow_cli/runtime/dilation.py): passed to every tier
        self.keys = identities(self.workdir)
        self.servers: dict[str, ServerProcess] = {}
        self.emulators: dict[str, LinkEmulator] = {}
        self.addresses: dict[str, str] = {}

    def fingerprints(self) -> list[str]:
        return [i.fingerprint for i in self.keys.values()]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads:
            env["AIFLOW_THREADS"] = str(self.threads)
        return env

    def start_tier(self, tier: str, next_addr: Optional[str] = None, listen: str = "127.0.0.1:0") -> ServerProcess:
        """Starts (or restarts, on the same ``listen``) one server tier."""
        args = ["serve", "--role", tier, "--plan", str(self.plan_path), "--listen", listen, "--identity",
                str(self.keys[tier].cert_path.parent), "--cache-mib", str(self.cache_mib), "--json"]
        for fp in self.fingerprints():
            args += ["--trust", fp]
        if next_addr:
            args += ["--next", next_addr]
        if tier in self.speeds:
            args += ["--speed", str(self.speeds[tier])]
        if self.dilation != 1:
            args += ["--dilation", str(self.dilation)]
        proc = ServerProcess(args, self.workdir / f"{tier}.log", env=self._env())
        self.servers[tier] = proc
        return proc

    def _front(self, link: str, target: str) -> str:
        """The address to reach ``target`` through link ``link`` (an emulator if one is configured)."""
        if link not in self.links:
            return target
        emu = LinkEmulator("127.0.0.1:0", forward=target, link=self.links[link], seed=self.seed)
        self.emulators[link] = emu
        return emu.address

    def start(self) -> "LocalCluster":
        cloud = self.start_tier("cloud")
        self.addresses["cloud"] = self._front("edge-cloud", cloud.address)
        edge = self.start_tier("edge", next_addr=self.addresses["cloud"])
        self.addresses["edge"] = self._front("device-edge", edge.address)
        return self

    def restart(self, tier: str) -> ServerProcess:
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
        return Pipeline(self.plan_path, edge=self.addresses["edge"], identity=self.keys["device"],
                        trust=self.fingerprints(), **kw)

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
