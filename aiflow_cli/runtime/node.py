"""One tier of a running plan: its stages, its sessions, and its link to the next tier.

:class:`TierNode` is the same on every tier. A *step* (one prefill, or one decode step of a generation) arrives
as a boundary state that feeds stage ``stage``; the node runs the stages the plan gives it, encodes the result
with the codec of its outgoing cut and forwards it to the next tier, or, on the last computing tier, turns it
into the output (token ids for generating models, the output tensor otherwise). A tier that runs nothing relays
the frames untouched.

Generation is driven by the tier that holds the first decode stage (the device for LMs it starts; the tier
holding ``dec.embed`` for the captioner): after the prefill it feeds each chosen token back into its own stages
and sends one token's hidden state per cut per step, while every tier keeps the KV cache of its own blocks.
Tiers in front of the driver see one prefill and get all tokens back at once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from aiflow_cli.errors import InputError, PlanError, Timeout, TransportError
from aiflow_cli.models import StagedModel, load_stages
from aiflow_cli.models.inputs import IMAGE_FILE, decode_image_file
from aiflow_cli.models.state import BoundaryState
from aiflow_cli.plan.schema import Plan
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.protocol import DECODE, INFER, PREFILL
from aiflow_cli.runtime.sessions import SessionKey, SessionStore
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.runtime.wire import PackedState, pack_state, unpack_state
from aiflow_cli.transport import Client, Message, PeerInfo

#: Share of the remaining deadline a tier keeps for itself when it forwards (so the deepest timeout fires first
#: and its error, which names the tier that failed, reaches the device before the device's own deadline).
DEADLINE_MARGIN = 0.9
DEFAULT_CACHE_BYTES = 1 << 30


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


@dataclass
class StepResult:
    """A step's outcome: ``tokens`` [B, n] (generating models) or the ``output`` tensor, plus its timings."""

    tokens: Optional[torch.Tensor] = None
    output: Optional[torch.Tensor] = None
    output_packed: Optional[PackedState] = None
    timings: Timings = field(default_factory=Timings)


class TierNode:
    """Runs tier ``tier`` of ``plan``. ``next_client`` reaches the next tier in the plan's order (None when no
    tier behind this one computes). ``speed`` < 1 emulates a slower machine by stretching each stage's compute
    time by ``1 / speed`` (sleeping the difference); the figures it reports include the stretch."""

    def __init__(self, plan: Plan, tier: str, *, next_client: Optional[Client] = None, speed: float = 1.0,
                 cache_limit_bytes: int = DEFAULT_CACHE_BYTES, model: Optional[StagedModel] = None):
        if not 0 < speed <= 1:
            raise InputError(f"--speed {speed}: a tier can only be emulated slower than this machine (0 < speed <= 1)")
        self.plan = plan
        self.tier = tier
        self.plan_hash = protocol.plan_hash(plan)
        names = [t.name for t in plan.tiers]
        if tier not in names:
            raise PlanError(f"the plan has no tier {tier!r} (tiers: {', '.join(names)})")
        self.index = names.index(tier)
        self.next_tier = names[self.index + 1] if self.index + 1 < len(names) else None
        self.stages = plan.stages_for(tier)
        behind = [t.name for t in plan.tiers[self.index + 1:] if t.end > t.start]
        if behind and next_client is None:
            raise InputError(f"{tier} must reach the next tier ({self.next_tier}): {', '.join(behind)} run stages "
                             f"of this plan (give --next HOST:PORT)")
        self.next = next_client if behind else None
        self.link = f"{tier}-{self.next_tier}" if self.next_tier else ""
        self.speed = speed
        t0 = time.perf_counter()
        self.model = model or load_stages(plan.model, list(self.stages))
        self.load_ms = (time.perf_counter() - t0) * 1e3
        plan.check_model(self.model.model_hash)
        self.generates = self.model.generates
        self.decode_start = self.model.decode_start
        self.is_driver = self.generates and self.stages.start <= self.decode_start < self.stages.stop
        self.is_output = self.stages.stop == plan.n_stages and len(self.stages) > 0
        self.keeps_cache = self.generates and self.stages.stop > self.decode_start
        self.sessions = SessionStore(self.model.new_cache, limit_bytes=cache_limit_bytes, tier=tier)

    # -- identity -------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What ``hello`` reports about this tier."""
        return {
            "tier": self.tier, "plan_hash": self.plan_hash, "model_hash": self.plan.model_hash,
            "stages": [self.stages.start, self.stages.stop], "loaded_param_bytes": self.model.loaded_param_bytes(),
            "rss_bytes": rss_bytes(), "load_ms": round(self.load_ms, 1), "speed": self.speed, "pid": os.getpid(),
        }

    def hello_chain(self, deadline: float) -> list[dict[str, Any]]:
        """Greets the tiers behind this one (checking their plan and model); returns their descriptions."""
        if self.next is None:
            return []
        msg = Message(protocol.HELLO, {"plan_hash": self.plan_hash, "model_hash": self.plan.model_hash, "from": self.tier})
        reply = self._request(msg, deadline)
        protocol.raise_error_reply(reply)
        return list(reply.meta.get("chain", []))

    # -- serving --------------------------------------------------------------------------------------------
    def handle(self, msg: Message, peer: PeerInfo) -> Message:
        """The transport handler of a server tier: never raises; failures become ``error`` replies."""
        t0 = time.perf_counter()
        try:
            meta = msg.meta
            deadline = time.monotonic() + max(0.0, float(meta.get("deadline_ms", 60_000))) / 1e3
            protocol.check_peer(self.tier, self.plan, self.plan_hash, meta)
            if msg.kind == protocol.HELLO:
                return Message(protocol.RESULT, {"chain": [self.describe()] + self.hello_chain(deadline)})
            if msg.kind != INFER:
                raise TransportError(f"{self.tier}: unknown message kind {msg.kind!r}")
            phase = meta.get("phase")
            if phase not in (PREFILL, DECODE):
                raise TransportError(f"{self.tier}: unknown phase {phase!r}")
            packed = PackedState(meta=meta.get("tensors", []), frames=list(msg.frames), encode_ms=0.0)
            result = self.step(
                (peer.fingerprint, msg.session_id), phase, int(meta.get("stage", -1)), Payload(packed=packed),
                max_new_tokens=int(meta.get("max_new_tokens", 0)), last=bool(meta.get("last", True)), deadline=deadline,
            )
            result.timings.tier(self.tier).handle_ms += (time.perf_counter() - t0) * 1e3
            return self._reply(result)
        except Exception as e:  # every failure goes back as a reply; the server keeps serving
            return protocol.error_reply(self.tier, e)

    @staticmethod
    def _reply(result: StepResult) -> Message:
        meta: dict[str, Any] = {"timings": result.timings.to_json()}
        frames: list = []
        if result.tokens is not None:
            meta["tokens"] = result.tokens.tolist()
        if result.output_packed is not None:
            meta["tensors"] = result.output_packed.meta
            frames = result.output_packed.frames
        return Message(protocol.RESULT, meta, frames)

    # -- one step -------------------------------------------------------------------------------------------
    def step(self, key: SessionKey, phase: str, stage: int, payload: Payload, *, max_new_tokens: int = 0,
             last: bool = True, deadline: float) -> StepResult:
        """Runs this tier's part of one step and everything behind it; see the module docstring."""
        computes = len(self.stages) > 0 and stage < self.stages.stop
        if not computes:
            return self._forward(key, phase, stage, payload, max_new_tokens, last, deadline, Timings())
        if stage < self.stages.start or stage > self.stages.stop or stage < 0:
            raise PlanError(f"{self.tier}: got a state for stage {stage}, but runs stages "
                            f"{self.stages.start}..{self.stages.stop - 1}")
        timings = Timings()
        mine = timings.tier(self.tier)
        mine.steps += 1
        state = payload.state
        if state is None:
            state, _, mine.decode_ms = unpack_state(payload.packed.meta, payload.packed.frames)
        if IMAGE_FILE in state:  # the device sent the image file itself: preprocess it here (counts as compute)
            t0 = time.perf_counter()
            state = self.model.prepare(image=decode_image_file(state[IMAGE_FILE]))
            mine.compute_ms += (time.perf_counter() - t0) * 1e3
        session = None
        if self.keeps_cache:
            session = self.sessions.open(key) if phase == PREFILL else self.sessions.get(key)
        try:
            state, prompt = self._run_stages(stage, state, session.cache if session else None, mine)
            if session is not None and prompt is not None:
                session.step_inputs = prompt
            if self.is_output:
                result = self._output(state, mine)
                result.timings = timings
            else:
                cut = self.plan.cut_codec(self.stages.stop - 1) or "raw"
                packed = pack_state(state, self.model.roles(state), cut)
                mine.encode_ms += packed.encode_ms
                # the driver's prefill opens the sessions behind it: they live until its last decode step
                down_last = max_new_tokens <= 1 if self.is_driver and phase == PREFILL else last
                result = self._forward(key, phase, self.stages.stop, Payload(packed=packed), max_new_tokens,
                                       down_last, deadline, timings)
            if session is not None:
                self.sessions.done_step(key, session)
            if self.is_driver and phase == PREFILL and max_new_tokens > 1:
                result = self._drive(key, session, result, max_new_tokens, deadline)
        except BaseException:
            if session is not None:
                self.sessions.close(key)
            raise
        ended = result.tokens is not None and bool(self.model.finished(result.tokens[:, -1:]).all())  # EOS: no next step
        if session is not None and (last or ended or (self.is_driver and phase == PREFILL)):
            self.sessions.close(key)
        return result

    def _run_stages(self, stage: int, state: BoundaryState, cache, mine) -> tuple[BoundaryState, Optional[BoundaryState]]:
        prompt = None
        t0 = time.perf_counter()
        for i in range(stage, self.stages.stop):
            if i == self.decode_start and self.is_driver:
                prompt = self.model.decode_inputs_of(state)
            state = self.model.run_stage(i, state, cache)
        if self.speed < 1:  # one sleep per step: per-stage sleeps would add the timer's overshoot per stage
            time.sleep((time.perf_counter() - t0) * (1 / self.speed - 1))
        mine.compute_ms += (time.perf_counter() - t0) * 1e3
        return state, prompt

    def _output(self, state: BoundaryState, mine) -> StepResult:
        out = self.model.output(state)
        if self.generates:
            return StepResult(tokens=out[:, -1].argmax(-1).reshape(-1, 1))
        packed = pack_state({"output": out.contiguous()}, {"output": "hidden"}, "raw")
        mine.encode_ms += packed.encode_ms
        return StepResult(output=out, output_packed=packed)

    def _drive(self, key: SessionKey, session, first: StepResult, max_new_tokens: int, deadline: float) -> StepResult:
        """The decode loop of the driving tier: one token per step through every tier behind it."""
        tokens, timings = [first.tokens], first.timings
        step_in = session.step_inputs
        for n in range(1, max_new_tokens):
            if bool(self.model.finished(torch.cat(tokens, dim=1)).all()):  # every row ended (EOS): stop early
                break
            step_in = self.model.next_inputs(step_in, tokens[-1].reshape(-1))
            session.step_inputs = step_in
            r = self.step(key, DECODE, self.decode_start, Payload(state=step_in), deadline=deadline,
                          last=n == max_new_tokens - 1)
            timings.merge(r.timings)
            tokens.append(r.tokens)
        return StepResult(tokens=torch.cat(tokens, dim=1), timings=timings)

    # -- the link to the next tier -----------------------------------------------------------------------------
    def _forward(self, key: SessionKey, phase: str, stage: int, payload: Payload, max_new_tokens: int, last: bool,
                 deadline: float, timings: Timings) -> StepResult:
        if self.next is None:
            raise PlanError(f"{self.tier}: the state for stage {stage} has nowhere to go (no tier behind {self.tier} "
                            f"runs stages)")
        packed = payload.packed
        if packed is None:  # a device that runs nothing uploads its raw input uncoded
            packed = pack_state(payload.state, self.model.roles(payload.state), "raw")
        meta = {"plan_hash": self.plan_hash, "from": self.tier, "phase": phase, "stage": stage,
                "tensors": packed.meta, "max_new_tokens": max_new_tokens, "last": last}
        t0 = time.perf_counter()
        reply = self._request(Message(INFER, meta, packed.frames, session_id=key[1]), deadline)
        rtt_ms = (time.perf_counter() - t0) * 1e3
        protocol.raise_error_reply(reply)
        behind = Timings.from_json(reply.meta.get("timings"))
        link = timings.link(self.link)
        link.bytes_up += packed.nbytes
        link.bytes_down += sum(len(f) for f in reply.frames) + 8 * sum(map(len, reply.meta.get("tokens", [])))
        link.messages += 1
        handled = sum(t.handle_ms for name, t in behind.tiers.items() if name == self.next_tier)
        link.wire_ms += max(0.0, rtt_ms - handled)
        timings.merge(behind)
        result = StepResult(timings=timings)
        if "tokens" in reply.meta:
            result.tokens = torch.tensor(reply.meta["tokens"], dtype=torch.long)
        if reply.meta.get("tensors"):
            result.output_packed = PackedState(reply.meta["tensors"], list(reply.frames), 0.0)
        return result

    def _request(self, msg: Message, deadline: float) -> Message:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{self.tier}: the request's deadline passed before it could reach {self.next_tier}")
        budget = remaining * DEADLINE_MARGIN
        msg.meta["deadline_ms"] = budget * 1e3
        try:
            return self.next.request(msg, timeout_s=budget)
        except TransportError as e:
            # drop the failed connection at once so the next request reconnects (e.g. to a restarted tier); a
            # newer connection another thread already opened is left alone
            self.next.reset_after(e)
            e.args = (f"request to {self.next_tier} ({self.next.server}) failed: {e}",)
            raise
