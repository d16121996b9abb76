"""The QUIC tensor transport: authenticated request/reply messages between tiers.

The work is done in Rust (quinn + rustls, ``aiflow_cli._core``); this module gives it a small typed API.

- :class:`Identity`: a node's key and self-signed certificate; its ``fingerprint`` (SHA-256 of the DER
  certificate, hex) is what peers pin. ``aiflow keygen --out DIR`` makes one.
- :class:`Message`: ``kind`` (a short string), ``meta`` (a JSON-able dict, or ``bytes``: a binary header that only
  the application reads, as the tier protocol's hot-path messages are) and ``frames`` (opaque byte blobs, in
  practice codec frames from :mod:`aiflow_cli.codec`).
- :class:`Server`: listens on UDP, accepts only peers whose fingerprint it trusts (mutual TLS, ALPN ``aiflow/1``)
  and answers each message with a Python handler, called on a worker thread with the GIL held only while it runs.
- :class:`Client`: blocking :meth:`Client.request` (GIL released during I/O), thread-safe; many requests share
  one connection. A handler may itself use a :class:`Client` (edge forwarding to cloud).

Errors are the :mod:`aiflow_cli.errors` tree: :class:`PeerRejected` (untrusted identity, wrong ALPN),
:class:`Timeout`, :class:`LimitExceeded`, :class:`RemoteError` (the remote handler raised), :class:`TransportError`.
Received frames are read-only ``memoryview`` objects over bytes owned by the extension (no copy); pass them to
``codec.decode`` as they are, or ``bytes(f)`` to copy.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from aiflow_cli import _core

# What a peer may make an endpoint do (sizes in bytes, times in ms), e.g. ``Limits(max_message_bytes=1 << 20)``.
# Defined once, in Rust (``aiflow_proto::limits_fields!`` in rust_core/proto/src/limits.rs); ``help(Limits)``.
from aiflow_cli._core import Limits
from aiflow_cli.errors import InputError

ALPN: str = _core.ALPN
"""The ALPN protocol id both sides must speak."""

FrameLike = Union[bytes, bytearray, memoryview]

CERT_FILE = "node.crt"
KEY_FILE = "node.key"


@dataclass(frozen=True)
class Identity:
    """A node's certificate and key (PEM files) and the certificate's SHA-256 fingerprint (64 hex digits)."""

    cert_path: Path
    key_path: Path
    fingerprint: str

    @classmethod
    def generate(cls, directory: str | Path) -> "Identity":
        """Writes a new ECDSA P-256 key (``node.key``, mode 0600) and self-signed certificate (``node.crt``) into
        ``directory``, creating it. Refuses to overwrite an existing identity (:class:`InputError`)."""
        fp, cert, key = _core.generate_identity(str(directory))
        return cls(Path(cert), Path(key), fp)

    @classmethod
    def load(cls, directory: str | Path) -> "Identity":
        """Loads ``node.crt`` and ``node.key`` from ``directory`` (:class:`InputError` if missing or invalid)."""
        d = Path(directory)
        return cls.from_files(d / CERT_FILE, d / KEY_FILE)

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path) -> "Identity":
        """Loads a PEM certificate and PEM private key from two files."""
        fp = _core.identity_fingerprint(str(cert_path), str(key_path))
        return cls(Path(cert_path), Path(key_path), fp)


def as_identity(ident: Identity | str | Path) -> Identity:
    """An :class:`Identity`, or a directory holding one."""
    return ident if isinstance(ident, Identity) else Identity.load(ident)


def normalize_fingerprint(text: str) -> str:
    """``AB:CD:..``, ``sha256:abcd..`` or plain hex -> 64 lowercase hex digits (:class:`InputError` otherwise)."""
    return _core.normalize_fingerprint(text)


def _trust_list(trust: Iterable[str | Identity] | None) -> list[str]:
    return [t.fingerprint if isinstance(t, Identity) else str(t) for t in (trust or [])]


@dataclass
class Message:
    """One request or reply. ``meta`` is a JSON-serialisable dict or a binary header (``bytes``, sent as it is and
    received as ``bytes``); ``frames`` are byte blobs.

    ``session_id`` (u64) is the caller's to set and is echoed in the reply; ``request_id`` is assigned by the
    client and is informational.
    """

    kind: str
    meta: Union[dict[str, Any], bytes] = field(default_factory=dict)
    frames: list[FrameLike] = field(default_factory=list)
    session_id: int = 0
    request_id: int = 0


@dataclass(frozen=True)
class PeerInfo:
    """Who sent a request: UDP address, certificate fingerprint, and an id shared by requests of one connection."""

    address: str
    fingerprint: str
    connection_id: int


Handler = Callable[[Message, PeerInfo], Message]


def _meta_out(meta: Union[dict[str, Any], bytes]) -> Union[str, bytes]:
    """What the extension sends: JSON text for a dict, a binary header as it is."""
    if type(meta) is bytes:
        return meta
    if not isinstance(meta, dict):
        raise InputError(f"message meta must be a dict or bytes, got {type(meta).__name__}")
    return json.dumps(meta, separators=(",", ":")) if meta else ""


def _received(request_id: int, session_id: int, kind: str, meta: Union[str, bytes], frames: list) -> Message:
    body = (json.loads(meta) if meta else {}) if isinstance(meta, str) else meta
    return Message(kind, body, [memoryview(f) for f in frames], session_id, request_id)


class Server:
    """A transport server on ``listen`` (``host:port``; port 0 picks a free one, see :attr:`address`).

    ``handler(message, peer) -> reply`` runs on a worker thread, concurrently for concurrent requests; an
    exception it raises reaches the client as :class:`RemoteError` with ``"ExcType: message"``.
    ``trust``: fingerprints (or :class:`Identity` objects) of the clients to accept; required unless
    ``insecure_dev=True``, which accepts any client certificate (local experiments only).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        identity: Identity | str | Path,
        trust: Sequence[str | Identity] | None,
        handler: Handler,
        limits: Limits | None = None,
        insecure_dev: bool = False,
    ) -> None:
        ident = as_identity(identity)
        self._handler = handler

        def dispatch(request_id: int, session_id: int, kind: str, meta: Union[str, bytes], frames: list, peer: tuple):
            reply = handler(_received(request_id, session_id, kind, meta, frames), PeerInfo(*peer))
            if not isinstance(reply, Message):
                raise TypeError(f"the handler must return a Message, not {type(reply).__name__}")
            return reply.kind, _meta_out(reply.meta), reply.frames

        self._srv = _core.TransportServer(
            listen,
            str(ident.cert_path),
            str(ident.key_path),
            _trust_list(trust),
            dispatch,
            limits,
            insecure_dev,
        )
        self.identity = ident

    @property
    def address(self) -> str:
        """``host:port`` actually bound."""
        return self._srv.address

    def stats(self) -> dict[str, Any]:
        """Counters: connections (accepted/active/refused/timed out), failed handshakes and the last one's
        reason, requests ok/failed, protocol and limit errors, streams aborted by peers."""
        return dict(self._srv.stats())

    def peer_paths(self) -> list[dict[str, Any]]:
        """The open connections: per connection its peer's ``address`` and ``fingerprint`` plus the figures
        :meth:`Client.path_info` gives (``rtt_us``, ``cwnd_bytes``, ``lost_packets``, ...; quinn's statistics)."""
        return [dict(d) for d in self._srv.peer_paths()]

    def close(self) -> None:
        """Closes every connection and the socket. Idempotent."""
        self._srv.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A client of the server at ``server`` (``host:port``), authenticated with ``identity`` and accepting
    only a server whose fingerprint is in ``trust`` (unless ``insecure_dev=True``).

    Thread-safe: share one client between threads; requests run in parallel on one QUIC connection, which is
    opened on first use and reopened if it closed (e.g. by the idle timeout). ``timeout_s`` is the default
    deadline of one round trip (seconds).
    """

    def __init__(
        self,
        server: str,
        *,
        identity: Identity | str | Path,
        trust: Sequence[str | Identity] | None,
        limits: Limits | None = None,
        timeout_s: float = 30.0,
        insecure_dev: bool = False,
    ) -> None:
        ident = as_identity(identity)
        self._cli = _core.TransportClient(
            server, str(ident.cert_path), str(ident.key_path), _trust_list(trust), limits, insecure_dev
        )
        self.timeout_s = timeout_s
        self.identity = ident

    @property
    def server(self) -> str:
        return self._cli.server

    def connect(self) -> None:
        """Opens the connection now (the TLS handshake), so that the first request does not pay for it.
        Raises :class:`PeerRejected` if either side refuses the other."""
        self._cli.connect()

    def request(self, message: Message, timeout_s: float | None = None) -> Message:
        """Sends ``message`` and returns the reply (its frames are read-only memoryviews).

        Raises :class:`RemoteError` if the remote handler failed, :class:`LimitExceeded` if either side's limits
        refuse the message, :class:`Timeout` past ``timeout_s`` (default: the client's), :class:`PeerRejected`
        for an untrusted peer, :class:`TransportError` for other network failures. The exception's
        ``connection_id`` attribute names the connection the request used (None if none was open): pass it to
        :meth:`reset` to drop exactly that connection.
        """
        rid, sid, kind, meta, frames = self._cli.request(
            message.kind, _meta_out(message.meta), message.frames, message.session_id, timeout_s or self.timeout_s
        )
        return _received(rid, sid, kind, meta, frames)

    async def arequest(self, message: Message, timeout_s: float | None = None) -> Message:
        """:meth:`request` for asyncio code: runs on a worker thread, so the event loop keeps going."""
        return await asyncio.to_thread(self.request, message, timeout_s)

    @property
    def connection_id(self) -> int | None:
        """Id of the open connection (connections of one client are numbered 1, 2, ...), or None."""
        return self._cli.connection_id

    def reset(self, connection_id: int | None = None) -> bool:
        """Drops a connection at once, without waiting for the peer (unlike :meth:`close`); requests still on it
        fail, and the next request opens a new connection. Never blocks.

        ``connection_id`` names the connection to drop: pass the ``connection_id`` attribute of the
        :class:`TransportError` a request raised, so that a connection other threads have already replaced is
        left alone. ``None`` drops whichever connection is open. Returns whether a connection was dropped.
        """
        return self._cli.reset(connection_id)

    def reset_after(self, error: BaseException) -> bool:
        """Drops the connection on which ``error`` (raised by :meth:`request`) happened, if the client still uses
        it: ``reset(error.connection_id)``, and nothing when the request failed before a connection was open.
        Never blocks. Returns whether a connection was dropped."""
        connection_id = getattr(error, "connection_id", None)
        return connection_id is not None and self.reset(connection_id)

    def path_info(self) -> dict[str, int] | None:
        """Figures of the open connection's path, or None: ``rtt_us``, ``min_rtt_us``, ``cwnd_bytes``,
        ``mtu_bytes`` (largest UDP payload found by MTU discovery), ``sent_packets``, ``lost_packets``,
        ``congestion_events``, ``black_holes``, ``connection_id``."""
        info = self._cli.path_info()
        return None if info is None else dict(info)

    def close(self) -> None:
        """Closes the connection, waiting up to 0.5 s for the server to be told. The client reconnects if used
        again. After a failure, :meth:`reset` drops the connection without the wait."""
        self._cli.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "ALPN",
    "Client",
    "Handler",
    "Identity",
    "Limits",
    "Message",
    "PeerInfo",
    "Server",
    "as_identity",
    "normalize_fingerprint",
]
