"""One tier of a running plan: its stages, its sessions, and its link to the next tier.

:class:`TierNode` is the same on every tier. A *step* (one prefill, or one decode step of a generation) arrives
as a boundary state that feeds stage ``stage``; the node runs the stages the plan gives it, encodes the result
with the codec of its outgoing cut and forwards it to the next tier, or, on the last computing tier, turns it
into the output (token ids for generating models, the output tensor otherwise). A tier that runs nothing relays
the frames untouched; a device that runs nothing sends its raw input (stage 0's input) on the same way, coded as
the plan's cut ``after_stage=-1`` says (``raw``): stage 0, ``input.prepare``, runs on the first tier that computes.

Generation is driven by the tier that holds the first decode stage (the device for LMs it starts; the tier
holding ``dec.embed`` for the captioner): after the prefill it feeds each chosen token back into its own stages
and sends one token's hidden state per cut per step, while every tier keeps the KV cache of its own blocks.
Tiers in front of the driver see one prefill and get all tokens back at once. With ``speculate`` the driver
drafts several tokens per round with its own layers and the tiers behind verify them in one message per link
(:mod:`aiflow_cli.runtime.speculate`).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

import torch

from aiflow_cli.errors import PlanError, Timeout, TransportError
from aiflow_cli.models import StagedModel, load_stages
from aiflow_cli.models.sampling import GREEDY, Sampling, sample, verify_round
from aiflow_cli.models.stage_setup import shared_setup
from aiflow_cli.models.state import BoundaryState
from aiflow_cli.plan.schema import Plan
from aiflow_cli.runtime import precheck, protocol, tracing
from aiflow_cli.runtime import speculate as spec
from aiflow_cli.runtime.batching import (
    BatchSettings,
    DecodeBatcher,
    DriveLoop,
    Generation,
    HopItem,
    HopSeat,
    hop_chunks,
)
from aiflow_cli.runtime.protocol import (
    DECODE,
    PREFILL,
    VERIFY,
    BatchStep,
    End,
    Error,
    Hello,
    HelloReply,
    Infer,
    InferBatch,
    Result,
    ResultBatch,
    TierInfo,
    Verify,
)
from aiflow_cli.runtime.roles import check_next_hop
from aiflow_cli.runtime.sessions import SessionKey, SessionStore
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.runtime.wire import PackedState, pack_state, unpack_state
from aiflow_cli.timing import check_speed
from aiflow_cli.transport import Client, Message, PeerInfo

#: Share of the remaining deadline a tier keeps for itself when it forwards (so the deepest timeout fires first
#: and its error, which names the tier that failed, reaches the device before the device's own deadline).
DEADLINE_MARGIN = 0.9
DEFAULT_CACHE_BYTES = 1 << 30
#: Seconds an :class:`End` (a failed request's session dropped behind this tier) may take; best-effort.
END_TIMEOUT_S = 5.0
#: Most seconds a step waits for the next tier, however far its deadline (a peer's deadline_ms is any number; the
#: transport refuses waits past ~1e19 s, Event.wait past threading.TIMEOUT_MAX).
MAX_BUDGET_S = 1e9
#: Most frames one batched message carries (the transport's default ``max_frames`` is 4096).
MAX_BATCH_FRAMES = 4000


def rss_bytes() -> int:
    """Resident memory of this process (bytes), from /proc; 0 where that is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Payload:
    """What a step carries: a decoded state (local) or frames as received (relayed without decoding)."""

    state: Optional[BoundaryState] = None
    packed: Optional[PackedState] = None


def next_session_id(key: SessionKey) -> int:
    """The id under which session ``key`` (the sender's fingerprint, its id) is known to the next tier: its id mixed
    with the sender's fingerprint (63 bits), so that sessions of two peers that chose the same id never share a
    session (a KV cache) behind this tier. Stable: every step, verify and ``End`` of the session maps alike."""
    peer, sid = key
    digest = hashlib.blake2b(f"{peer}/{sid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class StepResult:
    """A step's outcome: ``tokens`` [B, n] (generating models) or the ``output`` tensor, plus its timings."""

    tokens: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    output_packed: Optional[PackedState] = None
    timings: Timings = field(default_factory=Timings)
    spec: Optional[spec.SpecStats] = None  # the driver's speculation figures (speculative requests)


class TierNode:
    """Runs tier ``tier`` of ``plan``. ``next_client`` reaches the next tier in the plan's order (None when no
    tier behind this one computes).

    ``speed`` emulates a machine ``speed`` times as fast as this CPU. Without dilation (``dilation=1``) only
    slower ones (``speed <= 1``): the node's compute and codec work is stretched to ``1 / speed`` times its CPU
    time (it sleeps the difference). Under time dilation ``D`` (docs/runtime.md) every tier is stretched by
    ``D / speed``, so the fastest tier (``speed = D``) runs at this CPU's real speed; the figures the node
    reports are real (undilated) milliseconds, stretch included: divide by ``D`` for emulated time."""

    def __init__(
        self,
        plan: Plan,
        tier: str,
        *,
        next_client: Optional[Client] = None,
        speed: float = 1.0,
        cache_limit_bytes: int = DEFAULT_CACHE_BYTES,
        model: Optional[StagedModel] = None,
        dilation: float = 1.0,
        exit_head: bool = False,
        batching: Optional[BatchSettings] = None,
    ):
        self.stretch = check_speed(speed, dilation)
        self.dilation = dilation
        self.plan = plan
        self.tier = tier
        self.plan_hash = protocol.plan_hash(plan)
        names = [t.name for t in plan.tiers]
        if tier not in names:
            raise PlanError(f"the plan has no tier {tier!r} (tiers: {', '.join(names)})")
        self.index = names.index(tier)
        self.next_tier = names[self.index + 1] if self.index + 1 < len(names) else None
        self.stages = plan.stages_for(tier)
        behind = check_next_hop(plan, tier, next_client is not None, "next_client")
        self.next = next_client if behind else None
        self._next_client, self.exit_head = next_client, exit_head  # for like()
        self.link = f"{tier}-{self.next_tier}" if self.next_tier else ""
        self.speed = speed
        t0 = time.perf_counter()
        # a driver that self-speculates also loads the head stage (final norm + LM head) as its early exit
        extra = [plan.n_stages - 1] if exit_head and self.stages.stop < plan.n_stages else []
        self.model = model or load_stages(plan.model, list(self.stages) + extra)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        plan.check_model(self.model.model_hash)
        self.generates = self.model.generates
        self.decode_start = self.model.decode_start
        self.is_driver = self.generates and self.stages.start <= self.decode_start < self.stages.stop
        self.is_output = self.stages.stop == plan.n_stages and len(self.stages) > 0
        self.keeps_cache = self.generates and self.stages.stop > self.decode_start
        self.sessions = SessionStore(self.model.new_cache, limit_bytes=cache_limit_bytes, tier=tier)
        self.first_token_at: Optional[float] = None  # perf_counter() when this driver had its first token
        self.observer: Optional[Any] = None  # a runtime.metrics.TierMetrics, told of each request (serve --metrics)
        self.drafter: Optional[Any] = None  # a driver's draft source (runtime.drafters; None: the untrained exit)
        # prefills and decode steps of concurrent sessions as one pass (runtime/batching.py); emulated speeds: alone
        batching = batching or BatchSettings()
        self.batching = batching
        # ... and the sessions of one pass cross to the next tier as one message (protocol.InferBatch), unless the
        # next tier is a pool of replicas (routing.PoolClient routes each session's steps to its own replica)
        self._batches = getattr(self.next, "takes_batches", True)
        hop = self._send_batch if self.next is not None and not self.is_output and self._batches else None
        self.batcher = (
            DecodeBatcher(
                self.model, batching, lambda n: self.observer and self.observer.batched(n), hop, self.sessions.__len__
            )
            if batching.enabled and self.keeps_cache and self.stretch <= 1
            else None
        )
        self._batch_pool: Optional[ThreadPoolExecutor] = None  # steps of a batched message that run as threads
        self.loop = DriveLoop(self) if self.batcher is not None and self.is_driver and self._batches else None
        self.on_link: Optional[Any] = None  # (bytes up, bytes down, wire ms) per message sent on (runtime/replan.py)

    def like(self, plan: Plan, *, exit_head: Optional[bool] = None) -> "TierNode":
        """The same node under another ``plan`` (a re-plan, runtime/replan.py): this tier, next tier's client,
        speed, dilation, cache limit, batching and observer; its stages loaded for ``plan``. ``exit_head``: None
        keeps this node's."""
        node = TierNode(
            plan,
            self.tier,
            next_client=self._next_client,
            speed=self.speed,
            cache_limit_bytes=self.sessions.limit_bytes,
            dilation=self.dilation,
            exit_head=self.exit_head if exit_head is None else exit_head,
            batching=self.batching,
        )
        node.observer = self.observer
        return node

    # -- identity -------------------------------------------------------------------------------------------
    def info(self) -> TierInfo:
        """What ``hello`` reports about this tier."""
        return TierInfo(
            self.tier,
            self.plan_hash,
            self.plan.model_hash,
            (self.stages.start, self.stages.stop),
            self.model.loaded_param_bytes(),
            rss_bytes(),
            round(self.load_ms, 1),
            self.speed,
            os.getpid(),
            self.dilation,
        )

    def describe(self) -> dict[str, Any]:
        """:meth:`info` as a JSON-able dict."""
        return self.info().to_json()

    def hello_chain(self, deadline: float) -> list[dict[str, Any]]:
        """Greets the tiers behind this one (checking their plan and model); returns their descriptions."""
        return [t.to_json() for t in self._hello_behind(deadline)]

    def _hello_behind(self, deadline: float) -> tuple[TierInfo, ...]:
        if self.next is None:
            return ()
        budget_s = self._budget_s(deadline)
        hello = Hello(self.plan_hash, self.plan.model_hash, self.tier, budget_s * 1e3)
        return protocol.expect_reply(self._request(protocol.encode(hello), budget_s), HelloReply).chain

    # -- serving --------------------------------------------------------------------------------------------
    def handle(self, env: Message, peer: PeerInfo) -> Message:
        """The transport handler of a server tier: never raises; failures become ``error`` replies."""
        t0 = time.perf_counter()
        try:
            msg = protocol.decode(env)
            if not isinstance(msg, (Hello, Infer, Verify, InferBatch, End)):
                raise TransportError(f"{self.tier}: a {env.kind} message is a reply, not a request")
            deadline = time.monotonic() + max(0.0, msg.deadline_ms) / 1e3
            protocol.check_peer(self.tier, self.plan, self.plan_hash, msg)
            if isinstance(msg, Hello):
                return protocol.encode(HelloReply((self.info(),) + self._hello_behind(deadline)))
            if isinstance(msg, End):
                key = (peer.fingerprint, env.session_id)
                self.sessions.close(key)
                if self.next is not None:  # on down the chain, within the sender's deadline
                    self._send_end(next_session_id(key), self._budget_s(deadline))
                return protocol.encode(End(self.plan_hash, self.tier, 0.0))
            if isinstance(msg, InferBatch):
                return self._handle_batch(msg, env, peer, t0)
            result = self._serve(msg, env.frames, (peer.fingerprint, env.session_id), deadline)
            result.timings.tier(self.tier).handle_ms += (time.perf_counter() - t0) * 1e3
            reply = self._reply(result)
            if self.observer is not None:
                self.observer.handled(msg, env, reply, result, time.perf_counter() - t0)
            return reply
        except Exception as e:  # every failure goes back as a reply; the server keeps serving
            if self.observer is not None:
                self.observer.failed(env, e)
            return protocol.error_reply(self.tier, e)

    def _serve(self, msg: Infer | Verify, frames: list, key: SessionKey, deadline: float) -> StepResult:
        """One received step (``msg`` with its ``frames``) of session ``key``, in its trace span."""
        packed = PackedState(tensors=msg.tensors, frames=list(frames), encode_ms=0.0)
        verify = msg if isinstance(msg, Verify) else None
        phase = VERIFY if verify else msg.phase
        with tracing.span(f"aiflow {self.tier} {phase}", getattr(msg, "traceparent", ""), tier=self.tier):
            return self.step(
                key,
                phase,
                msg.stage,
                Payload(packed=packed),
                max_new_tokens=0 if verify else msg.max_new_tokens,
                last=False if verify else msg.last,
                deadline=deadline,
                verify=verify,
                sampling=msg.sampling if msg.temperature else GREEDY,
                index=msg.index,
            )

    def _handle_batch(self, msg: InferBatch, env: Message, peer: PeerInfo, t0: float) -> Message:
        """The steps of a batched message: run as one pass (:meth:`_step_batch`) where this tier batches and does not
        drive (it outputs their tokens, or forwards them as one message), else each as its own step on a thread;
        one result or error per step, in step order."""
        parts = msg.split(env.frames)
        now = time.monotonic()
        jobs = [
            (step, frames, (peer.fingerprint, step.session_id), now + max(0.0, step.infer.deadline_ms) / 1e3)
            for step, frames in parts
        ]
        outs: list[StepResult | BaseException]
        if self.batcher is not None and not self.is_driver:
            outs = self._step_batch(jobs)
        else:
            if self._batch_pool is None:
                self._batch_pool = ThreadPoolExecutor(protocol.MAX_BATCH_SESSIONS, f"{self.tier}-batch")

            def one(job: tuple) -> StepResult | BaseException:
                try:
                    return self._serve(job[0].infer, job[1], job[2], job[3])
                except Exception as e:  # noqa: BLE001 - this step's own error reply
                    return e

            outs = list(self._batch_pool.map(one, jobs))
        handle_ms = (time.perf_counter() - t0) * 1e3
        results: list[Result | Error] = []
        frames: list = []
        for out in outs:
            if isinstance(out, BaseException):
                results.append(protocol.error_of(self.tier, out))
                continue
            out.timings.tier(self.tier).handle_ms += handle_ms
            packed = out.output_packed
            tokens = out.tokens.tolist() if out.tokens is not None else None
            results.append(Result(out.timings, tokens, packed.tensors if packed else ()))
            frames += packed.frames if packed else []
        reply = protocol.encode(ResultBatch(tuple(results)), frames)
        if self.observer is not None:
            self.observer.handled_batch(msg, env, reply, outs, time.perf_counter() - t0)
        return reply

    def _step_batch(self, jobs: list[tuple]) -> list[StepResult | BaseException]:
        """The steps of a batched message on a tier that batches: each session's state decoded and its cache found,
        one batched pass for all (:meth:`DecodeBatcher.run_many`), then each session's token (output tier) or
        its state encoded and all sent on as one message (:meth:`_hop_many`); each step in its own trace span. A
        step that fails fails alone (its session closed, like :meth:`step`)."""
        outs: list[Any] = [None] * len(jobs)
        ready: list[tuple[Any, ...]] = []
        for i, (step, frames, key, deadline) in enumerate(jobs):
            m = step.infer
            try:
                if not max(self.stages.start, self.decode_start) <= m.stage < self.stages.stop:
                    raise PlanError(
                        f"{self.tier}: a batched step must start at a decode stage this tier runs "
                        f"({max(self.stages.start, self.decode_start)}..{self.stages.stop - 1}), got stage {m.stage}"
                    )
                payload = Payload(packed=PackedState(m.tensors, frames, 0.0))
                ready.append((i, m, key, deadline) + self._begin(key, m.phase, m.stage, payload, None))
            except Exception as e:  # noqa: BLE001 - this step's own error
                outs[i] = e
        with tracing.spans(
            [(f"aiflow {self.tier} {r[1].phase}", r[1].traceparent) for r in ready], tier=self.tier
        ) as tps:
            t0 = time.perf_counter()
            passes = self.batcher.run_many(
                [(range(m.stage, self.stages.stop), st, s.cache) for _, m, _, _, _, _, st, s in ready]
            )
            compute_ms = (time.perf_counter() - t0) * 1e3
            sends: list[tuple[Any, ...]] = []
            for (i, m, key, deadline, timings, mine, _, session), state, tp in zip(ready, passes, tps):
                try:
                    if isinstance(state, BaseException):
                        raise state
                    mine.compute_ms += compute_ms
                    if self.is_output:
                        result = self._output(state, mine, None, m.sampling if m.temperature else GREEDY, m.index)
                        result.timings = timings
                        outs[i] = self._step_done(key, session, m, result)
                        continue
                    packed = self.pack(state, self.stages.stop - 1, mine).packed
                    budget_s = self._budget_s(deadline)
                    request = replace(
                        m,
                        plan_hash=self.plan_hash,
                        sender=self.tier,
                        stage=self.stages.stop,
                        tensors=packed.tensors,
                        deadline_ms=budget_s * 1e3,
                        traceparent=tp,
                    )
                    sends.append(
                        (
                            i,
                            key,
                            session,
                            m,
                            (timings, packed, HopItem(next_session_id(key), request, packed.frames, budget_s)),
                        )
                    )
                except Exception as e:  # noqa: BLE001
                    self.fail_session(key)
                    outs[i] = e
            for (i, key, session, m, _), r in zip(sends, self._hop_many([s[-1] for s in sends])):
                try:
                    if isinstance(r, BaseException):
                        raise r
                    outs[i] = self._step_done(key, session, m, r)
                except Exception as e:  # noqa: BLE001
                    self.fail_session(key)
                    outs[i] = e
        return outs  # every entry set above

    def _step_done(self, key: SessionKey, session: Any, m: Infer, result: StepResult) -> StepResult:
        """A batched step's end on this tier: its session's step done, and closed after the request's last step
        (or an EOS on every row)."""
        eos = self.model.eos_token_ids
        self.sessions.done_step(key, session)
        ended = result.tokens is not None and bool(eos) and all(int(t) in eos for t in result.tokens[:, -1])
        if m.last or ended:
            self.sessions.close(key)
        return result

    @staticmethod
    def _reply(result: StepResult) -> Message:
        tokens = result.tokens.tolist() if result.tokens is not None else None
        out = result.output_packed
        return protocol.encode(Result(result.timings, tokens, out.tensors if out else ()), out.frames if out else ())

    # -- one step -------------------------------------------------------------------------------------------
    def step(
        self,
        key: SessionKey,
        phase: str,
        stage: int,
        payload: Payload,
        *,
        max_new_tokens: int = 0,
        last: bool = True,
        deadline: float,
        verify: Optional[Verify] = None,
        speculate: Optional[spec.SpecPolicy] = None,
        sampling: Sampling = GREEDY,
        index: int = 0,
    ) -> StepResult:
        """Runs this tier's part of one step and everything behind it; see the module docstring. ``verify``: a
        speculative round (phase VERIFY); ``speculate``: the driver's policy for a speculative generation;
        ``sampling``: how the output tier picks tokens, ``index``: the answer place of the token this step
        produces (:mod:`aiflow_cli.models.sampling`)."""
        computes = len(self.stages) > 0 and stage < self.stages.stop
        if not computes:
            timings = Timings()
            if payload.packed is None:  # the device's raw input: sent on like any tier's last boundary
                payload = self.pack(payload.state, stage - 1, timings.tier(self.tier))
            return self._forward(
                key, phase, stage, payload, max_new_tokens, last, deadline, timings, verify, sampling, index
            )
        timings, mine, state, session = self._begin(key, phase, stage, payload, verify)
        seat: Optional[HopSeat] = None
        try:
            state, prompt = self.run_stages(
                stage, state, session.cache if session else None, mine, batch=verify is None
            )
            seat = self.batcher.take_seat() if self.batcher is not None else None
            if session is not None and prompt is not None:
                session.step_inputs = prompt
            if self.is_output:
                result = self._output(state, mine, verify, sampling, index)
                result.timings = timings
            else:
                ahead = verify
                if verify is not None and verify.precheck and not self.is_driver:  # the edge's exit may cut it
                    state, ahead = precheck.cut(self, state, verify, sampling, mine)
                sent = self.pack(state, self.stages.stop - 1, mine)
                # the driver's prefill opens the sessions behind it: they live until its last decode step
                down_last = max_new_tokens <= 1 if self.is_driver and phase == PREFILL else last
                result = self._forward(
                    key, phase, self.stages.stop, sent, max_new_tokens, down_last, deadline, timings, ahead,
                    sampling, index, seat,
                )  # fmt: skip
            if session is not None:
                self.sessions.done_step(key, session)
            if self.is_driver and phase == PREFILL:
                self.first_token_at = time.perf_counter()  # time to first token (the latest request's)
            if self.is_driver and phase == PREFILL and max_new_tokens > 1:
                if speculate is not None and self.can_speculate(result):
                    result = spec.drive(self, key, session, result, max_new_tokens, deadline, speculate, sampling)
                else:
                    result = self._drive(key, session, result, max_new_tokens, deadline, sampling)
        except BaseException:
            if seat is not None:
                seat.leave()  # the other sessions of its pass do not wait for this one
            if session is not None:
                self.fail_session(key)
            raise
        if verify is not None:  # the round that emits the request's last token (or an EOS) ends it
            ended = spec.round_ends(verify, result.tokens, self.model.eos_token_ids)
        else:
            ended = result.tokens is not None and bool(
                self.model.finished(result.tokens[:, -1:]).all()
            )  # EOS: no next step
        if session is not None and (last or ended or (self.is_driver and phase == PREFILL)):
            self.sessions.close(key)
        return result

    def _begin(self, key: SessionKey, phase: str, stage: int, payload: Payload, verify: Optional[Verify]) -> tuple:
        """A computing step's start: its stage checked, its state decoded, its session opened (prefill) or found;
        returns (timings, this tier's timing, state, session or None)."""
        if stage < self.stages.start or stage > self.stages.stop or stage < 0:
            raise PlanError(
                f"{self.tier}: got a state for stage {stage}, but runs stages "
                f"{self.stages.start}..{self.stages.stop - 1}"
            )
        timings = Timings()
        mine = timings.tier(self.tier)
        mine.steps += 1
        state = payload.state
        if state is None:
            t0, c0 = self._clocks()
            state, _, mine.decode_ms = unpack_state(payload.packed.tensors, payload.packed.frames)
            mine.decode_ms += self._stretch(t0, c0)
        session = None
        if self.keeps_cache:
            session = self.sessions.open(key) if phase == PREFILL else self.sessions.get(key)
            if verify is not None:
                verify.check_cache(session.cache.length)
                session.cache.crop(verify.cache_len)  # the previous round's rejected drafts
        return timings, mine, state, session

    @shared_setup()  # the blocks of the range build the attention mask / rotary embeddings once per step
    def run_stages(
        self, stage: int, state: BoundaryState, cache, mine, batch: bool = False
    ) -> tuple[BoundaryState, Optional[BoundaryState]]:
        prompt = None
        t0, c0 = self._clocks()
        if batch and self.batcher is not None and cache is not None:
            start = max(stage, self.decode_start)
            for i in range(stage, start):  # stages before the decoder (input.prepare) run alone
                state = self.model.run_stage(i, state, cache)
            if start == self.decode_start and self.is_driver:
                prompt = self.model.decode_inputs_of(state)
            state = self.batcher.run(range(start, self.stages.stop), state, cache)  # with other sessions' steps
        else:
            for i in range(stage, self.stages.stop):
                if i == self.decode_start and self.is_driver:
                    prompt = self.model.decode_inputs_of(state)
                state = self.model.run_stage(i, state, cache)
            if self.observer is not None:
                self.observer.batched(1)
        self._stretch(t0, c0)  # one sleep per step: per-stage sleeps would add the timer's overshoot per stage
        mine.compute_ms += (time.perf_counter() - t0) * 1e3
        return state, prompt

    @contextmanager
    def computing(self, mine) -> Iterator[None]:
        """Times the block as this tier's compute (``mine.compute_ms``), stretched to the emulated speed like its
        stages (for work beside them: an exit's head, a draft model)."""
        t0, c0 = self._clocks()
        yield
        self._stretch(t0, c0)
        mine.compute_ms += (time.perf_counter() - t0) * 1e3

    def pack(self, state: BoundaryState, after_stage: int, mine) -> Payload:
        """The boundary after ``after_stage`` (-1: the raw input) encoded with the codec of its cut."""
        t0, c0 = self._clocks()
        packed = pack_state(state, self.model.roles(state), self.plan.cut_codec(after_stage) or "raw")
        if self.observer is not None:
            self.observer.packed(sum(t.numel() * t.element_size() for t in state.values()), packed)
        mine.encode_ms += packed.encode_ms + self._stretch(t0, c0)
        return Payload(packed=packed)

    def _clocks(self) -> tuple[float, float]:
        # thread_time is a system call (~1.6 us), paid 3 times a step: only an emulated speed needs it
        return time.perf_counter(), time.thread_time() if self.stretch > 1 else 0.0

    def _stretch(self, t0: float, c0: float) -> float:
        """Sleeps until ``stretch`` x the CPU time this thread spent since ``(t0, c0)`` has passed (the wall time
        since ``t0`` counts towards it); returns the ms slept. CPU time, not wall time: on a loaded machine the
        wall time of the work grows with the load and a wall-time stretch would multiply that, while this
        thread's CPU time stays what the work costs (torch runs its ops in this thread with one intra-op thread,
        as every tier of LocalCluster has; with more, their CPU time is not seen and the wall time is used)."""
        if self.stretch <= 1:
            return 0.0
        wall = time.perf_counter() - t0
        cpu = time.thread_time() - c0 if torch.get_num_threads() == 1 else wall
        left = cpu * self.stretch - wall
        if left <= 0:
            return 0.0
        time.sleep(left)
        return left * 1e3

    def _output(
        self, state: BoundaryState, mine, verify: Optional[Verify] = None, sampling: Sampling = GREEDY, index: int = 0
    ) -> StepResult:
        out = self.model.output(state)
        if self.generates:
            if verify is None:
                return StepResult(tokens=sample(out[:, -1], sampling, index).reshape(-1, 1))
            verify.check_output(out.shape[1], out.shape[-1])
            if sampling.greedy:  # the full model's token after each position
                return StepResult(tokens=out.argmax(-1))
            tokens = verify_round(out[0], verify.draft, verify.dists, sampling, verify.index)
            return StepResult(tokens=torch.tensor([tokens], dtype=torch.long))
        packed = pack_state({"output": out.contiguous()}, {"output": "hidden"}, "raw")
        mine.encode_ms += packed.encode_ms
        return StepResult(output=out, output_packed=packed)

    def can_speculate(self, first: StepResult) -> bool:
        """Whether this driver can self-speculate the generation whose prefill gave ``first``: tiers behind it
        verify, one sequence, its exit (the head stage) loaded, a model whose KV cache can be rolled back."""
        head = self.model.num_stages - 1
        return (
            self.next is not None
            and first.tokens is not None
            and first.tokens.shape[0] == 1
            and (head in self.model.loaded or not getattr(self.drafter, "needs_head", True))
            and spec.unsupported(self.model) is None
        )

    def _drive(
        self, key: SessionKey, session, first: StepResult, max_new_tokens: int, deadline: float, sampling: Sampling
    ) -> StepResult:
        """The decode loop of the driving tier: one token per step through every tier behind it (with the other
        generations in one loop when this tier batches)."""
        if self.loop is not None and first.tokens is not None and first.tokens.shape[0] == 1:
            if bool(self.model.finished(first.tokens).all()):
                return first
            gen = Generation(
                key, session, [first.tokens], first.timings, max_new_tokens, deadline, sampling, tracing.current()
            )
            self.loop.drive(gen)
            return StepResult(tokens=torch.cat(gen.tokens, dim=1), timings=gen.timings)
        tokens, timings = [first.tokens], first.timings
        step_in = session.step_inputs
        for n in range(1, max_new_tokens):
            if bool(self.model.finished(torch.cat(tokens, dim=1)).all()):  # every row ended (EOS): stop early
                break
            step_in = self.model.next_inputs(step_in, tokens[-1].reshape(-1))
            session.step_inputs = step_in
            r = self.step(
                key,
                DECODE,
                self.decode_start,
                Payload(state=step_in),
                deadline=deadline,
                last=n == max_new_tokens - 1,
                sampling=sampling,
                index=n,
            )
            timings.merge(r.timings)
            tokens.append(r.tokens)
        return StepResult(tokens=torch.cat(tokens, dim=1), timings=timings)

    def step_generations(self, active: list[Generation], end: Callable[..., None]) -> list[Generation]:
        """One decode step of every generation in ``active`` (this driver's :class:`DriveLoop`): one pass for all,
        their states to the next tier as one message (or their tokens picked here, on an output tier); calls
        ``end(gen)`` for a generation that has its tokens, ``end(gen, error)`` for one that failed (the others go
        on); returns those that go on."""
        model = self.model
        eos = model.eos_token_ids
        ready: list[tuple[Generation, Any, Any]] = []
        for g in active:
            try:
                n = len(g.tokens)
                g.session.step_inputs = model.next_inputs(g.session.step_inputs, g.tokens[-1].reshape(-1))
                self.sessions.get(g.key)  # (busy; raises if it was evicted)
                timings = Timings()
                mine = timings.tier(self.tier)
                mine.steps += 1
                if time.monotonic() >= g.deadline:
                    raise Timeout(f"{self.tier}: the request's deadline passed after {n} tokens")
                ready.append((g, timings, mine))
            except Exception as e:  # noqa: BLE001
                end(g, e)
        stages = range(self.decode_start, self.stages.stop)
        t0 = time.perf_counter()
        outs = self.batcher.run_many([(stages, g.session.step_inputs, g.session.cache) for g, _, _ in ready])
        compute_ms = (time.perf_counter() - t0) * 1e3
        results: list[Any] = []
        sends: list[tuple[int, tuple]] = []
        for (g, timings, mine), out in zip(ready, outs):
            mine.compute_ms += compute_ms
            if isinstance(out, BaseException):
                results.append(out)
                continue
            try:
                if self.is_output:
                    r = self._output(out, mine, None, g.sampling, len(g.tokens))
                    r.timings = timings
                    results.append(r)
                    continue
                packed = self.pack(out, self.stages.stop - 1, mine).packed
                budget_s = self._budget_s(g.deadline)
                last = len(g.tokens) == g.max_new_tokens - 1
                request = Infer(
                    self.plan_hash,
                    self.tier,
                    DECODE,
                    self.stages.stop,
                    packed.tensors,
                    0,
                    last,
                    budget_s * 1e3,
                    g.traceparent,
                )
                if not g.sampling.greedy:
                    s = g.sampling
                    request.temperature, request.top_k, request.top_p, request.seed = (
                        s.temperature,
                        s.top_k,
                        s.top_p,
                        s.seed,
                    )
                    request.index = len(g.tokens)
                sends.append(
                    (len(results), (timings, packed, HopItem(next_session_id(g.key), request, packed.frames, budget_s)))
                )
                results.append(None)
            except Exception as e:  # noqa: BLE001
                results.append(e)
        for (at, _), r in zip(sends, self._hop_many([s for _, s in sends])):
            results[at] = r
        going = []
        for (g, _, _), r in zip(ready, results):
            if isinstance(r, BaseException):
                end(g, r)
                continue
            try:  # a malformed answer fails its own generation only
                if r.tokens is None or tuple(r.tokens.shape) != (1, 1):
                    shape = None if r.tokens is None else list(r.tokens.shape)
                    raise TransportError(f"{self.tier}: a decode step was answered with tokens {shape}, not [1, 1]")
                g.timings.merge(r.timings)
                g.tokens.append(r.tokens)
                self.sessions.done_step(g.key, g.session)
            except Exception as e:  # noqa: BLE001
                end(g, e)
                continue
            if len(g.tokens) >= g.max_new_tokens or (eos and int(r.tokens[0, -1]) in eos):
                end(g)
            else:
                going.append(g)
        return going

    # -- the link to the next tier -----------------------------------------------------------------------------
    def _forward(
        self,
        key: SessionKey,
        phase: str,
        stage: int,
        payload: Payload,
        max_new_tokens: int,
        last: bool,
        deadline: float,
        timings: Timings,
        verify: Optional[Verify] = None,
        sampling: Sampling = GREEDY,
        index: int = 0,
        hop: Optional[HopSeat] = None,
    ) -> StepResult:
        if self.next is None:
            raise PlanError(
                f"{self.tier}: the state for stage {stage} has nowhere to go (no tier behind {self.tier} runs stages)"
            )
        packed = payload.packed
        assert packed is not None, "a step leaves a tier as frames (see _pack)"
        budget_s = self._budget_s(deadline)
        request: Infer | Verify
        if verify is not None:  # a speculative round: the same fields, this hop's tensors and deadline
            request = verify.hop(stage, packed.tensors, budget_s * 1e3, tracing.current())
            request.plan_hash, request.sender = self.plan_hash, self.tier
        else:
            request = Infer(
                self.plan_hash, self.tier, phase, stage, packed.tensors, max_new_tokens, last, budget_s * 1e3
            )
            request.traceparent = tracing.current()  # the span this step belongs to (aiflow_cli/runtime/tracing.py)
            if not sampling.greedy:
                request.temperature, request.top_k, request.top_p = sampling.temperature, sampling.top_k, sampling.top_p
                request.seed, request.index = sampling.seed, index
        t0 = time.perf_counter()
        if hop is not None and isinstance(request, Infer):  # with the other sessions of its pass, one message
            reply, frames, counted = hop.request(HopItem(next_session_id(key), request, packed.frames, budget_s))
        else:
            env = self._request(protocol.encode(request, packed.frames, next_session_id(key)), budget_s)
            reply, frames, counted = protocol.expect_reply(env, Result), env.frames, True
        return self.account(timings, packed, reply, frames, counted, (time.perf_counter() - t0) * 1e3)

    def _hop_many(self, sends: list[tuple[Timings, PackedState, HopItem]]) -> list[StepResult | BaseException]:
        """The steps of one pass sent on together (:meth:`_send_batch`): per (its timings, its encoded state, its
        hop item), its :class:`StepResult` (link figures accounted) or its error."""
        if not sends:
            return []
        t0 = time.perf_counter()
        answers = self._send_batch([item for _, _, item in sends])
        rtt_ms = (time.perf_counter() - t0) * 1e3
        out: list[StepResult | BaseException] = []
        for (timings, packed, _), answer in zip(sends, answers):
            if isinstance(answer, BaseException):
                out.append(answer)
                continue
            try:  # a malformed answer (ragged token rows) fails its own step only
                out.append(self.account(timings, packed, answer[0], answer[1], answer[2], rtt_ms))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def account(
        self, timings: Timings, packed: PackedState, reply: Result, frames: list, counted: bool, rtt_ms: float
    ) -> StepResult:
        """A step's result from the next tier's ``reply`` (and its ``frames``) to the step sent as ``packed``,
        ``rtt_ms`` after it left: the link's figures added to ``timings`` (the message counted if ``counted``),
        the figures of the tiers behind merged in."""
        behind = reply.timings
        link = timings.link(self.link)
        link.bytes_up += packed.nbytes
        link.bytes_down += sum(len(f) for f in frames) + 8 * reply.token_count
        link.messages += counted  # a batched message counts once, on one of its sessions
        handled = sum(t.handle_ms for name, t in behind.tiers.items() if name == self.next_tier)
        link.wire_ms += max(0.0, rtt_ms - handled)
        if self.on_link is not None:
            self.on_link(packed.nbytes, sum(len(f) for f in frames), rtt_ms - handled)
        timings.merge(behind)
        result = StepResult(timings=timings)
        if reply.tokens is not None:
            result.tokens = torch.tensor(reply.tokens, dtype=torch.long)
        if reply.tensors:
            result.output_packed = PackedState(reply.tensors, list(frames), 0.0)
        return result

    def _send_batch(self, items: list[HopItem]) -> list:
        """The hop sender of this tier's batcher: ``items`` (steps of one pass) as :class:`InferBatch` messages
        within :data:`~aiflow_cli.runtime.protocol.MAX_BATCH_SESSIONS`, ``MAX_BATCH_BYTES`` and the transport's
        frame limit; per item (its Result, its frames, whether it counts the message) or its error."""
        out: list = []
        most = protocol.MAX_BATCH_SESSIONS if self._batches else 1  # (a pool: each step alone, to its replica)
        for chunk in hop_chunks(items, most, MAX_BATCH_FRAMES, protocol.MAX_BATCH_BYTES):
            if len(chunk) == 1:  # a batch of one goes as the plain step (binary header, the peer's plain path)
                it = chunk[0]
                try:
                    env = self._request(protocol.encode(it.request, it.frames, it.session_id), it.budget_s)
                    out.append((protocol.expect_reply(env, Result), env.frames, True))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
                continue
            budget_s = max(it.budget_s for it in chunk)
            steps = tuple(BatchStep(it.session_id, it.request) for it in chunk)
            msg = InferBatch(self.plan_hash, self.tier, steps, budget_s * 1e3)
            try:
                env = self._request(protocol.encode(msg, [f for it in chunk for f in it.frames]), budget_s)
                answers = protocol.expect_reply(env, ResultBatch).split(env.frames)
                if len(answers) != len(chunk):
                    raise TransportError(f"{self.next_tier} answered {len(answers)} of a batch of {len(chunk)} steps")
            except Exception as e:  # noqa: BLE001 - the message failed: each of its steps fails with it
                out += [e] * len(chunk)
                continue
            first = next((j for j, a in enumerate(answers) if not isinstance(a, Error)), -1)  # counts the message
            for j, a in enumerate(answers):
                out.append(a.exception() if isinstance(a, Error) else (a[0], a[1], j == first))
        return out

    def fail_session(self, key: SessionKey) -> None:
        """Drops the session ``key`` of a request that failed here and, when it was live, on the tiers behind this
        one: an :class:`End`, sent on a thread (best-effort), so that they do not keep its KV cache until idle
        expiry."""
        if self.sessions.close(key) and self.next is not None:
            args = (next_session_id(key), END_TIMEOUT_S)
            threading.Thread(target=self._send_end, args=args, name=f"{self.tier}-end", daemon=True).start()

    def _send_end(self, session_id: int, budget_s: float) -> None:
        """An :class:`End` of ``session_id`` to the next tier; a failure is dropped (idle expiry frees the session
        there in the end; a peer of an older version answers an unknown kind)."""
        try:
            end = protocol.encode(End(self.plan_hash, self.tier, budget_s * 1e3), session_id=session_id)
            self.next.request(end, timeout_s=budget_s)
        except Exception:  # noqa: BLE001 - best-effort
            pass

    def _budget_s(self, deadline: float) -> float:
        """What the next tier gets of what is left of ``deadline`` (s): all but this tier's margin."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{self.tier}: the request's deadline passed before it could reach {self.next_tier}")
        return min(remaining * DEADLINE_MARGIN, MAX_BUDGET_S)

    def _request(self, env: Message, budget_s: float) -> Message:
        try:
            return self.next.request(env, timeout_s=budget_s)
        except TransportError as e:
            # drop the failed connection at once so the next request reconnects (e.g. to a restarted tier); a
            # newer connection another thread already opened is left alone
            self.next.reset_after(e)
            detail = str(e).removeprefix(f"{self.next.server}: ")  # the transport names the address too
            e.args = (f"request to {self.next_tier} ({self.next.server}) failed: {detail}",)
            raise
