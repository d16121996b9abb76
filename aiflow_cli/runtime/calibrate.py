"""Measures the runtime's fixed costs on this machine: what one message round trip and one connection cost
beyond what the model profile and the link account for. The planner prices them (``Overheads``).

Method (one run of the real runtime, on loopback): a tiny model (:data:`MODEL`) split over device, edge and
cloud with the ``raw`` codec, the device-edge link through the link emulator (a calibration link: no rate
limit, :data:`RTT_MS` RTT, no jitter or loss) and edge-cloud direct. After warm-up, :data:`REQUESTS` requests of
:data:`TOKENS` tokens each (so every request sends ``TOKENS`` messages over each link) give, per message:

- the wire time of each link (``Timings.links[..].wire_ms``: the sender's round trip minus the receiver's
  handling), less the link's RTT on the emulated one: the transport (QUIC, TLS, framing in Rust), plus the
  emulator's own cost (its timer) on the emulated link;
- the Python hand-offs: the request's wall time less every tier's compute and codec time and every link's wire
  time, shared over the messages (building and parsing messages and timings, the driver's per-step work).

``message_ms`` = wire + hand-offs, one figure for an emulated link and one for a direct one. ``handshake_ms``:
a fresh client's ``connect()`` through the emulator, less one RTT (QUIC with TLS 1.3 is a 1-RTT handshake).
Medians over the requests. The result is cached as JSON in :func:`calibration_path` (per machine: the CPU model
and core count are recorded and checked) and re-measured with ``aiflow calibrate --force`` or when missing.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from aiflow_cli.links import LinkProfile
from aiflow_cli.plan.problem import Overheads

MODEL = "builtin:gpt2-tiny"
RTT_MS = 4.0
REQUESTS = 9
TOKENS = 8
WARMUP = 3
SCHEMA_VERSION = 1
#: The calibration link: the emulator's timer and relay, with nothing to serialise against.
CALIBRATION_LINK = LinkProfile(
    name="calibration",
    source="aiflow calibration (no rate limit)",
    uplink_mbps=10_000.0,
    downlink_mbps=10_000.0,
    rtt_ms=RTT_MS,
    jitter_ms=0.0,
    loss_pct=0.0,
    queue_ms=100.0,
)


def calibration_path() -> Path:
    """``$AIFLOW_CACHE_DIR/calibration.json`` (default ``~/.cache/aiflow/calibration.json``)."""
    return Path(os.environ.get("AIFLOW_CACHE_DIR", Path.home() / ".cache" / "aiflow")) / "calibration.json"


def machine_id() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


@dataclass
class Calibration:
    """Measured fixed costs (ms). See the module docstring for how each is measured."""

    emulated_message_ms: float
    direct_message_ms: float
    handshake_ms: float
    handoff_ms: float
    emulated_wire_ms: float
    direct_wire_ms: float
    requests: int
    messages_per_request: int
    load_avg_1min: float
    machine: dict[str, Any] = field(default_factory=machine_id)
    measured_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def overheads(self, *, emulated: bool = True, dilation: float = 1.0) -> Overheads:
        """The planner's :class:`Overheads` for links that go through the emulator (or not), under dilation."""
        msg = self.emulated_message_ms if emulated else self.direct_message_ms
        o = Overheads(msg, self.handshake_ms, f"calibration {calibration_path()} ({self.measured_at})")
        return o.dilated(dilation) if dilation > 1 else o

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_calibration(path: Optional[Path] = None) -> Optional[Calibration]:
    """The stored calibration of this machine, or None (missing, unreadable, older schema or another machine)."""
    path = path or calibration_path()
    try:
        data = json.loads(path.read_text())
        cal = Calibration(**data)
    except (OSError, ValueError, TypeError):
        return None
    if cal.schema_version != SCHEMA_VERSION or cal.machine != machine_id():
        return None
    return cal


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def measure(log: Callable[[str], None] = lambda s: None, workdir: Optional[Path] = None) -> Calibration:
    """Runs the measurement described in the module docstring (about 20 s on 2 cores)."""
    import torch

    from aiflow_cli.links import load_link
    from aiflow_cli.plan import Limits, solve
    from aiflow_cli.plan.schema import save_plan
    from aiflow_cli.profile import profile_model
    from aiflow_cli.runtime.cluster import LocalCluster
    from aiflow_cli.transport import Client

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="aiflow-calibrate-", dir=workdir) as tmp:
        d = Path(tmp)
        log(f"calibrate: profiling {MODEL}")
        prof = profile_model(MODEL, repeats=1, warmup=0, codecs=["raw"])
        plan = solve(
            {"*": prof},
            {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")},
            objective="generate",
            tokens=TOKENS,
            speeds={"device": 1.0, "edge": 1.0, "cloud": 1.0},
            limits=Limits(require=frozenset({"device", "edge", "cloud"}), codecs=("raw",)),
        )
        save_plan(plan, d / "plan.json")
        log("calibrate: starting edge and cloud (device-edge through the emulator, edge-cloud direct)")
        with LocalCluster(d / "plan.json", d, links={"device-edge": CALIBRATION_LINK}) as c:
            with c.pipeline(timeout_s=120) as p:
                p.hello()
                text = "calibrating the fixed cost of one message"
                for _ in range(WARMUP):
                    p.run(text=text, max_new_tokens=TOKENS)
                handoff, wire_e, wire_d, messages = [], [], [], 0
                log(f"calibrate: {REQUESTS} requests of {TOKENS} tokens")
                for _ in range(REQUESTS):
                    r = p.run(text=text, max_new_tokens=TOKENS)
                    t = r.timings
                    de, ec = t.links["device-edge"], t.links["edge-cloud"]
                    messages = de.messages + ec.messages
                    work = sum(x.compute_ms + x.encode_ms + x.decode_ms for x in t.tiers.values())
                    handoff.append((r.total_ms - work - de.wire_ms - ec.wire_ms) / messages)
                    wire_e.append(de.wire_ms / de.messages - RTT_MS)
                    wire_d.append(ec.wire_ms / ec.messages)
                hs = []
                for _ in range(5):
                    fresh = Client(c.addresses["edge"], identity=c.keys["device"], trust=c.fingerprints())
                    t0 = time.perf_counter()
                    fresh.connect()
                    hs.append((time.perf_counter() - t0) * 1e3 - RTT_MS)
                    fresh.close()
    h, we, wd = _median(handoff), _median(wire_e), _median(wire_d)
    return Calibration(
        emulated_message_ms=round(h + we, 3),
        direct_message_ms=round(h + wd, 3),
        handshake_ms=round(_median(hs), 3),
        handoff_ms=round(h, 3),
        emulated_wire_ms=round(we, 3),
        direct_wire_ms=round(wd, 3),
        requests=REQUESTS,
        messages_per_request=messages,
        load_avg_1min=round(os.getloadavg()[0], 2),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def calibrate(*, force: bool = False, log: Callable[[str], None] = lambda s: None) -> Calibration:
    """This machine's calibration: the stored one, or measured now and stored (``force``: always measure)."""
    if not force:
        cal = load_calibration()
        if cal is not None:
            log(
                f"calibration: cached {calibration_path()} (message {cal.emulated_message_ms:.2f} ms emulated, "
                f"{cal.direct_message_ms:.2f} ms direct; handshake {cal.handshake_ms:.1f} ms + 1 RTT)"
            )
            return cal
    cal = measure(log)
    path = calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cal.to_json(), indent=2) + "\n")
    log(
        f"calibration: message {cal.emulated_message_ms:.2f} ms emulated, {cal.direct_message_ms:.2f} ms direct; "
        f"handshake {cal.handshake_ms:.1f} ms + 1 RTT (stored in {path})"
    )
    return cal
