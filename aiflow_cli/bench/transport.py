"""``aiflow bench transport``: aiflow's QUIC transport against plain TCP, TLS over TCP and gRPC, in one run.

All on loopback, client and server in this process (server threads), Python on both ends of every baseline:
- throughput (GB/s) of one request carrying a payload of 1 KiB, 64 KiB, 4 MiB, 64 MiB of fp32 bytes, answered by
  a small acknowledgement; one request at a time;
- round trip p50/p99 (microseconds) of a 4 KiB echo, and per round trip the CPU time of the whole process (client
  and server: microseconds) and the voluntary context switches of all its threads (Linux): both hold their value
  on a loaded machine, where the times do not;
- the ratios of aiflow to each baseline, and the issue's targets;
- QUIC through the link emulator (20 Mbit/s, 40 ms RTT, 0.1 % loss): goodput as a share of the shaped rate, and
  the time of one 4 MiB activation against the ideal (size / rate + RTT).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from aiflow_cli.bench import require_extra
from aiflow_cli.bench.common import JsonResult
from aiflow_cli.links import LinkProfile
from aiflow_cli.netem import LinkEmulator
from aiflow_cli.transport import Client, Identity, Limits, Message, Server

KiB, MiB = 1 << 10, 1 << 20
SIZES = {"1KiB": KiB, "64KiB": 64 * KiB, "4MiB": 4 * MiB, "64MiB": 64 * MiB}
RTT_BYTES = 4 * KiB
#: How long to measure each (transport, size) for, in seconds (after one warm-up request).
BUDGET_S = {False: 1.0, True: 0.25}
#: The shaped link of the emulated measurement.
NETEM_LINK = LinkProfile(
    name="bench-20mbit-40ms",
    source="issue 3's example link",
    uplink_mbps=20.0,
    downlink_mbps=20.0,
    rtt_ms=40.0,
    loss_pct=0.1,
    queue_ms=100.0,
)
_HDR = struct.Struct("<QB")  # payload length, echo flag


class Transport:
    """One way of moving a payload to a server and getting an answer back (echo, or a small ack)."""

    name = ""

    def roundtrip(self, payload: bytes, echo: bool) -> int:
        """Sends `payload`, waits for the answer, returns the answer's length."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Quic(Transport):
    name = "aiflow-quic"

    def __init__(self, ids: dict[str, Identity], address: str | None = None) -> None:
        def handler(msg: Message, peer) -> Message:
            return Message("echo", {}, list(msg.frames)) if msg.kind == "echo" else Message("ack")

        self.server = Server("127.0.0.1:0", identity=ids["server"], trust=[ids["client"]], handler=handler)
        self.client = Client(
            address or self.server.address, identity=ids["client"], trust=[ids["server"]], timeout_s=120
        )
        self.client.connect()

    def via(self, address: str, ids: dict[str, Identity]) -> Client:
        """A second client of the same server, reaching it through `address` (the emulator)."""
        return Client(address, identity=ids["client"], trust=[ids["server"]], timeout_s=120)

    def roundtrip(self, payload: bytes, echo: bool) -> int:
        reply = self.client.request(Message("echo" if echo else "ack", {}, [payload]))
        return sum(len(f) for f in reply.frames)

    def close(self) -> None:
        self.client.close()
        self.server.close()


def _recv_exact(sock, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


class _StreamServer:
    """A TCP (optionally TLS) server thread speaking length-prefixed payloads, for the baselines."""

    def __init__(self, wrap: Callable[[socket.socket], socket.socket] | None, max_bytes: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.wrap = wrap
        self.buf = bytearray(max_bytes)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.wrap is not None:
            conn = self.wrap(conn)
        view, hdr = memoryview(self.buf), bytearray(_HDR.size)
        with conn:
            try:
                while True:
                    _recv_exact(conn, memoryview(hdr))
                    n, echo = _HDR.unpack(hdr)
                    _recv_exact(conn, view[:n])
                    if echo:
                        conn.sendall(_HDR.pack(n, 0))
                        conn.sendall(view[:n])
                    else:
                        conn.sendall(_HDR.pack(0, 0))
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self.listener.close()


class Tcp(Transport):
    name = "tcp"

    def __init__(self, max_bytes: int, server_wrap=None, client_wrap=None) -> None:
        self.server = _StreamServer(server_wrap, max_bytes)
        sock = socket.create_connection(("127.0.0.1", self.server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = client_wrap(sock) if client_wrap else sock
        self.buf = bytearray(max_bytes)
        self.hdr = bytearray(_HDR.size)

    def roundtrip(self, payload: bytes, echo: bool) -> int:
        self.sock.sendall(_HDR.pack(len(payload), int(echo)))
        self.sock.sendall(payload)
        _recv_exact(self.sock, memoryview(self.hdr))
        n, _ = _HDR.unpack(self.hdr)
        _recv_exact(self.sock, memoryview(self.buf)[:n])
        return n

    def close(self) -> None:
        self.sock.close()
        self.server.close()


class Tls(Tcp):
    name = "tls-tcp"

    def __init__(self, max_bytes: int, ident: Identity) -> None:
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(str(ident.cert_path), str(ident.key_path))
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.load_verify_locations(str(ident.cert_path))
        cctx.check_hostname = False
        super().__init__(
            max_bytes,
            server_wrap=lambda s: sctx.wrap_socket(s, server_side=True),
            client_wrap=lambda s: cctx.wrap_socket(s),
        )


class Grpc(Transport):
    name = "grpc"

    def __init__(self, max_bytes: int) -> None:
        grpc = require_extra("grpc", "grpcio")

        opts = [("grpc.max_receive_message_length", max_bytes + MiB), ("grpc.max_send_message_length", max_bytes + MiB)]
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
            "Ack": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b""),
        }
        self.server = grpc.server(ThreadPoolExecutor(4), options=opts)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench", handlers),))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        self.echo = self.channel.unary_unary("/bench/Echo")
        self.ack = self.channel.unary_unary("/bench/Ack")

    def roundtrip(self, payload: bytes, echo: bool) -> int:
        return len((self.echo if echo else self.ack)(payload))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


@dataclass
class ThroughputRow:
    transport: str
    size: str
    payload_bytes: int
    requests: int
    gbps: float


@dataclass
class RttRow:
    transport: str
    payload_bytes: int
    samples: int
    p50_us: float
    p99_us: float
    cpu_us: float = 0.0
    #: voluntary context switches of the process's threads per round trip; None where /proc is not there
    switches: Optional[float] = None


@dataclass
class NetemResult:
    link: dict
    congestion: str
    goodput_mbps: float
    goodput_pct_of_rate: float
    transfer_bytes: int
    activation_bytes: int
    activation_s: float
    activation_ideal_s: float
    activation_vs_ideal: float
    transfer_queue_drops: int = 0
    path: dict = field(default_factory=dict)
    emulator: dict = field(default_factory=dict)


@dataclass
class TransportBenchResult(JsonResult):
    quick: bool
    cores: int
    congestion: str = ""
    """aiflow-quic's congestion controller (the default of :class:`Limits`)."""
    throughput: list[ThroughputRow] = field(default_factory=list)
    rtt: list[RttRow] = field(default_factory=list)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    netem: NetemResult | None = None
    quic_path: dict = field(default_factory=dict)
    """The loopback QUIC connection after the measurements: MTU found, congestion window, RTT, losses."""
    targets: dict[str, dict] = field(default_factory=dict)


def fp32_payload(n_bytes: int) -> bytes:
    return np.random.default_rng(0).standard_normal(n_bytes // 4, dtype=np.float32).tobytes()


def measure_throughput(t: Transport, payload: bytes, budget_s: float, min_requests: int = 3) -> tuple[int, float]:
    """(requests, GB/s) of one-way payload delivery, one request at a time, after a warm-up request."""
    t.roundtrip(payload, echo=False)
    n, t0 = 0, time.perf_counter()
    while n < min_requests or time.perf_counter() - t0 < budget_s:
        t.roundtrip(payload, echo=False)
        n += 1
    dt = time.perf_counter() - t0
    return n, len(payload) * n / dt / 1e9


def context_switches() -> Optional[int]:
    """Voluntary context switches of every thread of this process so far, ended threads included (getrusage;
    None where the platform has no ``resource`` module)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def measure_rtt(t: Transport, payload: bytes, samples: int) -> RttRow:
    """Round trips of an echo: p50 and p99 (microseconds), and per round trip the process's CPU time and
    context switches."""
    for _ in range(20):
        t.roundtrip(payload, echo=True)
    times = np.empty(samples)
    cpu0, sw0 = time.process_time(), context_switches()
    for i in range(samples):
        t0 = time.perf_counter_ns()
        assert t.roundtrip(payload, echo=True) == len(payload)
        times[i] = (time.perf_counter_ns() - t0) / 1e3
    cpu_us = (time.process_time() - cpu0) / samples * 1e6
    sw1 = context_switches()
    switches = (sw1 - sw0) / samples if sw0 is not None and sw1 is not None else None
    p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    return RttRow(t.name, len(payload), samples, p50, p99, cpu_us, switches)


def measure_netem(quic: Quic, ids: dict[str, Identity], quick: bool) -> NetemResult:
    """QUIC through the emulated link: goodput of a long transfer and the time of one 4 MiB activation."""
    link = NETEM_LINK
    act = fp32_payload(4 * MiB)
    transfer = fp32_payload((8 if quick else 24) * MiB)
    with LinkEmulator(forward=quic.server.address, link=link, seed=1) as emu:
        with quic.via(emu.address, ids) as cli:
            cli.connect()
            cli.request(Message("ack", {}, [bytes(64 * KiB)]))  # leave slow start before timing
            t0 = time.perf_counter()
            cli.request(Message("ack", {}, [act]))
            act_s = time.perf_counter() - t0
            drops_before = emu.stats()["uplink"]["queue_drops"]
            t0 = time.perf_counter()
            cli.request(Message("ack", {}, [transfer]))
            transfer_s = time.perf_counter() - t0
            path = cli.path_info() or {}
        stats = emu.stats()
    # One request/reply costs one RTT besides the bytes; goodput counts the payload over the rest.
    rtt_s = link.rtt_ms / 1e3
    goodput_mbps = len(transfer) * 8 / max(transfer_s - rtt_s, 1e-9) / 1e6
    ideal_s = len(act) * 8 / (link.uplink_mbps * 1e6) + rtt_s
    return NetemResult(
        link=link.model_dump(include={"uplink_mbps", "downlink_mbps", "rtt_ms", "loss_pct", "queue_ms"}),
        congestion=Limits().congestion,
        goodput_mbps=goodput_mbps,
        goodput_pct_of_rate=100 * goodput_mbps / link.uplink_mbps,
        transfer_bytes=len(transfer),
        activation_bytes=len(act),
        activation_s=act_s,
        activation_ideal_s=ideal_s,
        activation_vs_ideal=act_s / ideal_s,
        transfer_queue_drops=stats["uplink"]["queue_drops"] - drops_before,
        path=path,
        emulator=stats,
    )


def run(quick: bool = False, progress: Callable[[str], None] = lambda s: None) -> TransportBenchResult:
    """Runs the whole benchmark; ``quick`` shortens every measurement (well under a minute in all)."""
    require_extra("grpc", "grpcio")  # before minutes of measurements, not after
    res = TransportBenchResult(quick=quick, cores=os.cpu_count() or 1, congestion=Limits().congestion)
    budget = BUDGET_S[quick]
    max_bytes = max(SIZES.values())
    with tempfile.TemporaryDirectory(prefix="aiflow-bench-") as tmp:
        ids = {n: Identity.generate(Path(tmp) / n) for n in ("server", "client")}
        makers: dict[str, Callable[[], Transport]] = {
            Quic.name: lambda: Quic(ids),
            Tcp.name: lambda: Tcp(max_bytes),
            Tls.name: lambda: Tls(max_bytes, ids["server"]),
            Grpc.name: lambda: Grpc(max_bytes),
        }
        payloads = {name: fp32_payload(n) for name, n in SIZES.items()}
        rtt_payload = fp32_payload(RTT_BYTES)
        for tname, make in makers.items():
            t = make()
            try:
                for sname, payload in payloads.items():
                    progress(f"{tname} {sname}")
                    n, gbps = measure_throughput(t, payload, budget)
                    res.throughput.append(ThroughputRow(tname, sname, len(payload), n, gbps))
                progress(f"{tname} round trip")
                res.rtt.append(measure_rtt(t, rtt_payload, 300 if quick else 2000))
                if isinstance(t, Quic):
                    res.quic_path = t.client.path_info() or {}
                    progress("aiflow-quic through the link emulator")
                    res.netem = measure_netem(t, ids, quick)
            finally:
                t.close()
    _ratios_and_targets(res)
    return res


def _ratios_and_targets(res: TransportBenchResult) -> None:
    gb = {(r.transport, r.size): r.gbps for r in res.throughput}
    rtt = {r.transport: r for r in res.rtt}
    for base in (Tcp.name, Tls.name, Grpc.name):
        row = {f"throughput_{s}": gb[(Quic.name, s)] / gb[(base, s)] for s in SIZES}
        row["rtt_p50_speedup"] = rtt[base].p50_us / rtt[Quic.name].p50_us
        res.ratios[f"aiflow_vs_{base}"] = row
    big = "64MiB"
    res.targets = {
        "64MiB throughput >= 3x gRPC": {
            "measured_ratio": gb[(Quic.name, big)] / gb[(Grpc.name, big)],
            "met": gb[(Quic.name, big)] >= 3 * gb[(Grpc.name, big)],
        },
        "64MiB throughput >= 0.5x plain TCP": {
            "measured_ratio": gb[(Quic.name, big)] / gb[(Tcp.name, big)],
            "met": gb[(Quic.name, big)] >= 0.5 * gb[(Tcp.name, big)],
        },
        "4KiB round trip p50 <= 100 us": {"measured_us": rtt[Quic.name].p50_us, "met": rtt[Quic.name].p50_us <= 100},
    }
    if res.netem is not None:
        res.targets["goodput through 20 Mbit/s, 40 ms, 0.1% loss >= 90% of rate"] = {
            "measured_pct": res.netem.goodput_pct_of_rate,
            "met": res.netem.goodput_pct_of_rate >= 90,
        }
