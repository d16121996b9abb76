"""Routing a tier's requests over a pool of replicas of the next tier, with failover (docs/scale.md).

:class:`PoolClient` stands where a :class:`aiflow_cli.transport.Client` stands in a :class:`TierNode` (``next``):
same ``request``/``reset_after``/``close``. It picks a replica per session by consistent hashing on the session
id (:class:`HashRing`) and pins the session there (its KV cache lives there). It keeps the requests it sent for
each live session (:class:`ReplayLog`: the stored inputs, as Petals' client does); when the replica stops
answering (the QUIC liveness notices a dead peer within seconds), it bans it, asks ``replicas()`` for a fresh
list, moves the session to the next replica on the ring, replays the stored requests there (rebuilding the
cache with the very computations that built it, so the output is identical) and resends the current one. The
caller sees a delay, not an error. Activations only travel over the mutual-TLS QUIC clients.

:class:`HashRing` and :class:`ReplayLog` do no I/O (tests/test_ray_pool.py tests them alone).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Callable, Iterator, Optional, Sequence, cast

from aiflow_cli.errors import InputError, LimitExceeded, PeerRejected, Timeout, TransportError
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.protocol import PREFILL, End, Infer, Result, Verify
from aiflow_cli.transport import Client, Identity, Limits, Message, as_identity

#: Points per replica on the ring: enough that sessions spread within a few percent of evenly.
VNODES = 64
#: Seconds a replica that failed a request is skipped for new sessions and failovers.
BAN_S = 30.0
#: Bytes of stored requests kept for failover, all sessions together (the least recently used go first).
DEFAULT_LOG_BYTES = 256 << 20
#: Seconds a session's stored requests outlive its last step (a generation that ended on EOS sends no last step).
LOG_IDLE_S = 300.0
#: Seconds between reloads of the replica list at new sessions (replicas the pool added since are then used).
REFRESH_S = 5.0


def _point(text: str) -> int:
    """A stable 64-bit hash (the same in every process and Python version, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing of session ids onto replica names: adding or removing a replica moves only the
    sessions of the ring's arcs it gains or loses (about 1/N of them)."""

    def __init__(self, nodes: Sequence[str] = (), vnodes: int = VNODES):
        if vnodes < 1:
            raise InputError(f"vnodes={vnodes}: must be >= 1", param="vnodes")
        self.vnodes = vnodes
        self._ring: tuple[tuple[str, ...], list[int], list[str]] = ((), [], [])
        self.set_nodes(nodes)

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._ring[0]

    def set_nodes(self, nodes: Sequence[str]) -> None:
        names = tuple(dict.fromkeys(nodes))
        pts = sorted((_point(f"{n}#{i}"), n) for n in names for i in range(self.vnodes))
        self._ring = (names, [p for p, _ in pts], [n for _, n in pts])  # one assignment: readers see old or new

    def walk(self, key: int) -> Iterator[str]:
        """Every replica once, in ring order from ``key``'s point: the first is its owner, then its fallbacks."""
        names, points, owners = self._ring
        if not points:
            return
        start = bisect.bisect_left(points, _point(f"session:{key}"))
        seen: set[str] = set()
        for i in range(len(points)):
            owner = owners[(start + i) % len(points)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(names):
                    return

    def pick(self, key: int, avoid: AbstractSet[str] | Sequence[str] = ()) -> Optional[str]:
        """The first replica on ``key``'s walk not in ``avoid`` (None if none is left)."""
        return next((n for n in self.walk(key) if n not in avoid), None)


@dataclass
class Sent:
    """One request as sent: the message (its deadline is refreshed on replay), its frames, the tokens it got."""

    msg: Infer | Verify
    frames: list[bytes]
    tokens: Optional[list] = None

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames) + 256


@dataclass
class SessionLog:
    replica: str
    sent: list[Sent] = field(default_factory=list)
    nbytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ReplayLog:
    """The requests sent for each live session and the replica it is pinned to; bounded by ``limit_bytes``
    (least recently used sessions first) and ``idle_s``. A session whose log was dropped is pinned no more:
    its next step goes where the ring says, and a failover cannot rebuild it (the error reaches the caller)."""

    def __init__(self, limit_bytes: int = DEFAULT_LOG_BYTES, idle_s: float = LOG_IDLE_S):
        self.limit_bytes = limit_bytes
        self.idle_s = idle_s
        self._logs: OrderedDict[int, SessionLog] = OrderedDict()
        self._total = 0
        self._scanned_at = time.monotonic()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._logs)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def sessions(self) -> dict[int, str]:
        """Each logged session's replica."""
        with self._lock:
            return {sid: log.replica for sid, log in self._logs.items()}

    def replica_of(self, sid: int) -> Optional[str]:
        with self._lock:
            log = self._logs.get(sid)
            return log.replica if log else None

    def history(self, sid: int) -> list[Sent]:
        """What to replay on a new replica before the current request (empty for a session not logged)."""
        with self._lock:
            log = self._logs.get(sid)
            return list(log.sent) if log else []

    def pin(self, sid: int, replica: str, *, new: bool) -> None:
        """Pins ``sid`` to ``replica``; ``new``: a prefill starts the session's log afresh."""
        with self._lock:
            log = self._logs.get(sid)
            if new or log is None:
                if log is not None:
                    self._total -= log.nbytes
                self._logs[sid] = SessionLog(replica)
            else:
                log.replica = replica
            self._logs.move_to_end(sid)

    def record(self, sid: int, sent: Sent, *, ended: bool) -> None:
        """Appends a request the replica answered; ``ended``: the session's last step (its log goes)."""
        with self._lock:
            now = time.monotonic()
            if now - self._scanned_at > min(1.0, self.idle_s):  # at most once a second: O(sessions)
                self._scanned_at = now
                for k in [k for k, s in self._logs.items() if k != sid and now - s.last_used > self.idle_s]:
                    self._pop(k)
            log = self._logs.get(sid)
            if log is None:
                return
            if ended:
                self._pop(sid)
                return
            log.sent.append(sent)
            log.nbytes += sent.nbytes
            self._total += sent.nbytes
            log.last_used = now
            self._logs.move_to_end(sid)
            while self._total > self.limit_bytes and self._logs:
                self._pop(next(iter(self._logs)))  # the least recently used

    def forget(self, sid: int) -> None:
        with self._lock:
            self._pop(sid)

    def _pop(self, sid: int) -> None:
        log = self._logs.pop(sid, None)
        if log is not None:
            self._total -= log.nbytes


def _fails_over(e: BaseException) -> bool:
    """Transport failures that mean 'this replica is gone', not 'this request is refused or late'."""
    return isinstance(e, TransportError) and not isinstance(e, (PeerRejected, Timeout, LimitExceeded))


#: A timeout this long before the request's own deadline is the transport's, not the request's (see _send).
_EARLY_S = 0.05


class PoolClient:
    """A client of a pool of replicas of the next tier; see the module docstring. ``replicas``: the replicas'
    addresses (a list, or a callable that returns the current list, e.g. :meth:`RayPool.addresses`); the rest
    as for :class:`Client`. ``on_failover(session_id, dead, new, replayed, seconds)`` is told of each move."""

    #: Batched steps (protocol.InferBatch) are not routed: their sessions live on different replicas, so a
    #: TierNode sends each session's step on its own through a pool.
    takes_batches = False

    def __init__(
        self,
        replicas: Sequence[str] | Callable[[], Sequence[str]],
        *,
        identity: Identity | str | Path,
        trust: Sequence[str | Identity],
        limits: Optional[Limits] = None,
        timeout_s: float = 30.0,
        insecure_dev: bool = False,
        log_limit_bytes: int = DEFAULT_LOG_BYTES,
        ban_s: float = BAN_S,
        on_failover: Optional[Callable[[int, str, str, int, float], None]] = None,
    ):
        self._provider = replicas if callable(replicas) else (lambda r=tuple(replicas): r)
        self._client_args = dict(
            identity=as_identity(identity), trust=list(trust), limits=limits, insecure_dev=insecure_dev
        )
        self.timeout_s = timeout_s
        self.ring = HashRing()
        self.log = ReplayLog(log_limit_bytes)
        self.ban_s = ban_s
        self.on_failover = on_failover
        self.failovers: list[dict] = []
        self._clients: dict[str, Client] = {}
        self._banned: dict[str, float] = {}
        self._lock = threading.Lock()
        self._refreshed_at = 0.0
        self.refresh()
        if not self.ring.nodes:
            raise InputError("the pool has no replica address (give HOST:PORT,HOST:PORT,...)")
        self._last = self.ring.nodes[0]

    @property
    def server(self) -> str:
        """The replica of the latest request (what a TierNode names in its errors)."""
        return self._last

    def refresh(self) -> tuple[str, ...]:
        """Reloads the replica list from the provider (e.g. from Ray, which knows which replicas live)."""
        nodes = [a.strip() for a in self._provider() if a and a.strip()]
        self._refreshed_at = time.monotonic()
        with self._lock:
            self.ring.set_nodes(nodes)
            for gone in set(self._clients) - set(nodes):
                self._clients.pop(gone).reset()
        return self.ring.nodes

    def _client(self, addr: str) -> Client:
        with self._lock:
            c = self._clients.get(addr)
            if c is None:
                c = self._clients[addr] = Client(addr, timeout_s=self.timeout_s, **self._client_args)  # type: ignore[arg-type]
            return c

    def _banned_now(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            for a in [a for a, t in self._banned.items() if t <= now]:
                del self._banned[a]
            return set(self._banned)

    def _ban(self, addr: str) -> None:
        with self._lock:
            self._banned[addr] = time.monotonic() + self.ban_s
            c = self._clients.pop(addr, None)
        if c is not None:
            c.reset()

    def request(self, env: Message, timeout_s: Optional[float] = None) -> Message:
        budget_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + budget_s
        msg = protocol.decode(env)
        sid = env.session_id
        if isinstance(msg, End):  # a failed request's end: for the replica that holds its session, if any
            replica = self.log.replica_of(sid)
            self.log.forget(sid)
            if replica is None:
                return protocol.encode(End(msg.plan_hash, msg.sender, 0.0))  # none holds it: nothing to end
            return self._send(replica, env, deadline)
        if not isinstance(msg, (Infer, Verify)):  # hello: any live replica answers for all (same plan, model)
            return self._any(sid, env, deadline, msg)
        new = isinstance(msg, Infer) and msg.phase == PREFILL
        if new and time.monotonic() - self._refreshed_at > REFRESH_S:
            self.refresh()
        replica = None if new else self.log.replica_of(sid)
        banned = self._banned_now()
        if replica is None or replica in banned or replica not in self.ring.nodes:
            moved_from = replica
            replica = self.ring.pick(sid, avoid=banned) or self._no_replica(sid, banned)
            if moved_from is not None and not new:  # its replica went away between steps: rebuild it there
                return self._failover(sid, env, msg, moved_from, deadline, None)
        self.log.pin(sid, replica, new=new)
        try:
            reply = self._send(replica, env, deadline)
        except Exception as e:
            if not _fails_over(e):
                raise
            self._ban(replica)
            return self._failover(sid, env, msg, replica, deadline, e)
        self._record(sid, env, msg, reply)
        return reply

    def _send(self, addr: str, env: Message, deadline: float) -> Message:
        """``env`` to replica ``addr`` within ``deadline``. A timeout before any connection opened and well before
        the deadline is a handshake nobody answered (no server listens there any more: a replica that is gone),
        raised as a plain TransportError so that the session fails over."""
        self._last = addr
        try:
            return self._client(addr).request(env, timeout_s=max(1e-3, deadline - time.monotonic()))
        except Timeout as e:
            if getattr(e, "connection_id", 0) is None and time.monotonic() < deadline - _EARLY_S:
                raise TransportError(str(e)) from None
            raise

    def _record(self, sid: int, env: Message, msg: Infer | Verify, reply: Message) -> None:
        ended = isinstance(msg, Infer) and msg.last
        tokens = None
        if not ended and reply.kind == Result.KIND:
            r = protocol.decode(reply)
            tokens = r.tokens if isinstance(r, Result) else None
        elif reply.kind != Result.KIND:
            ended = True  # an error reply ended the session on the replica: nothing to rebuild
        self.log.record(sid, Sent(msg, [bytes(f) for f in env.frames], tokens), ended=ended)

    def _no_replica(self, sid: int, banned: set[str]) -> str:
        nodes = self.refresh()
        left = [n for n in nodes if n not in banned]
        if not left:
            raise TransportError(
                f"no live replica in the pool for session {sid} (replicas: {', '.join(nodes) or 'none'}; "
                f"failed recently: {', '.join(sorted(banned)) or 'none'})"
            )
        return self.ring.pick(sid, avoid=banned) or left[0]

    def _any(self, sid: int, env: Message, deadline: float, msg: object) -> Message:
        last: Optional[BaseException] = None
        for addr in list(self.ring.walk(sid)):
            if addr in self._banned_now():
                continue
            try:
                return self._send(addr, env, deadline)
            except Exception as e:
                if isinstance(e, Timeout) and last is not None:
                    raise Timeout(f"no replica answered in time ({last}; then {e})") from None
                if not _fails_over(e):
                    raise
                self._ban(addr)
                last = e
        if last is not None:
            raise last
        return self._send(self._no_replica(sid, self._banned_now()), env, deadline)

    def _failover(
        self, sid: int, env: Message, msg: Infer | Verify, dead: str, deadline: float, error: Optional[BaseException]
    ) -> Message:
        """Moves session ``sid`` off ``dead``: replays its stored requests on the next live replica of its ring
        walk, then sends the current request there. Raises the original error when no replica is left or the
        session's history was not kept."""
        t0 = time.monotonic()
        history = self.log.history(sid)
        new = isinstance(msg, Infer) and msg.phase == PREFILL
        if not new and not history:
            if error is not None:
                raise error
            raise TransportError(
                f"session {sid}: its replica {dead} is gone and its inputs were not kept to rebuild it"
            )
        self.refresh()
        tried: set[str] = set()
        while True:
            avoid = self._banned_now() | tried | {dead}
            target = self.ring.pick(sid, avoid=avoid)
            if target is None:  # every replica failed or was tried: the last failure (or none left) is the answer
                if error is not None and _fails_over(error):
                    raise TransportError(
                        f"session {sid}: no live replica left in the pool (the last: {error})"
                    ) from None
                if error is not None:
                    raise error
                raise TransportError(
                    f"session {sid}: its replica {dead} is gone and no other live replica is left "
                    f"(replicas: {', '.join(self.ring.nodes) or 'none'})"
                )
            tried.add(target)
            if time.monotonic() >= deadline:  # no time left to rebuild the session anywhere
                if error is not None:
                    raise error
                raise Timeout(f"session {sid}: the deadline passed before it could move off {dead}")
            try:
                self._replay(sid, target, [] if new else history, deadline)
                self.log.pin(sid, target, new=new)
                reply = self._send(target, env, deadline)
            except Exception as e:
                if isinstance(e, Timeout) and not isinstance(error, Timeout | None):
                    raise Timeout(f"session {sid}: no replica answered in time ({error}; then {e})") from None
                if not _fails_over(e):
                    raise
                self._ban(target)
                error = e
                continue
            self._record(sid, env, msg, reply)
            took = time.monotonic() - t0
            self.failovers.append(
                {
                    "session": sid,
                    "from": dead,
                    "to": target,
                    "replayed": len(history),
                    "s": took,
                    "at": time.monotonic(),
                }
            )
            if self.on_failover is not None:
                self.on_failover(sid, dead, target, len(history), took)
            return reply

    def _replay(self, sid: int, target: str, history: list[Sent], deadline: float) -> None:
        for i, sent in enumerate(history):
            budget_s = deadline - time.monotonic()
            if budget_s <= 0:
                raise Timeout(f"session {sid}: the deadline passed while rebuilding its cache on {target}")
            again = dataclasses.replace(sent.msg, deadline_ms=budget_s * 1e3)
            reply = self._send(target, protocol.encode(again, sent.frames, sid), deadline)
            r = protocol.expect_reply(reply, Result)
            if sent.tokens is not None and r.tokens != sent.tokens:
                raise TransportError(
                    f"session {sid}: replaying step {i} on {target} gave other tokens than the first replica "
                    f"({r.tokens} vs {sent.tokens}); the replicas do not compute alike"
                )

    def reset_after(self, error: BaseException) -> bool:
        return False  # each replica's client is reset where its failure is handled

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()


def parse_replicas(next_addr: str) -> list[str]:
    """``HOST:PORT,HOST:PORT,...`` -> the list (an ``--next`` with a comma names a pool)."""
    out = [a.strip() for a in next_addr.split(",") if a.strip()]
    if not out:
        raise InputError(f"{next_addr!r} names no replica: give HOST:PORT or HOST:PORT,HOST:PORT,... (a pool)")
    return out


def connect(
    addr: str,
    *,
    identity: Identity | str | Path,
    trust: Sequence[str | Identity],
    limits: Optional[Limits] = None,
    timeout_s: float = 30.0,
    insecure_dev: bool = False,
) -> Client:
    """The client of a tier's next hop: a :class:`Client` of ``addr``, or a :class:`PoolClient` when ``addr``
    lists replicas (``HOST:PORT,HOST:PORT,...``); typed as :class:`Client`, whose methods a TierNode uses."""
    kw = dict(identity=identity, trust=trust, limits=limits, timeout_s=timeout_s, insecure_dev=insecure_dev)
    if "," in addr:
        return cast(Client, PoolClient(parse_replicas(addr), **kw))  # type: ignore[arg-type]
    return Client(addr, **kw)  # type: ignore[arg-type]
