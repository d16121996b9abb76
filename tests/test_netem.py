"""The userspace link emulator: it delivers the configured rate and RTT (within 10%), loses what it should,
drops at a full queue, relays several clients, and carries the QUIC transport."""

from __future__ import annotations

import socket
import statistics
import threading
import time

import pytest
from conftest import settled, wait_until

from aiflow_cli.errors import InputError
from aiflow_cli.links import LinkProfile
from aiflow_cli.netem import WIRE_OVERHEAD_BYTES, LinkEmulator


def link(**kw) -> LinkProfile:
    base = dict(name="test", source="test", uplink_mbps=20.0, downlink_mbps=40.0, rtt_ms=40.0, queue_ms=1000.0)
    return LinkProfile(**{**base, **kw})


class UdpPeer:
    """A UDP server thread on loopback: echoes each datagram, or on b"burst N SIZE" sends N datagrams back."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.arrivals: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            self.arrivals.append((time.perf_counter(), len(data)))
            if data.startswith(b"burst"):
                _, n, size = data.split()
                paced_send(self.sock, addr, int(n), int(size))
            elif data.startswith(b"ping"):
                self.sock.sendto(data, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def paced_send(sock: socket.socket, addr, n: int, size: int, burst: int = 16, pause_s: float = 0.002) -> None:
    """Sends faster than the emulated link (so it is the bottleneck) but slowly enough for the relay's socket."""
    payload = bytes(size)
    for i in range(n):
        sock.sendto(payload, addr)
        if i % burst == burst - 1:
            time.sleep(pause_s)


def addr_of(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host, int(port)


def rate_mbps(arrivals: list[tuple[float, int]]) -> float:
    """Payload rate from the first to the last arrival (the first datagram's bytes are not counted)."""
    t0, t1 = arrivals[0][0], arrivals[-1][0]
    return sum(n for _, n in arrivals[1:]) * 8 / (t1 - t0) / 1e6


@pytest.fixture
def peer():
    p = UdpPeer()
    yield p
    p.close()


def client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(2.0)
    return s


def test_rtt_within_10_percent(peer):
    with LinkEmulator(forward=peer.address, link=link()) as emu, client_socket() as s:
        rtts = []
        for i in range(15):
            t0 = time.perf_counter()
            s.sendto(b"ping %d" % i, addr_of(emu.address))
            assert s.recv(100) == b"ping %d" % i
            rtts.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.005)
    median = statistics.median(rtts)
    assert abs(median - 40.0) <= 4.0, f"median RTT {median:.1f} ms, expected 40 ms; all: {rtts}"


def test_uplink_rate_within_10_percent(peer):
    size, n = 1400, 500
    with LinkEmulator(forward=peer.address, link=link()) as emu, client_socket() as s:
        paced_send(s, addr_of(emu.address), n, size)
        wait_until(lambda: len(peer.arrivals) >= n, what=f"{n} datagrams through a 20 Mbit/s link")
        stats = emu.stats()
    assert len(peer.arrivals) == n, stats
    expected = 20.0 * size / (size + WIRE_OVERHEAD_BYTES)
    got = rate_mbps(peer.arrivals)
    assert abs(got - expected) / expected <= 0.10, (
        f"uplink delivered {got:.2f} Mbit/s of payload, expected {expected:.2f}"
    )
    assert stats["uplink"]["packets_out"] == n and stats["uplink"]["bytes_out"] == n * size


def test_downlink_rate_within_10_percent(peer):
    size, n = 1400, 800
    with LinkEmulator(forward=peer.address, link=link()) as emu, client_socket() as s:
        s.sendto(b"burst %d %d" % (n, size), addr_of(emu.address))
        arrivals = []
        try:
            while len(arrivals) < n:
                data = s.recv(65536)
                arrivals.append((time.perf_counter(), len(data)))
        except socket.timeout:
            pass
    assert len(arrivals) == n
    expected = 40.0 * size / (size + WIRE_OVERHEAD_BYTES)
    got = rate_mbps(arrivals)
    assert abs(got - expected) / expected <= 0.10, (
        f"downlink delivered {got:.2f} Mbit/s of payload, expected {expected:.2f}"
    )


def test_random_loss(peer):
    n = 1000
    with LinkEmulator(forward=peer.address, link=link(loss_pct=10.0, rtt_ms=2.0), seed=3) as emu, client_socket() as s:
        paced_send(s, addr_of(emu.address), n, 100)

        def delivered() -> dict | None:  # every datagram the relay read is lost or at the peer
            st = emu.stats()["uplink"]
            return st if st["packets_in"] == n and st["lost"] + len(peer.arrivals) == n else None

        stats = wait_until(delivered, what="the relay to deliver or lose every datagram")
    received = len(peer.arrivals)
    assert 850 <= received <= 950, received
    assert stats["lost"] == n - received and stats["packets_in"] == n


def test_drop_tail_queue_and_mtu(peer):
    # 10 ms of queue at 8 Mbit/s holds 10 kB: a fast burst of 100 kB mostly overflows it.
    with (
        LinkEmulator(forward=peer.address, link=link(uplink_mbps=8.0, queue_ms=10.0, rtt_ms=2.0)) as emu,
        client_socket() as s,
    ):
        # The oversized one goes first: the kernel may drop the tail of the burst before the relay reads it.
        s.sendto(bytes(2000), addr_of(emu.address))  # above the 1472-byte datagram limit
        for _ in range(100):
            s.sendto(bytes(972), addr_of(emu.address))
        # how many the kernel passes on is unknown: wait until the relay and the peer stop counting
        wait_until(
            settled(lambda: (emu.stats()["uplink"], len(peer.arrivals)), quiet_s=0.25), what="the burst to drain"
        )
        stats = emu.stats()["uplink"]
    received = len(peer.arrivals)
    assert 10 <= received < 60, received
    # The kernel may drop some of the burst before the relay reads it; of what the relay saw, all but the
    # queue's worth (and the oversized one) is dropped by the queue.
    assert stats["too_big"] == 1
    assert stats["queue_drops"] == stats["packets_in"] - 1 - received


def test_each_client_gets_its_own_replies(peer):
    with LinkEmulator(forward=peer.address, link=link(rtt_ms=4.0)) as emu:
        socks = [client_socket() for _ in range(5)]
        for i, s in enumerate(socks):
            s.sendto(b"ping from %d" % i, addr_of(emu.address))
        for i, s in enumerate(socks):
            assert s.recv(100) == b"ping from %d" % i
            s.close()
        assert emu.stats()["flows"] == 5


def test_profiles_by_name_and_bad_input(peer):
    with LinkEmulator(forward=peer.address, link="lte") as emu:
        assert emu.link.name == "lte" and emu.address.startswith("127.0.0.1:")
    with pytest.raises(InputError):
        LinkEmulator(forward="nowhere", link=link())
    emu = LinkEmulator(forward=peer.address, link=link())
    emu.close()
    emu.close()  # idempotent


def test_quic_through_the_emulator(tmp_path):
    """The transport works over a lossy, slow link (QUIC recovers the losses)."""
    from aiflow_cli.transport import Client, Identity, Message, Server

    s_id, c_id = Identity.generate(tmp_path / "s"), Identity.generate(tmp_path / "c")
    payload = bytes(range(256)) * 2048  # 512 KiB
    with Server(identity=s_id, trust=[c_id], handler=lambda m, p: Message("ok", {"n": len(m.frames[0])})) as srv:
        with LinkEmulator(forward=srv.address, link=link(uplink_mbps=50.0, loss_pct=1.0, rtt_ms=20.0), seed=1) as emu:
            with Client(emu.address, identity=c_id, trust=[s_id], timeout_s=20) as cli:
                assert cli.request(Message("up", {}, [payload])).meta == {"n": len(payload)}
            stats = emu.stats()
    assert stats["uplink"]["lost"] > 0 and stats["uplink"]["bytes_out"] > len(payload)


def test_quic_finds_a_1472_byte_path_mtu(tmp_path):
    """On a loopback address the client probes for 64 KiB datagrams; behind the emulator (a 1500-byte MTU)
    the probes are lost, MTU discovery settles at or below 1472 bytes, and no black hole is declared."""
    from aiflow_cli.transport import Client, Identity, Message, Server

    s_id, c_id = Identity.generate(tmp_path / "s"), Identity.generate(tmp_path / "c")
    payload = bytes(4 << 20)
    with Server(identity=s_id, trust=[c_id], handler=lambda m, p: Message("ok", {"n": len(m.frames[0])})) as srv:
        with Client(srv.address, identity=c_id, trust=[s_id], timeout_s=20) as direct:
            for _ in range(3):
                direct.request(Message("up", {}, [payload]))
            assert direct.path_info()["mtu_bytes"] > 16_000  # loopback carries 64 KiB datagrams
        with LinkEmulator(
            forward=srv.address, link=link(uplink_mbps=200.0, downlink_mbps=200.0, rtt_ms=2.0), seed=1
        ) as emu:
            with Client(emu.address, identity=c_id, trust=[s_id], timeout_s=20) as cli:
                for _ in range(3):
                    assert cli.request(Message("up", {}, [payload])).meta == {"n": len(payload)}
                info = cli.path_info()
            stats = emu.stats()
    assert 1200 < info["mtu_bytes"] <= 1472 and info["black_holes"] == 0, info
    assert stats["uplink"]["too_big"] > 0  # the probes did go out


def test_rate_controller_keeps_a_lossy_link_busy(tmp_path):
    """The default delivery-rate controller keeps a link with 0.1 % random loss busy (random losses do not shrink
    its window) without overflowing the bottleneck's queue (CUBIC here fills it and drops ~60 datagrams).
    The emulator is a userspace thread: on a loaded 2-core machine it can stall and release a burst that its own
    queue drops (53 drops seen once in CI beside other tests, 0-5 on a quiet machine), so a second try is
    allowed; the controller must pass on one of two."""
    from aiflow_cli.transport import Client, Identity, Limits, Message, Server

    s_id, c_id = Identity.generate(tmp_path / "s"), Identity.generate(tmp_path / "c")
    lk = link(uplink_mbps=50.0, downlink_mbps=50.0, rtt_ms=20.0, loss_pct=0.1, queue_ms=50.0)
    assert Limits().congestion == "rate"
    payload = bytes(8 << 20)
    tries = []
    for attempt in range(2):
        with Server(identity=s_id, trust=[c_id], handler=lambda m, p: Message("ok")) as srv:
            with LinkEmulator(forward=srv.address, link=lk, seed=3 + attempt) as emu:
                with Client(emu.address, identity=c_id, trust=[s_id], timeout_s=30) as cli:
                    cli.request(Message("warm-up", {}, [bytes(2 << 20)]))  # leave startup
                    before = emu.stats()["uplink"]
                    t0 = time.perf_counter()
                    cli.request(Message("up", {}, [payload]))
                    elapsed = time.perf_counter() - t0
                after = emu.stats()["uplink"]
        goodput_mbps = len(payload) * 8 / (elapsed - lk.rtt_ms / 1e3) / 1e6
        drops = after["queue_drops"] - before["queue_drops"]
        tries.append((round(goodput_mbps, 1), drops))
        if goodput_mbps > 0.8 * lk.uplink_mbps and drops < 20:
            return
    raise AssertionError(f"(goodput Mbit/s, queue drops) per try: {tries}; want > {0.8 * lk.uplink_mbps} and < 20")
