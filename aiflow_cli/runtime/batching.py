"""Continuous batching of prefills and decode steps across sessions on one tier (``aiflow serve --batch-max``,
``--batch-window-ms``).

The transport calls a tier's handler on a thread per request, so the decode steps of concurrent sessions (different
devices) reach :meth:`TierNode.step` at the same time, each on its own thread. There they meet in a
:class:`DecodeBatcher`: a step that finds no batch running leads (it runs the batch on its own thread: the batcher
starts no thread of its own); steps that arrive while a batch runs queue up and are answered by the next batch,
whose leader is the oldest queued step (handed over by the previous leader). A batch takes up to ``max_batch``
queued steps of the same kind (decode steps, or prefills) and stage range, optionally after waiting ``window_ms``
for more to arrive, and runs them as one forward pass of the tier's stages (aiflow_cli/models/families/batched.py:
each session keeps its own KV cache; ragged pasts are left-padded, ragged prompts right-padded, and masked).
Sessions join and leave between steps: a session is in a batch only while one of its steps waits.

What stays one session per pass: speculative ``verify`` rounds, requests of several sequences, steps of families or
caches that do not batch (:func:`~aiflow_cli.models.families.batched.unbatchable`: sliding-window layers,
cross-attention, encoders) and tiers with an emulated speed (their stretch follows each thread's CPU time). A batch
that raises changed no cache (caches are updated only after every stage ran), so its steps run again one at a time:
a step that fails alone (a peer's malformed state, a cache that does not match its mask) gets its own error reply
and its session is closed by the node, while the other sessions of the batch get their results; the next steps
form a new batch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import StageCache
from aiflow_cli.models.families.batched import batched_pass, step_kind, unbatchable
from aiflow_cli.models.state import BoundaryState

#: Defaults of ``aiflow serve --batch-max`` and ``--batch-window-ms``.
DEFAULT_MAX_BATCH = 128
DEFAULT_WINDOW_MS = 0.0


@dataclass(frozen=True)
class BatchSettings:
    """``max_batch``: most sessions in one forward pass (1: batching off); ``window_ms``: how long a leader waits
    for more steps when fewer than ``max_batch`` are queued (0: take what is there: steps that arrived while the
    previous batch ran)."""

    max_batch: int = DEFAULT_MAX_BATCH
    window_ms: float = DEFAULT_WINDOW_MS

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise InputError(f"batch_max={self.max_batch}: must be in 1..4096 (1: no batching)", param="batch_max")
        if not 0 <= self.window_ms <= 1000:
            raise InputError(f"batch_window_ms={self.window_ms}: must be in 0..1000", param="batch_window_ms")

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


@dataclass(eq=False)
class _Step:
    kind: str
    stages: range
    state: BoundaryState
    cache: StageCache
    done: threading.Event = field(default_factory=threading.Event)  # set when answered or handed the lead
    lead: bool = False
    result: Optional[BoundaryState] = None
    error: Optional[BaseException] = None
    finished: bool = False


class DecodeBatcher:
    """Batches the decode steps of ``model`` (a :class:`~aiflow_cli.models.StagedModel`); see the module
    docstring. ``on_batch(size)`` is told the size of every forward pass it runs (the batch-size metric)."""

    def __init__(self, model: Any, settings: BatchSettings, on_batch: Callable[[int], None] = lambda n: None):
        self.model = model
        self.settings = settings
        self.on_batch = on_batch
        self._lock = threading.Lock()
        self._queue: list[_Step] = []
        self._leading = False
        self.passes = 0  # forward passes run, and the steps they carried (for tests and the bench)
        self.steps = 0
        self.largest = 0

    def run(self, stages: range, state: BoundaryState, cache: StageCache) -> BoundaryState:
        """Runs ``stages`` on one session's decode-step ``state`` with its ``cache``, batched with the steps of
        other sessions that are waiting at the same time; returns this session's output state."""
        kind = step_kind(state, cache) if unbatchable(self.model, cache) is None else None
        if kind is None:
            self._count(1)
            return self._solo(stages, state, cache)
        step = _Step(kind, stages, state, cache)
        with self._lock:
            self._queue.append(step)
            if not self._leading:
                self._leading = step.lead = True
        if not step.lead:
            step.done.wait()
            if not step.lead:
                return self._answer(step)
        self._lead(step)
        return self._answer(step)

    @staticmethod
    def _answer(step: _Step) -> BoundaryState:
        if step.error is not None:
            raise step.error
        assert step.result is not None
        return step.result

    def _solo(self, stages: range, state: BoundaryState, cache: StageCache) -> BoundaryState:
        for i in stages:
            state = self.model.run_stage(i, state, cache)
        return state

    def _lead(self, mine: _Step) -> None:
        """Runs batches until ``mine`` is answered, then hands the lead to the oldest queued step (or drops it)."""
        window_s = self.settings.window_ms / 1e3
        while True:
            if window_s > 0 and len(self._queue) < self.settings.max_batch:
                time.sleep(window_s)
            with self._lock:
                head = self._queue[0]
                same = [s for s in self._queue if s.stages == head.stages and s.kind == head.kind]
                batch = same[: self.settings.max_batch]
                taken = set(map(id, batch))
                self._queue = [s for s in self._queue if id(s) not in taken]
            self._run(batch)
            for s in batch:
                if s is not mine:
                    s.done.set()
            with self._lock:
                if not mine.finished:
                    continue  # (cannot happen: the leader's step is the oldest queued, so in the first batch)
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.done.set()
                else:
                    self._leading = False
                return

    def _run(self, batch: list[_Step]) -> None:
        """One forward pass for ``batch``; every step gets its result or the pass's error (never raises)."""
        try:
            self._count(len(batch))
            if len(batch) == 1:
                s = batch[0]
                outs = [self._solo(s.stages, s.state, s.cache)]
            else:
                states, caches = [s.state for s in batch], [s.cache for s in batch]
                outs = batched_pass(batch[0].kind, self.model, batch[0].stages, states, caches)
            for s, out in zip(batch, outs):
                s.result = out
        except BaseException as e:  # noqa: BLE001 - answered to its step(s), raised in their threads
            if len(batch) == 1:
                batch[0].error = e
            else:  # the pass changed no cache: each step again alone, so one bad step fails only its own request
                for s in batch:
                    try:
                        s.result = self._solo(s.stages, s.state, s.cache)
                    except Exception as solo:  # noqa: BLE001
                        s.error = solo
        for s in batch:
            s.finished = True

    def _count(self, n: int) -> None:
        with self._lock:
            self.passes += 1
            self.steps += n
            self.largest = max(self.largest, n)
        self.on_batch(n)
