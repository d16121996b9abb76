"""Generation sessions of one tier: a KV cache per request, isolated per peer, bounded in memory.

A session is created by a request's prefill and used by its decode steps; it ends with the request's last step,
or when the request fails: on the tier that saw the failure, and on the tiers behind it through an ``End``
message (aiflow_cli/runtime/protocol.py). When the caches together exceed ``limit_bytes``, the least recently used
*other* sessions are evicted; their next step fails with :class:`LimitExceeded` naming the limit. Sessions idle
longer than ``idle_s`` are dropped too (a device that vanished mid-generation does not pin memory forever).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from aiflow_cli.errors import LimitExceeded
from aiflow_cli.models.adapter import StageCache

SessionKey = tuple[str, int]  # (peer fingerprint, session id)


def cache_bytes(cache: StageCache) -> int:
    """Bytes held by a cache's tensors (KV of every layer, cross-attention included, and side tensors)."""
    plain = _dynamic_bytes(cache.kv)
    if plain is not None:
        return plain + sum(t.nbytes for t in cache.side.values())
    seen: set[int] = set()
    total = 0

    def walk(x: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 6 or id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, depth + 1)
        elif hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v, depth + 1)

    walk(cache.kv)
    walk(cache.side)
    return total


def _dynamic_bytes(kv: Any) -> Optional[int]:
    """:func:`cache_bytes` of a ``DynamicCache`` (or an ``EncoderDecoderCache`` of two) of plain ``DynamicLayer``s,
    the caches of every family that generates, without the generic walk (~100 us a call, paid per step on every
    tier); None for any other cache. (tests/test_runtime.py checks both give the same for each family.)"""
    caches = (kv.self_attention_cache, kv.cross_attention_cache) if type(kv) is EncoderDecoderCache else (kv,)
    total = 0
    for c in caches:
        if type(c) is not DynamicCache:
            return None
        for layer in c.layers:
            if type(layer) is not DynamicLayer:
                return None
            keys, values = layer.keys, layer.values
            if layer.is_initialized and keys is not None and values is not None:
                total += keys.nbytes + values.nbytes
    return total


@dataclass
class Session:
    cache: StageCache
    step_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # the driver's last decode input
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    busy: bool = False


class SessionStore:
    """Thread-safe map of live sessions; see the module docstring for the eviction rules."""

    def __init__(self, new_cache: Callable[[], StageCache], *, limit_bytes: int, idle_s: float = 300.0, tier: str = ""):
        self._new_cache = new_cache
        self.limit_bytes = limit_bytes
        self.idle_s = idle_s
        self.tier = tier
        self._sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self._evicted: OrderedDict[SessionKey, str] = OrderedDict()
        self._lock = threading.Lock()
        self._total = 0  # sum of the live sessions' nbytes, kept as they change (a step costs O(1), not O(sessions))

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total

    def open(self, key: SessionKey) -> Session:
        """A new session for a prefill (replacing a stale one with the same key)."""
        with self._lock:
            self._expire_idle()
            s = Session(self._new_cache(), busy=True)
            self._pop(key)
            self._sessions[key] = s
            self._sessions.move_to_end(key)
            self._evicted.pop(key, None)
            return s

    def get(self, key: SessionKey) -> Session:
        """The session of a decode step; :class:`LimitExceeded` if it was evicted or never opened."""
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                why = self._evicted.get(key)
                if why:
                    raise LimitExceeded(f"{self.tier}: session {key[1]} was evicted ({why})", param="cache_limit_bytes")
                raise LimitExceeded(
                    f"{self.tier}: no session {key[1]} (expired after {self.idle_s:.0f} s idle, or never opened)"
                )
            s.busy = True
            s.last_used = time.monotonic()
            self._sessions.move_to_end(key)
            return s

    def done_step(self, key: SessionKey, session: Session) -> None:
        """Accounts a session's memory after a step and evicts other sessions while over the limit."""
        nbytes = cache_bytes(session.cache) + sum(t.numel() * t.element_size() for t in session.step_inputs.values())
        with self._lock:
            if self._sessions.get(key) is session:  # still live (not evicted or replaced meanwhile)
                self._total += nbytes - session.nbytes
            session.nbytes, session.busy = nbytes, False
            session.last_used = time.monotonic()
            if nbytes > self.limit_bytes:
                self._drop(
                    key,
                    f"it alone needs {nbytes / 2**20:.1f} MiB, the {self.tier} cache limit is "
                    f"{self.limit_bytes / 2**20:.1f} MiB",
                )
                raise LimitExceeded(
                    f"{self.tier}: session {key[1]} needs {nbytes / 2**20:.1f} MiB of KV cache, more "
                    f"than the limit of {self.limit_bytes / 2**20:.1f} MiB (`cache_limit_bytes`)",
                    param="cache_limit_bytes",
                )
            if self._total <= self.limit_bytes:
                return
            for other in list(self._sessions):
                if self._total <= self.limit_bytes:
                    break
                victim = self._sessions[other]
                if other == key or victim.busy:
                    continue
                self._drop(
                    other,
                    f"the {self.tier} KV cache was full: {self.limit_bytes / 2**20:.1f} MiB (`cache_limit_bytes`)",
                )

    def close(self, key: SessionKey) -> bool:
        """Ends session ``key``; returns whether it was live."""
        with self._lock:
            return self._pop(key)

    def _pop(self, key: SessionKey) -> bool:
        s = self._sessions.pop(key, None)
        if s is not None:
            self._total -= s.nbytes
        return s is not None

    def _drop(self, key: SessionKey, why: str) -> None:
        self._pop(key)
        self._evicted[key] = why
        while len(self._evicted) > 4096:
            self._evicted.popitem(last=False)

    def _expire_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if not s.busy and now - s.last_used > self.idle_s]:
            self._drop(key, f"idle for more than {self.idle_s:.0f} s")
