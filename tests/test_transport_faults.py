"""Issue 14: a server that cannot get a thread for a request's handler answers that request with an error and
keeps serving the others. The failure is injected with the test-only ``AIFLOW_TEST_FAIL_HANDLER_START=N`` (read
once when a server starts; rust_core/net/src/transport/server.rs): the server's Nth handler start fails exactly
as tokio's does when the OS refuses a thread (a panic, caught), on both ways a handler starts: on the I/O thread
(requests up to ``AIFLOW_INLINE_HANDLER_BYTES``, default 0) and on the blocking pool (larger ones)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from aiflow_cli.errors import LimitExceeded
from aiflow_cli.transport import Client, Identity, Message, PeerInfo, Server


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    return {name: Identity.generate(root / name) for name in ("server", "client", "other")}


def echo(msg: Message, peer: PeerInfo) -> Message:
    return Message("re:" + msg.kind, dict(msg.meta), list(msg.frames))


@pytest.mark.parametrize("inline_bytes", ["65536", None], ids=["inline-handler", "pool-handler"])
def test_a_handler_that_cannot_get_a_thread_gets_an_error_reply_and_the_server_keeps_serving(
    ids, monkeypatch, inline_bytes
):
    monkeypatch.setenv("AIFLOW_TEST_FAIL_HANDLER_START", "3")
    if inline_bytes is None:
        monkeypatch.delenv("AIFLOW_INLINE_HANDLER_BYTES", raising=False)
    else:
        monkeypatch.setenv("AIFLOW_INLINE_HANDLER_BYTES", inline_bytes)
    srv = Server("127.0.0.1:0", identity=ids["server"], trust=[ids["client"], ids["other"]], handler=echo)
    # read once at start: later changes do not matter
    monkeypatch.delenv("AIFLOW_TEST_FAIL_HANDLER_START")
    payload = bytes(range(256)) * 16
    with (
        srv,
        Client(srv.address, identity=ids["client"], trust=[ids["server"]]) as cli,
        Client(srv.address, identity=ids["other"], trust=[ids["server"]]) as other,
    ):
        for i in (1, 2):
            assert cli.request(Message("ping", {"i": i}, [payload])).meta == {"i": i}
        with pytest.raises(LimitExceeded, match="could not start the handler .*injected thread start failure"):
            cli.request(Message("ping", {"i": 3}, [payload]))
        # the same connection and another peer's are served afterwards, concurrently too
        reply = cli.request(Message("ping", {"i": 4}, [payload]))
        assert reply.meta == {"i": 4} and bytes(reply.frames[0]) == payload
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(lambda i: (cli if i % 2 else other).request(Message("ping", {"i": i}, [payload])), range(16))
            )
        assert [r.meta["i"] for r in replies] == list(range(16))
        stats = srv.stats()
    assert stats["handler_start_failures"] == 1
    assert stats["requests_failed"] == 1
    assert stats["requests_ok"] == 2 + 1 + 16


def test_large_requests_start_on_the_pool_and_fail_the_same_way(ids, monkeypatch):
    """A request above the inline threshold takes the blocking pool: the injected failure is answered there too."""
    monkeypatch.setenv("AIFLOW_TEST_FAIL_HANDLER_START", "1")
    monkeypatch.setenv("AIFLOW_INLINE_HANDLER_BYTES", "1024")  # 4 KiB requests: the pool; 1 byte: inline
    srv = Server("127.0.0.1:0", identity=ids["server"], trust=[ids["client"]], handler=echo)
    big = b"x" * 4096
    with srv, Client(srv.address, identity=ids["client"], trust=[ids["server"]]) as cli:
        with pytest.raises(LimitExceeded, match="could not start the handler"):
            cli.request(Message("big", {}, [big]))
        assert bytes(cli.request(Message("big", {}, [big])).frames[0]) == big
        assert cli.request(Message("small", {}, [b"y"])).kind == "re:small"
        assert srv.stats()["handler_start_failures"] == 1
