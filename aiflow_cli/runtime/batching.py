"""Continuous batching of prefills and decode steps across sessions on one tier (``aiflow serve --batch-max``,
``--batch-window-ms``).

The transport calls a tier's handler on a thread per request, so the decode steps of concurrent sessions (different
devices) reach :meth:`TierNode.step` at the same time, each on its own thread. There they meet in a
:class:`DecodeBatcher`: a step that finds no batch running leads (it runs the batch on its own thread: the batcher
starts no thread of its own); steps that arrive while a batch runs queue up and are answered by the next batch,
whose leader is the oldest queued step (handed over by the previous leader). A batch takes up to ``max_batch``
queued steps of the same kind (decode steps, or prefills) and stage range, optionally after waiting ``window_ms``
for more to arrive (a decode step waits only while another session of the tier has no step queued: a lone
session's steps never wait), and runs them as one forward pass of the tier's stages
(aiflow_cli/models/families/batched.py: each session keeps its own KV cache; ragged pasts are left-padded, ragged
prompts right-padded, and masked). A step's stages build their attention mask once per pass, as a solo run does.
Sessions join and leave between steps: a session is in a batch only while one of its steps waits.

What stays one session per pass: speculative ``verify`` rounds, requests of several sequences, steps of families or
caches that do not batch (:func:`~aiflow_cli.models.families.batched.unbatchable`: sliding-window layers,
cross-attention, encoders) and tiers with an emulated speed (their stretch follows each thread's CPU time). A batch
that raises changed no cache (caches are updated only after every stage ran), so its steps run again one at a time:
a step that fails alone (a peer's malformed state, a cache that does not match its mask) gets its own error reply
and its session is closed by the node, while the other sessions of the batch get their results; the next steps
form a new batch.

The batched hop: the sessions of one pass also cross the link to the next tier together. A tier that forwards
gives its batcher a ``hop`` (the node's sender of one :class:`~aiflow_cli.runtime.protocol.InferBatch`); every
session of a pass of several then gets a :class:`HopSeat` in one :class:`HopGroup`, and its thread, after encoding
its step, hands it to the group instead of sending it alone: the last of the pass's sessions to arrive sends one
message for all of them, and each thread gets its own session's result (or error) back. A thread that fails before
it reaches the link leaves the group, so the others never wait for it. The receiving tier runs the steps of such a
message at once (:meth:`DecodeBatcher.run_many`: they arrived together, no window to wait).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from aiflow_cli.errors import InputError, Timeout
from aiflow_cli.models.adapter import StageCache
from aiflow_cli.models.families.batched import batched_pass, step_kind, unbatchable
from aiflow_cli.models.stage_setup import shared_setup
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


@dataclass
class HopItem:
    """One session's step for the next tier: its transport session id, the request (an ``Infer``), its frames and
    what is left of its deadline (s)."""

    session_id: int
    request: Any
    frames: list
    budget_s: float


def hop_chunks(items: list[HopItem], max_sessions: int, max_frames: int, max_bytes: int) -> list[list[HopItem]]:
    """``items`` in order, cut into messages of at most ``max_sessions`` items, ``max_frames`` frames and
    ``max_bytes`` frame bytes each (an item over a limit alone goes alone), no session id twice in one (a peer
    that reuses its id fails its own steps only: the next tier refuses a message that repeats one)."""
    chunks: list[list[HopItem]] = [[]]
    frames = nbytes = 0
    ids: set[int] = set()
    for it in items:
        f, b = len(it.frames), sum(len(x) for x in it.frames)
        full = len(chunks[-1]) >= max_sessions or frames + f > max_frames or nbytes + b > max_bytes
        if chunks[-1] and (full or it.session_id in ids):
            chunks.append([])
            frames = nbytes = 0
            ids = set()
        chunks[-1].append(it)
        frames, nbytes = frames + f, nbytes + b
        ids.add(it.session_id)
    return chunks if chunks[-1] else []


#: What a hop sender answers per item: (the Result, its frames, whether this item's thread counts the message
#: sent: exactly one item per message does, so the link's message count sums to the messages sent) or an error.
HopAnswer = Any
HopSender = Callable[[list[HopItem]], list[HopAnswer]]


class HopGroup:
    """The forwards of one pass's ``size`` sessions as one message (see the module docstring)."""

    def __init__(self, size: int, send: HopSender):
        self._send_fn = send
        self._lock = threading.Lock()
        self._waiting = size  # seats that have neither sent nor left
        self._items: list[HopItem] = []
        self._answers: list[HopAnswer] = []
        self._done = threading.Event()

    def _arrive(self, item: Optional[HopItem]) -> tuple[int, bool]:
        with self._lock:
            at = len(self._items)
            if item is not None:
                self._items.append(item)
            self._waiting -= 1
            return at, self._waiting == 0

    def _send(self) -> None:
        try:
            self._answers = self._send_fn(self._items) if self._items else []
        except BaseException as e:  # noqa: BLE001 - the whole message failed: every session gets the error
            self._answers = [e] * len(self._items)
        finally:
            self._done.set()

    def request(self, item: HopItem) -> HopAnswer:
        at, last = self._arrive(item)
        if last:
            self._send()
        elif not self._done.wait(min(item.budget_s, threading.TIMEOUT_MAX)):  # (a larger wait: OverflowError)
            raise Timeout("the batched step to the next tier did not come back within the request's deadline")
        answer = self._answers[at]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def leave(self) -> None:
        if self._arrive(None)[1]:
            self._send()


class HopSeat:
    """One session's place in a :class:`HopGroup`: :meth:`request` once, or :meth:`leave` (no-op after either)."""

    def __init__(self, group: HopGroup):
        self.group, self.used = group, False

    def request(self, item: HopItem) -> HopAnswer:
        self.used = True
        return self.group.request(item)

    def leave(self) -> None:
        if not self.used:
            self.used = True
            self.group.leave()


@dataclass(eq=False)
class _Step:
    kind: Optional[str]
    stages: range
    state: BoundaryState
    cache: StageCache
    # set when answered or handed the lead (the queued steps of run(); run_many's are answered on their thread)
    done: Optional[threading.Event] = None
    lead: bool = False
    result: Optional[BoundaryState] = None
    error: Optional[BaseException] = None
    finished: bool = False
    seat: Optional[HopSeat] = None


class DecodeBatcher:
    """Batches the decode steps of ``model`` (a :class:`~aiflow_cli.models.StagedModel`); see the module
    docstring. ``on_batch(size)`` is told the size of every forward pass it runs (the batch-size metric);
    ``hop``: the node's sender of batched steps (None: each session's step is sent on alone); ``live()``: how many
    sessions the tier holds (a decode step waits ``window_ms`` only while one of them has no step queued: with one
    session, or all of them queued, no decode step can come to join; None: it always waits)."""

    def __init__(
        self,
        model: Any,
        settings: BatchSettings,
        on_batch: Callable[[int], None] = lambda n: None,
        hop: Optional[HopSender] = None,
        live: Optional[Callable[[], int]] = None,
    ):
        self.model = model
        self.settings = settings
        self.on_batch = on_batch
        self.hop = hop
        self.live = live
        self._seat = threading.local()
        self._lock = threading.Lock()
        self._queue: list[_Step] = []
        self._leading = False
        self.passes = 0  # forward passes run, and the steps they carried (for tests and the bench)
        self.steps = 0
        self.largest = 0

    def run(self, stages: range, state: BoundaryState, cache: StageCache) -> BoundaryState:
        """Runs ``stages`` on one session's decode-step ``state`` with its ``cache``, batched with the steps of
        other sessions that are waiting at the same time; returns this session's output state."""
        self._seat.seat = None
        kind = step_kind(state, cache) if unbatchable(self.model, cache) is None else None
        if kind is None:
            self._count(1)
            return self._solo(stages, state, cache)
        step = _Step(kind, stages, state, cache)
        with self._lock:
            if self._leading:
                step.done = threading.Event()  # (the leader's step needs none: a lone step makes no event)
            else:
                self._leading = step.lead = True
            self._queue.append(step)
        if not step.lead:
            step.done.wait()  # type: ignore[union-attr]  # a queued step has its event
            if not step.lead:
                return self._answer(step)
        self._lead(step)
        return self._answer(step)

    def run_many(self, steps: list[tuple[range, BoundaryState, StageCache]]) -> list[Any]:
        """Runs the steps of several sessions that arrived together (a batched message) on this thread, as few
        passes as their kinds and stage ranges allow (at most ``max_batch`` sessions each); returns each step's
        output state, or the exception that step alone failed with."""
        todo = [_Step(None, stages, st, c) for stages, st, c in steps]
        groups: dict[Any, list[_Step]] = {}
        for s in todo:
            try:  # a peer's state of the wrong shape fails its own step only
                s.kind = step_kind(s.state, s.cache) if unbatchable(self.model, s.cache) is None else None
            except Exception as e:  # noqa: BLE001
                s.error = e
                continue
            groups.setdefault((s.stages.start, s.stages.stop, s.kind or id(s)), []).append(s)
        for group in groups.values():
            for at in range(0, len(group), self.settings.max_batch):
                self._run(group[at : at + self.settings.max_batch], hop=False)
        return [s.error if s.error is not None else s.result for s in todo]

    def take_seat(self) -> Optional[HopSeat]:
        """This thread's seat in the hop group of its last pass (once; None when its step goes on alone)."""
        seat = getattr(self._seat, "seat", None)
        self._seat.seat = None
        return seat

    def _answer(self, step: _Step) -> BoundaryState:
        self._seat.seat = step.seat
        if step.error is not None:
            raise step.error
        assert step.result is not None
        return step.result

    def _solo(self, stages: range, state: BoundaryState, cache: StageCache) -> BoundaryState:
        with shared_setup():  # its blocks build the attention mask once (a pass of run_many is in none)
            for i in stages:
                state = self.model.run_stage(i, state, cache)
        return state

    def _others_may_come(self) -> bool:
        """Whether a step could still join the head of the queue's batch within the window: always for prefills
        (any new session may send one); for decode steps only while a session the tier holds has none queued."""
        head = self._queue[0]
        return self.live is None or head.kind != "decode" or self.live() > len(self._queue)

    def _lead(self, mine: _Step) -> None:
        """Runs batches until ``mine`` is answered, then hands the lead to the oldest queued step (or drops it)."""
        window_s = self.settings.window_ms / 1e3
        while True:
            if window_s > 0 and len(self._queue) < self.settings.max_batch and self._others_may_come():
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
                    s.done.set()  # type: ignore[union-attr]
            with self._lock:
                if not mine.finished:
                    continue  # (cannot happen: the leader's step is the oldest queued, so in the first batch)
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.done.set()  # type: ignore[union-attr]
                else:
                    self._leading = False
                return

    def _run(self, batch: list[_Step], hop: bool = True) -> None:
        """One forward pass for ``batch``; every step gets its result or the pass's error (never raises); with
        ``hop``, its steps' seats in one hop group (their callers forward them)."""
        try:
            self._count(len(batch))
            if len(batch) == 1:
                s = batch[0]
                outs = [self._solo(s.stages, s.state, s.cache)]
            else:
                states, caches = [s.state for s in batch], [s.cache for s in batch]
                kind = batch[0].kind
                assert kind is not None  # steps of no kind run alone
                outs = batched_pass(kind, self.model, batch[0].stages, states, caches)
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
        ok = [s for s in batch if s.error is None]
        if hop and self.hop is not None and len(ok) > 1:
            group = HopGroup(len(ok), self.hop)
            for s in ok:
                s.seat = HopSeat(group)
        for s in batch:
            s.finished = True

    def _count(self, n: int) -> None:
        with self._lock:
            self.passes += 1
            self.steps += n
            self.largest = max(self.largest, n)
        self.on_batch(n)


@dataclass(eq=False)
class Generation:
    """One request's generation on its driving tier, past its prefill: ``key`` and ``session`` (its KV cache
    and ``step_inputs``), the tokens so far ([1, 1] each, the prefill's first), the request's timings, and how
    many tokens it wants, by when (``deadline``, time.monotonic()), how they are picked (``sampling``) and the trace
    context its steps' messages carry."""

    key: Any
    session: Any
    tokens: list
    timings: Any
    max_new_tokens: int
    deadline: float
    sampling: Any
    traceparent: str = ""  # the request's trace context (its steps' messages carry it)
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    abandoned: bool = False  # its request stopped waiting (DriveLoop.drive timed out)


class DriveLoop:
    """The decode loop of a driving tier for all its generations at once (``node``: its
    :class:`~aiflow_cli.runtime.node.TierNode`, with a batcher).

    Without it every generation's thread steps alone: per token each of N threads queues its step in the
    batcher, is woken with its row, encodes and queues its forward in a hop group, and is woken again with its
    token: 2N thread wake-ups per step, on a loaded CPU the larger part of the tier's work at a hundred sessions.
    Here one thread (started when the first generation joins, gone when the last ends) steps every generation:
    next inputs, one :meth:`DecodeBatcher.run_many` pass, each session's state encoded and all of them sent as
    one :class:`~aiflow_cli.runtime.protocol.InferBatch` (or, on an output tier, each session's token picked),
    tokens appended; a generation joins at the next step after its prefill and leaves when it has its tokens (or
    an end-of-sequence token), and only then is its request's thread woken. A step that fails fails only its own
    generation (its session closed); the others go on. A request that stops waiting (``grace_s`` past its
    deadline: a step hung) fails with a Timeout, and its generation leaves the loop before the next step, its
    session closed."""

    def __init__(self, node: Any):
        self.node = node
        self._lock = threading.Lock()
        self._joining: list[Generation] = []
        self._running = False
        self.grace_s = 30.0  # how long past its deadline a request waits for its generation to end

    def drive(self, gen: Generation) -> None:
        """Runs ``gen`` to its end with the other generations (tokens appended to ``gen.tokens``, figures merged
        into ``gen.timings``); raises what failed it."""
        with self._lock:
            self._joining.append(gen)
            start, self._running = not self._running, True
        if start:
            threading.Thread(target=self._loop, name=f"{self.node.tier}-decode", daemon=True).start()
        if not gen.done.wait(min(max(0.0, gen.deadline - time.monotonic()) + self.grace_s, threading.TIMEOUT_MAX)):
            with self._lock:
                gen.abandoned = True  # the loop drops it (and closes its session) before its next step
            raise Timeout(f"{self.node.tier}: the generation did not end within its deadline")
        if gen.error is not None:
            raise gen.error

    def _loop(self) -> None:
        active: list[Generation] = []
        while True:
            with self._lock:
                active += self._joining
                self._joining.clear()
                gone = [g for g in active if g.abandoned]
                if gone:  # their requests timed out waiting: they leave, their sessions freed
                    active = [g for g in active if not g.abandoned]
                if not active and not gone:
                    self._running = False
                    return
            for g in gone:
                self._end(g, Timeout(f"{self.node.tier}: the generation did not end within its deadline"))
            if not active:
                continue
            try:
                active = self._step(active)
            except BaseException as e:  # noqa: BLE001 - a bug here must not hang the requests
                for g in active:
                    self._end(g, e)
                active = []

    def _end(self, g: Generation, error: Optional[BaseException] = None) -> None:
        if error is not None:
            g.error = error
            self.node.fail_session(g.key)
        g.done.set()

    def _step(self, active: list[Generation]) -> list[Generation]:
        """One decode step of every generation in ``active`` (the node's :meth:`step_generations`); returns those
        that go on."""
        return self.node.step_generations(active, self._end)
