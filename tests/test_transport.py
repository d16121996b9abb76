"""The QUIC transport end to end on loopback: codecs through the wire, concurrency, trust, limits, timeouts,
handler errors and edge->cloud forwarding."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import wait_until

from aiflow_cli import codec
from aiflow_cli.errors import InputError, LimitExceeded, PeerRejected, RemoteError, Timeout
from aiflow_cli.transport import Client, Identity, Limits, Message, PeerInfo, Server, normalize_fingerprint


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """Three identities: a server, a trusted client, and a stranger nobody trusts."""
    root = tmp_path_factory.mktemp("ids")
    return {name: Identity.generate(root / name) for name in ("server", "client", "stranger")}


def echo(msg: Message, peer: PeerInfo) -> Message:
    if msg.kind == "fail":
        raise ValueError(f"bad input {msg.meta.get('x')}")
    if msg.kind == "sleep":
        time.sleep(msg.meta["s"])
    return Message("re:" + msg.kind, {**msg.meta, "peer": peer.fingerprint}, list(msg.frames))


def serve(ids, handler=echo, limits=None) -> Server:
    return Server("127.0.0.1:0", identity=ids["server"], trust=[ids["client"]], handler=handler, limits=limits)


def client_of(srv: Server, ids, **kw) -> Client:
    return Client(srv.address, identity=ids["client"], trust=[ids["server"].fingerprint], **kw)


def test_identity_files_and_fingerprint(ids, tmp_path):
    ident = ids["server"]
    assert len(ident.fingerprint) == 64 and ident.cert_path.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert ident.key_path.stat().st_mode & 0o077 == 0, "the private key must be private"
    assert Identity.load(ident.cert_path.parent) == ident
    with pytest.raises(InputError):
        Identity.generate(ident.cert_path.parent)  # never overwrite
    with pytest.raises(InputError):
        Identity.load(tmp_path / "nothing")
    colons = ":".join(ident.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colons) == ident.fingerprint
    with pytest.raises(InputError):
        Server(identity=ident, trust=[], handler=echo)  # no implicit insecure mode


@pytest.mark.parametrize("spec", codec.default_codecs() + ["int4g64", "int8+zstd9"])
def test_every_codec_round_trips_through_the_transport(ids, spec):
    """Encode, send, decode on the server, send back, decode: both ends see exactly the encoded tensor."""
    seen = {}

    def handler(msg: Message, peer: PeerInfo) -> Message:
        t = codec.decode(msg.frames[0])
        seen["server"] = t
        return Message("decoded", {"shape": list(t.shape)}, [msg.frames[0], codec.encode(t, "raw")])

    torch.manual_seed(0)
    x = torch.randn(3, 197, 64)
    frame = codec.encode(x, spec)
    expected = codec.decode(frame)
    with serve(ids, handler) as srv, client_of(srv, ids) as cli:
        reply = cli.request(Message("tensor", {"codec": spec}, [frame]))
    assert reply.meta["shape"] == [3, 197, 64]
    assert bytes(reply.frames[0]) == frame
    assert torch.equal(codec.decode(reply.frames[0]), expected)
    assert torch.equal(codec.decode(reply.frames[1]), expected)
    assert torch.equal(seen["server"], expected)


def test_many_frames_empty_frames_and_large_message(ids):
    big = torch.arange(16 << 20, dtype=torch.uint8).numpy().tobytes()  # 16 MiB, spans many QUIC packets
    frames = [b"", b"x", big, b"", bytes(range(256))]
    with serve(ids) as srv, client_of(srv, ids) as cli:
        reply = cli.request(Message("k", {"n": 1}, frames, session_id=77))
    assert [bytes(f) for f in reply.frames] == frames
    assert reply.session_id == 77 and reply.kind == "re:k" and reply.meta["n"] == 1


def test_64_concurrent_clients_each_get_their_own_answers(ids):
    def handler(msg: Message, peer: PeerInfo) -> Message:
        data = bytes(msg.frames[0])
        return Message("ok", {"who": msg.meta["who"], "conn": peer.connection_id}, [data[::-1]])

    n_clients, per_client = 64, 4
    with serve(ids, handler) as srv:
        clients = [client_of(srv, ids) for _ in range(n_clients)]

        def work(i: int) -> list[int]:
            conns = []
            for j in range(per_client):
                payload = f"client {i} request {j} ".encode() * (1 + (i * 7 + j) % 50)
                reply = clients[i].request(Message("q", {"who": [i, j]}, [payload]), timeout_s=30)
                assert reply.meta["who"] == [i, j]
                assert bytes(reply.frames[0]) == payload[::-1]
                conns.append(reply.meta["conn"])
            return conns

        with ThreadPoolExecutor(n_clients) as pool:
            conns = list(pool.map(work, range(n_clients)))
        # a request is counted after its reply is on the wire: give the last ones a moment
        stats = wait_until(
            lambda: (st := srv.stats())["requests_ok"] >= n_clients * per_client and st, what="every request counted"
        )
        for c in clients:
            c.close()
    assert all(len(set(c)) == 1 for c in conns), "one connection per client"
    assert len({c[0] for c in conns}) == n_clients
    assert stats["requests_ok"] == n_clients * per_client
    assert stats["connections_accepted"] == n_clients


def test_one_client_shared_by_threads(ids):
    with serve(ids) as srv, client_of(srv, ids) as cli:

        def work(i: int) -> None:
            reply = cli.request(Message("t", {"i": i}, [bytes([i % 256]) * (i * 1000)]))
            assert reply.meta["i"] == i and bytes(reply.frames[0]) == bytes([i % 256]) * (i * 1000)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(work, range(100)))
        assert srv.stats()["connections_accepted"] == 1


def test_untrusted_client_is_refused_and_server_keeps_serving(ids):
    with serve(ids) as srv:
        stranger = Client(srv.address, identity=ids["stranger"], trust=[ids["server"]])
        with pytest.raises(PeerRejected, match="refused the TLS handshake"):
            stranger.request(Message("x"))
        with client_of(srv, ids) as good:
            assert good.request(Message("x")).kind == "re:x"
        stats = wait_until(
            lambda: (st := srv.stats())["handshakes_failed"] >= 1 and st["last_handshake_error"] and st,
            what="the failed handshake counted",
        )
    assert stats["handshakes_failed"] >= 1
    assert "not in the trusted fingerprints" in stats["last_handshake_error"]
    assert ids["stranger"].fingerprint in stats["last_handshake_error"]


def test_untrusted_server_is_refused_by_the_client(ids):
    with serve(ids) as srv:
        cli = Client(srv.address, identity=ids["client"], trust=[ids["stranger"]])
        with pytest.raises(PeerRejected, match="server certificate sha256:.* is not in the trusted"):
            cli.connect()


def test_insecure_dev_must_be_explicit(ids):
    with Server(identity=ids["server"], trust=None, handler=echo, insecure_dev=True) as srv:
        cli = Client(srv.address, identity=ids["stranger"], trust=None, insecure_dev=True)
        assert cli.request(Message("x")).kind == "re:x"
        with pytest.raises(InputError):
            Client(srv.address, identity=ids["stranger"], trust=None)


def test_oversized_and_too_many_frames_are_refused_while_serving_others(ids):
    limits = Limits(max_message_bytes=1 << 20, max_frames=4, max_meta_bytes=1000)
    with serve(ids, limits=limits) as srv, client_of(srv, ids) as cli, client_of(srv, ids) as other:
        with pytest.raises(LimitExceeded, match="max_message_bytes"):
            cli.request(Message("big", {}, [bytes(4 << 20)]))
        with pytest.raises(LimitExceeded, match="max_frames"):
            cli.request(Message("many", {}, [b"a"] * 5))
        with pytest.raises(LimitExceeded, match="max_meta_bytes"):
            cli.request(Message("meta", {"pad": "x" * 2000}))
        # The same connection and other clients go on being served.
        assert cli.request(Message("ok", {}, [bytes(1 << 20)])).kind == "re:ok"
        assert other.request(Message("ok")).kind == "re:ok"
        stats = srv.stats()
    assert stats["limit_errors"] == 3 and stats["connections_accepted"] == 2


def test_client_limits_refuse_before_sending(ids):
    with serve(ids) as srv, client_of(srv, ids, limits=Limits(max_message_bytes=1000)) as cli:
        with pytest.raises(LimitExceeded):
            cli.request(Message("big", {}, [bytes(2000)]))

        # A reply above the client's own limit is refused too.
        def big_reply(msg, peer):
            return Message("r", {}, [bytes(5000)])

    with serve(ids, big_reply) as srv, client_of(srv, ids, limits=Limits(max_message_bytes=1000)) as cli:
        with pytest.raises(LimitExceeded):
            cli.request(Message("q"))
        assert srv.stats()["connections_accepted"] == 1


def test_handler_exception_becomes_remote_error(ids):
    with serve(ids) as srv, client_of(srv, ids) as cli:
        with pytest.raises(RemoteError, match="ValueError: bad input 42"):
            cli.request(Message("fail", {"x": 42}))

        def wrong_type(msg, peer):
            return "not a message"

        assert cli.request(Message("fine")).kind == "re:fine"
    with serve(ids, wrong_type) as srv, client_of(srv, ids) as cli:
        with pytest.raises(RemoteError, match="must return a Message"):
            cli.request(Message("x"))


def test_request_timeout_and_concurrent_handlers(ids):
    with serve(ids) as srv, client_of(srv, ids) as cli:
        t0 = time.perf_counter()
        with pytest.raises(Timeout):
            cli.request(Message("sleep", {"s": 1.0}), timeout_s=0.2)
        assert time.perf_counter() - t0 < 0.8
        # Handlers run concurrently: 8 requests sleeping 0.3 s each take far less than 2.4 s.
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: cli.request(Message("sleep", {"s": 0.3})), range(8)))
        assert time.perf_counter() - t0 < 1.5
        # a timeout past what a Duration holds (~1.8e19 s) is a wait without a deadline, not a panic
        assert cli.request(Message("fine"), timeout_s=1e20).kind == "re:fine"
        for bad in (-1.0, float("inf"), float("nan")):
            with pytest.raises(InputError, match="timeout_s must be > 0"):
                cli.request(Message("fine"), timeout_s=bad)


def test_idle_timeout_closes_the_connection_and_the_client_reconnects(ids):
    # the client's keep-alives (a fifth of its own idle timeout: 6 s) come too late for the server's 300 ms
    with (
        serve(ids, limits=Limits(idle_timeout_ms=300)) as srv,
        client_of(srv, ids, limits=Limits(idle_timeout_ms=30_000)) as cli,
    ):
        assert cli.request(Message("a")).kind == "re:a"
        assert srv.stats()["connections_active"] == 1
        stats = wait_until(lambda: (st := srv.stats())["connections_active"] == 0 and st, what="the idle timeout")
        assert stats["connections_active"] == 0 and stats["connections_timed_out"] == 1
        assert cli.request(Message("b")).kind == "re:b"
        assert srv.stats()["connections_accepted"] == 2


def test_edge_handler_forwards_to_cloud(ids, tmp_path):
    """An edge server whose handler is itself a client of a cloud server: no deadlock, no nested runtime."""
    edge_id = Identity.generate(tmp_path / "edge")

    def cloud_handler(msg: Message, peer: PeerInfo) -> Message:
        t = codec.decode(msg.frames[0])
        return Message("logits", {"via": msg.meta["via"], "from": peer.fingerprint}, [codec.encode(t * 2, "raw")])

    with Server(identity=ids["server"], trust=[edge_id], handler=cloud_handler) as cloud:
        to_cloud = Client(cloud.address, identity=edge_id, trust=[ids["server"]])

        def edge_handler(msg: Message, peer: PeerInfo) -> Message:
            t = codec.decode(msg.frames[0]) + 1
            reply = to_cloud.request(Message("stage2", {"via": "edge"}, [codec.encode(t, "fp16")]))
            return Message("done", reply.meta, list(reply.frames))

        with Server(identity=edge_id, trust=[ids["client"]], handler=edge_handler) as edge:
            cli = Client(edge.address, identity=ids["client"], trust=[edge_id])

            def one(i: int) -> None:
                x = torch.full((4, 8), float(i))
                r = cli.request(Message("stage1", {}, [codec.encode(x, "raw")]))
                assert r.meta == {"via": "edge", "from": edge_id.fingerprint}
                assert torch.equal(codec.decode(r.frames[0]), (x + 1) * 2)

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(32)))
            cli.close()
        to_cloud.close()


def test_closed_server_gives_a_transport_error(ids):
    from aiflow_cli.errors import TransportError

    srv = serve(ids)
    cli = client_of(srv, ids, timeout_s=2)
    assert cli.request(Message("a")).kind == "re:a"
    srv.close()
    srv.close()  # idempotent
    with pytest.raises(TransportError):
        cli.request(Message("b"))


def test_asyncio_variant(ids):
    import asyncio

    async def main(cli: Client) -> list[str]:
        replies = await asyncio.gather(*(cli.arequest(Message(f"k{i}")) for i in range(5)))
        return [r.kind for r in replies]

    with serve(ids) as srv, client_of(srv, ids) as cli:
        assert asyncio.run(main(cli)) == [f"re:k{i}" for i in range(5)]


def test_handler_threads_do_not_hold_the_gil_while_waiting(ids):
    """A Python thread keeps running while a request is in flight (the GIL is released during I/O)."""
    ticks = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.005)

    with serve(ids) as srv, client_of(srv, ids) as cli:
        th = threading.Thread(target=ticker)
        th.start()
        cli.request(Message("sleep", {"s": 0.3}))
        stop.set()
        th.join()
    assert len(ticks) > 20


def test_reset_drops_the_failed_connection_without_waiting(ids):
    """reset(connection_id) fails the requests on that connection at once and never touches a newer one."""
    from aiflow_cli.errors import TransportError

    release = threading.Event()
    running = []

    def handler(msg: Message, peer: PeerInfo) -> Message:
        if msg.kind == "block":
            running.append(1)
            release.wait(10)  # released before the test ends: no handler may outlive the interpreter
            running.pop()
        return Message("re:" + msg.kind)

    with serve(ids, handler) as srv, client_of(srv, ids) as cli:
        try:
            assert cli.connection_id is None and cli.path_info() is None
            cli.request(Message("a"))
            first = cli.connection_id
            assert first is not None
            errors = []

            def blocked() -> None:
                try:
                    cli.request(Message("block"))
                except TransportError as e:
                    errors.append(e)

            th = threading.Thread(target=blocked)
            th.start()
            wait_until(lambda: running, what="the blocking handler to start")
            t0 = time.perf_counter()
            assert cli.reset(first)
            th.join(timeout=2)
            assert time.perf_counter() - t0 < 0.5, "reset must not wait for the handler or the peer"
            assert len(errors) == 1 and errors[0].connection_id == first
            assert not cli.reset_after(errors[0])  # already dropped
            # The next request reconnects; resetting the old connection again spares the new one.
            assert cli.request(Message("b")).kind == "re:b"
            second = cli.connection_id
            assert second != first
            assert not cli.reset(first)
            assert cli.connection_id == second and cli.request(Message("c")).kind == "re:c"
            # A timeout names its connection too, so the caller can drop it.
            with pytest.raises(Timeout) as exc:
                cli.request(Message("block"), timeout_s=0.1)
            assert exc.value.connection_id == second
            assert cli.reset_after(exc.value) and cli.connection_id is None
            assert not cli.reset_after(ValueError("not from a request"))
            cli.request(Message("d"))
            assert cli.reset()  # None: whichever connection is open
            assert cli.connection_id is None
        finally:
            release.set()
            wait_until(lambda: not running, what="the blocked handler to return")


def test_congestion_controllers_and_path_info(ids):
    payload = bytes(1 << 20)
    for cc in ("rate", "cubic", "newreno", "bbr"):
        lim = Limits(congestion=cc)
        with serve(ids, limits=lim) as srv, client_of(srv, ids, limits=lim) as cli:
            assert len(cli.request(Message("x", {}, [payload])).frames[0]) == len(payload)
            info = cli.path_info()
            assert info["connection_id"] == cli.connection_id and info["cwnd_bytes"] > 0 and info["rtt_us"] > 0
    with pytest.raises(InputError, match="congestion"):
        serve(ids, limits=Limits(congestion="vegas"))


def test_a_server_describes_the_paths_of_its_open_connections(ids):
    with serve(ids) as srv, client_of(srv, ids) as cli:
        assert srv.peer_paths() == []
        cli.request(Message("a"))
        (path,) = srv.peer_paths()
        assert path["fingerprint"] == ids["client"].fingerprint and path["address"].startswith("127.0.0.1:")
        assert path["rtt_us"] > 0 and path["sent_packets"] > 0 and path["cwnd_bytes"] > 0
        cli.close()
        wait_until(lambda: srv.peer_paths() == [], what="the closed connection to go")
