"""The tier protocol: typed, versioned messages on top of the transport's envelope, and how errors cross tiers.

Every message is one dataclass below (slotted, not frozen: a frozen one costs microseconds more per message to
build, and each decode step builds several; treat them as values). :func:`encode` turns it into the transport's
:class:`Message` (``kind`` names the class, ``meta`` holds its fields and the protocol version, ``frames`` its
tensors, ``session_id`` names a request across its decode steps) and :func:`decode` validates a received
envelope back into the class its kind names: the version first (:class:`PeerRejected` naming both versions), then every field's
type (:class:`TransportError` naming the field), so a handler only ever sees well-formed messages.

The messages of every decode step (:data:`BINARY`: :class:`Infer`, :class:`Result`) travel with a binary header
(:mod:`aiflow_cli.runtime.headers`: the dataclass's fields in declaration order, no JSON); the others, and any
message a peer sends as JSON, as a JSON object whose ``v`` is the version. Both forms are validated alike.

Requests go down the chain device -> edge -> cloud, replies come back up:

- :class:`Hello` -> :class:`HelloReply`: each server answers for itself and (when it forwards) for the tiers
  behind it, so the device learns the whole chain in one round trip. A plan or model mismatch is refused naming
  the side that differs.
- :class:`Infer` (one prefill or decode step of one request) -> :class:`Result` (output frames or tokens, plus
  every tier's timings).
- :class:`Verify` (one round of speculative decoding: several positions at once, after a KV-cache roll-back) ->
  :class:`Result` (the greedy token after every position); see :mod:`aiflow_cli.runtime.speculate`.
- :class:`InferBatch` (the steps of several sessions that one batch pass produced, sent on together:
  aiflow_cli/runtime/batching.py) -> :class:`ResultBatch` (a :class:`Result` or an :class:`Error` per session).
- :class:`Replan` -> :class:`HelloReply`: the device proposes a new plan between requests (the link changed);
  every tier loads its new stages and answers for the new plan; sessions of the old plan finish under it.
- :class:`End` -> :class:`End`: a request failed (an error reply, its deadline, a lost peer) while tiers behind
  the sender may still hold its session: each drops it (its KV cache) and passes the :class:`End` on, instead
  of keeping it until idle expiry. Sent best-effort by the tier that saw the failure.
- :class:`Error`: the reply to any request that failed, re-raised on the device as the same
  :class:`AiflowError` class, tagged with the tier where it happened.

JSON form: tensors are ``[name, role, codec]`` triples in frame order, timings are arrays in field order (see
:mod:`aiflow_cli.runtime.timings`). New messages (e.g. the draft and verify steps of cooperative decoding) are a
new dataclass with ``KIND``, ``to_wire`` and ``from_wire``, registered in :data:`MESSAGES` (and in
:data:`BINARY` to travel with a binary header: its layout follows the dataclass's fields, nothing to write); a
change to an existing message's fields bumps :data:`PROTOCOL_VERSION` (a binary header also carries a checksum
of its fields' layout, so peers that differ by a field refuse each other even when the version was not bumped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Sequence, Union, cast

from aiflow_cli import errors
from aiflow_cli.errors import AiflowError, PeerRejected, RemoteError, TransportError
from aiflow_cli.models.sampling import DraftDist, Sampling, check_dists
from aiflow_cli.plan.schema import Plan
from aiflow_cli.runtime.headers import HeaderCodec
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.transport import FrameLike, Message

#: Version of the messages below. 1 was the untyped protocol (dicts without a version field), 2 JSON only, 3
#: binary headers for infer and result, and the verify message (speculative decoding); 5 the batched step
#: (:class:`InferBatch` -> :class:`ResultBatch`).
PROTOCOL_VERSION = 5

HELLO, HELLO_REPLY, INFER, RESULT, ERROR = "hello", "hello_reply", "infer", "result", "error"
VERIFY = "verify"
REPLAN = "replan"
END = "end"
PREFILL, DECODE = "prefill", "decode"
Phase = Literal["prefill", "decode"]
PHASES = (PREFILL, DECODE)

#: A deadline for requests that carry none (ms).
DEFAULT_DEADLINE_MS = 60_000.0
#: Most drafts one :class:`Verify` round may carry (speculate.MAX_K and AUTO_MAX stay within it).
MAX_DRAFTS = 32


# -- field validation -------------------------------------------------------------------------------------------
def _bad(kind: str, key: str, want: str, got: Any) -> TransportError:
    return TransportError(
        f"malformed {kind} message: field {key!r} must be {want}, got {type(got).__name__} {str(got)[:40]!r}"
        if got is not None
        else f"malformed {kind} message: field {key!r} ({want}) is missing"
    )


_WANT = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
#: Integers travel as signed 64-bit fields in binary headers (a tier re-sends what it got as JSON that way).
_I64 = 1 << 63


def _get(meta: dict, kind: str, key: str, typ: type, default: Any = None) -> Any:
    """``meta[key]`` (or ``default``) if it has exactly type ``typ`` (a bool is no int here; an int in 64 bits)."""
    v = meta.get(key, default)
    if type(v) is not typ:
        raise _bad(kind, key, _WANT[typ], v)
    if typ is int and not -_I64 <= cast(int, v) < _I64:
        raise _bad(kind, key, "an integer within 64 bits", v)
    return v


def _num(meta: dict, kind: str, key: str, default: Optional[float] = None) -> float:
    v = meta.get(key, default)
    if type(v) not in (int, float) or v != v:
        raise _bad(kind, key, "a number", v)
    return float(v)  # type: ignore[arg-type]  # an int or a float: checked above, exactly (no bool)


_SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "index")


def _sampling_wire(msg: Any) -> dict:
    return {k: getattr(msg, k) for k in _SAMPLING_FIELDS}


def _sampling_from(meta: dict, kind: str, msg: Any) -> None:
    """Reads the sampling fields of ``meta`` into ``msg`` (types checked; values by :func:`_sampling_of`)."""
    msg.temperature = _num(meta, kind, "temperature", 0.0)
    msg.top_k = _get(meta, kind, "top_k", int, 0)
    msg.top_p = _num(meta, kind, "top_p", 1.0)
    msg.seed = _get(meta, kind, "seed", int, 0)
    msg.index = _get(meta, kind, "index", int, 0)
    _sampling_of(msg, kind)


def _sampling_of(msg: Any, kind: str) -> Sampling:
    if msg.index < 0:
        raise _bad(kind, "index", "an answer place >= 0", msg.index)
    try:
        return Sampling(msg.temperature, msg.top_k, msg.top_p, msg.seed)
    except errors.InputError as e:
        raise TransportError(f"malformed {kind} message: {e}") from None


# -- the messages -----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class TensorSpec:
    """One tensor of a message, in frame order: its state name, role (hidden, control, side) and codec."""

    name: str
    role: str
    codec: str

    def to_wire(self) -> list:
        return [self.name, self.role, self.codec]

    @classmethod
    def from_wire(cls, v: Any, kind: str) -> "TensorSpec":
        if type(v) is not list or len(v) != 3 or not (type(v[0]) is type(v[1]) is type(v[2]) is str):
            raise _bad(kind, "tensors", "a list of [name, role, codec] string triples", v)
        return cls(v[0], v[1], v[2])


def _tensors(meta: dict, kind: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_wire(v, kind) for v in _get(meta, kind, "tensors", list, []))


@dataclass(slots=True)
class Hello:
    """A request to check that the next tiers hold ``plan_hash`` and ``model_hash``; ``sender`` names the tier."""

    KIND: ClassVar[str] = HELLO
    plan_hash: str
    model_hash: str
    sender: str
    deadline_ms: float = DEFAULT_DEADLINE_MS

    def to_wire(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "model_hash": self.model_hash,
            "from": self.sender,
            "deadline_ms": self.deadline_ms,
        }

    @classmethod
    def from_wire(cls, meta: dict) -> "Hello":
        return cls(
            _get(meta, HELLO, "plan_hash", str),
            _get(meta, HELLO, "model_hash", str),
            _get(meta, HELLO, "from", str),
            _num(meta, HELLO, "deadline_ms", DEFAULT_DEADLINE_MS),
        )


@dataclass(slots=True)
class TierInfo:
    """What a tier reports about itself in a :class:`HelloReply`: its stages ``[start, stop)``, memory (bytes),
    load time (ms), emulated speed and process id."""

    tier: str
    plan_hash: str
    model_hash: str
    stages: tuple[int, int]
    loaded_param_bytes: int
    rss_bytes: int
    load_ms: float
    speed: float
    pid: int
    dilation: float = 1.0

    def to_wire(self) -> dict:
        return {
            "tier": self.tier,
            "plan_hash": self.plan_hash,
            "model_hash": self.model_hash,
            "stages": [self.stages[0], self.stages[1]],
            "loaded_param_bytes": self.loaded_param_bytes,
            "rss_bytes": self.rss_bytes,
            "load_ms": self.load_ms,
            "speed": self.speed,
            "pid": self.pid,
            "dilation": self.dilation,
        }

    to_json = to_wire

    @classmethod
    def from_wire(cls, meta: Any) -> "TierInfo":
        k = HELLO_REPLY
        if type(meta) is not dict:
            raise _bad(k, "chain", "a list of tier descriptions", meta)
        stages = _get(meta, k, "stages", list)
        if len(stages) != 2 or not all(type(s) is int for s in stages):
            raise _bad(k, "stages", "[start, stop]", stages)
        return cls(
            _get(meta, k, "tier", str),
            _get(meta, k, "plan_hash", str),
            _get(meta, k, "model_hash", str),
            (stages[0], stages[1]),
            _get(meta, k, "loaded_param_bytes", int),
            _get(meta, k, "rss_bytes", int),
            _num(meta, k, "load_ms"),
            _num(meta, k, "speed"),
            _get(meta, k, "pid", int),
            _num(meta, k, "dilation") if "dilation" in meta else 1.0,
        )


@dataclass(slots=True)
class HelloReply:
    """The answer to :class:`Hello`: the answering tier first, then every tier behind it."""

    KIND: ClassVar[str] = HELLO_REPLY
    chain: tuple[TierInfo, ...]

    def to_wire(self) -> dict:
        return {"chain": [t.to_wire() for t in self.chain]}

    @classmethod
    def from_wire(cls, meta: dict) -> "HelloReply":
        return cls(tuple(TierInfo.from_wire(t) for t in _get(meta, HELLO_REPLY, "chain", list)))


@dataclass(slots=True)
class Infer:
    """One step of one request: the boundary state (``tensors``, one frame each) that feeds stage ``stage``.

    ``max_new_tokens``: tokens the whole request generates; ``last``: the request's last step on this session
    (the receiver frees its KV cache after it); ``deadline_ms``: what is left of the request's deadline;
    ``traceparent``: the sender's W3C trace context (aiflow_cli/runtime/tracing.py; "" for none);
    ``temperature``, ``top_k``, ``top_p``, ``seed``: how the output tier picks the token
    (:class:`~aiflow_cli.models.sampling.Sampling`; temperature 0: greedy) and ``index``: the answer place of
    the token this step produces (the draws are keyed by it)."""

    KIND: ClassVar[str] = INFER
    plan_hash: str
    sender: str
    phase: Phase
    stage: int
    tensors: tuple[TensorSpec, ...]
    max_new_tokens: int = 0
    last: bool = True
    deadline_ms: float = DEFAULT_DEADLINE_MS
    traceparent: str = ""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0

    def to_wire(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "from": self.sender,
            "phase": self.phase,
            "stage": self.stage,
            "tensors": [t.to_wire() for t in self.tensors],
            "max_new_tokens": self.max_new_tokens,
            "last": self.last,
            "deadline_ms": self.deadline_ms,
            **({"traceparent": self.traceparent} if self.traceparent else {}),
            **(_sampling_wire(self) if self.temperature else {}),
        }

    @property
    def sampling(self) -> Sampling:
        """The sampling settings (one-line :class:`TransportError` naming the bad one)."""
        return _sampling_of(self, INFER)

    @classmethod
    def from_wire(cls, meta: dict) -> "Infer":
        # fast path (every decode step pays it): one test of every field; the slow path below names the bad one
        g = meta.get
        ph, sender, phase, stage, tensors = g("plan_hash"), g("from"), g("phase"), g("stage"), g("tensors", [])
        new, last, dl = g("max_new_tokens", 0), g("last", True), g("deadline_ms", DEFAULT_DEADLINE_MS)
        tp = g("traceparent", "")
        if (
            type(ph) is str
            and type(sender) is str
            and (phase == PREFILL or phase == DECODE)
            and type(stage) is int
            and 0 <= stage < _I64
            and type(new) is int
            and 0 <= new < _I64
            and type(last) is bool
            and (type(dl) is float or type(dl) is int)
            and dl == dl
            and type(tensors) is list
            and type(tp) is str
        ):
            specs = tuple([TensorSpec.from_wire(t, INFER) for t in tensors])
            msg = cls(ph, sender, phase, stage, specs, new, last, float(dl), tp)
            if "temperature" in meta:
                _sampling_from(meta, INFER, msg)
            return msg
        phase = _get(meta, INFER, "phase", str)
        if phase not in PHASES:
            raise TransportError(f"malformed infer message: unknown phase {phase[:20]!r} (expected prefill or decode)")
        stage = _get(meta, INFER, "stage", int)
        new = _get(meta, INFER, "max_new_tokens", int, 0)
        if stage < 0 or new < 0:
            raise TransportError(f"malformed infer message: stage {stage} and max_new_tokens {new} must be >= 0")
        return cls(
            _get(meta, INFER, "plan_hash", str),
            _get(meta, INFER, "from", str),
            phase,
            stage,
            _tensors(meta, INFER),
            new,
            _get(meta, INFER, "last", bool, True),
            _num(meta, INFER, "deadline_ms", DEFAULT_DEADLINE_MS),
            _get(meta, INFER, "traceparent", str, ""),
        )._sampled_from(meta)

    def _sampled_from(self, meta: dict) -> "Infer":
        if "temperature" in meta:
            _sampling_from(meta, INFER, self)
        return self

    def check(self) -> "Infer":
        """The checks beyond field types (a binary header guarantees the types): raises :class:`TransportError`."""
        if self.phase not in PHASES:
            raise TransportError(
                f"malformed infer message: unknown phase {self.phase[:20]!r} (expected {' or '.join(PHASES)})"
            )
        if self.stage < 0 or self.max_new_tokens < 0:
            raise TransportError(
                f"malformed infer message: stage {self.stage} and max_new_tokens {self.max_new_tokens} must be >= 0"
            )
        if self.deadline_ms != self.deadline_ms:
            raise _bad(INFER, "deadline_ms", "a number", self.deadline_ms)
        if self.temperature or self.index or self.top_k or self.seed or self.top_p != 1.0:
            _sampling_of(self, INFER)  # every field in range, even the ones greedy decoding ignores
        return self


@dataclass(slots=True)
class Verify:
    """One round of speculative decoding: the boundary state (``tensors``) of ``len(draft) + 1`` positions (the
    last accepted token, then the drafts) that feeds stage ``stage``. The receiver first crops its KV cache to
    ``cache_len`` positions (what the previous round did not accept: idempotent), then runs every position at
    once; the output tier answers with a :class:`Result` holding the greedy token after each position.
    ``draft``: the draft token ids (batch 1); ``remaining``: tokens the request may still emit (>= 1), so that
    every tier sees which round ends the request and frees its session then.
    Sampled rounds (``temperature`` > 0, the fields of :class:`Infer`; ``index``: the answer place of the first
    draft) carry ``dists``, each draft's distribution as the driver drew it, and the output tier answers by the
    rejection rule (:func:`aiflow_cli.models.sampling.verify_round`). ``traceparent`` as in :class:`Infer`.
    ``precheck``: a middle tier holding blocks may cut the round after the first draft its own exit rejects
    before forwarding it (greedy rounds; :mod:`aiflow_cli.runtime.precheck`); optional on the wire (absent: off)."""

    KIND: ClassVar[str] = VERIFY
    plan_hash: str
    sender: str
    stage: int
    tensors: tuple[TensorSpec, ...]
    cache_len: int
    draft: tuple[int, ...]
    remaining: int
    deadline_ms: float = DEFAULT_DEADLINE_MS
    traceparent: str = ""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    dists: tuple[DraftDist, ...] = ()
    precheck: bool = False

    def to_wire(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "from": self.sender,
            "stage": self.stage,
            "tensors": [t.to_wire() for t in self.tensors],
            "cache_len": self.cache_len,
            "draft": list(self.draft),
            "remaining": self.remaining,
            "deadline_ms": self.deadline_ms,
            **({"traceparent": self.traceparent} if self.traceparent else {}),
            **({"precheck": True} if self.precheck else {}),
            **(
                {**_sampling_wire(self), "dists": [[list(q.ids), list(q.probs)] for q in self.dists]}
                if self.temperature
                else {}
            ),
        }

    @property
    def sampling(self) -> Sampling:
        return _sampling_of(self, VERIFY)

    def hop(self, stage: int, tensors: tuple[TensorSpec, ...], deadline_ms: float, traceparent: str) -> "Verify":
        """The same round for the next tier: its stage, this hop's tensors, deadline and trace context."""
        return Verify(
            self.plan_hash, self.sender, stage, tensors, self.cache_len, self.draft, self.remaining, deadline_ms,
            traceparent, self.temperature, self.top_k, self.top_p, self.seed, self.index, self.dists, self.precheck,
        )  # fmt: skip

    @classmethod
    def from_wire(cls, meta: dict) -> "Verify":
        k = VERIFY
        stage, cache_len, remaining = (
            _get(meta, k, "stage", int),
            _get(meta, k, "cache_len", int),
            _get(meta, k, "remaining", int),
        )
        draft = _get(meta, k, "draft", list)
        if len(draft) > MAX_DRAFTS or not all(type(t) is int and t >= 0 for t in draft):
            raise _bad(k, "draft", f"a list of at most {MAX_DRAFTS} token ids", draft)
        if stage < 0 or cache_len < 0 or remaining < 1:
            raise TransportError(
                f"malformed verify message: stage {stage} and cache_len {cache_len} must be >= 0, remaining "
                f"{remaining} >= 1"
            )
        msg = cls(
            _get(meta, k, "plan_hash", str),
            _get(meta, k, "from", str),
            stage,
            _tensors(meta, k),
            cache_len,
            tuple(draft),
            remaining,
            _num(meta, k, "deadline_ms", DEFAULT_DEADLINE_MS),
            _get(meta, k, "traceparent", str, ""),
            precheck=_get(meta, k, "precheck", bool, False),
        )
        if "temperature" in meta:
            _sampling_from(meta, k, msg)
            raw = _get(meta, k, "dists", list, [])
            if len(raw) > len(draft) or not all(
                type(d) is list and len(d) == 2 and type(d[0]) is list and type(d[1]) is list
                and all(type(i) is int for i in d[0]) and all(type(p) in (int, float) for p in d[1])
                for d in raw
            ):  # fmt: skip
                raise _bad(k, "dists", "a list of [token ids, probabilities] pairs", raw)
            msg.dists = tuple(DraftDist(tuple(d[0]), tuple(float(p) for p in d[1])) for d in raw)
            if msg.temperature and len(msg.dists) != len(msg.draft):
                raise _bad(k, "dists", f"one distribution per draft ({len(msg.draft)})", raw)
            try:
                check_dists(msg.dists)
            except ValueError as e:
                raise TransportError(f"malformed {k} message: {e}") from None
        return msg

    def check_cache(self, held: Optional[int]) -> None:
        """Refuses a round whose ``cache_len`` is past the ``held`` positions of the receiver's KV cache (None:
        this tier caches no positions); a round only ever crops back (:class:`TransportError`)."""
        if held is not None and self.cache_len > held:
            raise TransportError(
                f"malformed verify message: cache_len {self.cache_len} is past the {held} positions this tier "
                f"holds for the session"
            )

    def check_output(self, positions: int, vocab: int) -> None:
        """The output tier's checks of a round against the full model's logits (``positions`` rows of ``vocab``
        tokens): one position per draft plus the pending token, every token id within the vocabulary."""
        if positions != len(self.draft) + 1:
            raise TransportError(
                f"malformed verify message: {len(self.draft)} drafts need {len(self.draft) + 1} positions, the "
                f"state holds {positions}"
            )
        if any(t >= vocab for t in self.draft) or any(i >= vocab for q in self.dists for i in q.ids):
            raise TransportError(f"malformed verify message: a draft token id is past the vocabulary ({vocab})")


@dataclass(slots=True)
class Result:
    """The answer to :class:`Infer`: generated ``tokens`` ([batch][n] ids) or output ``tensors`` (one frame
    each), and the figures of every tier that worked on the step."""

    KIND: ClassVar[str] = RESULT
    timings: Timings
    tokens: Optional[list[list[int]]] = None
    tensors: tuple[TensorSpec, ...] = ()

    def to_wire(self) -> dict:
        meta: dict[str, Any] = {"timings": self.timings.to_wire()}
        if self.tokens is not None:
            meta["tokens"] = self.tokens
        if self.tensors:
            meta["tensors"] = [t.to_wire() for t in self.tensors]
        return meta

    @classmethod
    def from_wire(cls, meta: dict) -> "Result":
        tokens = meta.get("tokens")
        if tokens is not None and not (
            type(tokens) is list and all(type(row) is list and all(type(t) is int for t in row) for row in tokens)
        ):
            raise _bad(RESULT, "tokens", "a list of lists of token ids", tokens)
        try:
            timings = Timings.from_wire(meta.get("timings"))
        except (TypeError, ValueError) as e:
            raise TransportError(f"malformed result message: field 'timings': {e}") from None
        return cls(timings, tokens, _tensors(meta, RESULT))

    @property
    def token_count(self) -> int:
        return sum(map(len, self.tokens or ()))


@dataclass(slots=True)
class Error:
    """A failed request: the :class:`AiflowError` class name, its message, the tier where it happened, and the
    parameter(s) the message names (:attr:`AiflowError.param`), if any."""

    KIND: ClassVar[str] = ERROR
    error_kind: str
    message: str
    tier: str
    param: Optional[str] = None

    def to_wire(self) -> dict:
        meta = {"error_kind": self.error_kind, "message": self.message, "tier": self.tier}
        if self.param:
            meta["param"] = self.param
        return meta

    @classmethod
    def from_wire(cls, meta: dict) -> "Error":
        # lenient: an error must still reach the user when a field is off
        param = meta.get("param")
        return cls(
            str(meta.get("error_kind", "RemoteError")),
            str(meta.get("message", "no message")),
            str(meta.get("tier", "?")),
            param if type(param) is str else None,
        )

    def exception(self) -> AiflowError:
        """The error as the exception to raise (its class when it names one of :mod:`aiflow_cli.errors`)."""
        cls = getattr(errors, self.error_kind, None)
        if not (isinstance(cls, type) and issubclass(cls, AiflowError)):
            cls = RemoteError
        msg = self.message if self.message.startswith(f"{self.tier}:") else f"{self.tier}: {self.message}"
        exc = cls(msg, param=self.param)
        exc.tier = self.tier  # type: ignore[attr-defined]
        return exc


#: Largest plan a :class:`Replan` may carry (characters of JSON); a SmolLM2 plan is about 20 KB.
MAX_PLAN_CHARS = 512 * 1024


@dataclass(slots=True)
class Replan:
    """A plan switch proposed by the device between requests (aiflow_cli/runtime/replan.py): every tier loads the
    stages ``plan`` gives it (the new plan's canonical JSON, whose SHA-256 is ``new_hash``) and serves requests
    of that plan hash from then on, while sessions opened under ``plan_hash`` (the sender's current plan) finish
    under it. Answered with a :class:`HelloReply` for the new plan. Anything malformed (fields, a plan that does
    not validate, a hash that does not match, another model) is refused with :class:`PeerRejected`."""

    KIND: ClassVar[str] = REPLAN
    plan_hash: str
    sender: str
    plan: str
    new_hash: str
    deadline_ms: float = DEFAULT_DEADLINE_MS

    def to_wire(self) -> dict:
        return {
            "plan_hash": self.plan_hash,
            "from": self.sender,
            "plan": self.plan,
            "new_hash": self.new_hash,
            "deadline_ms": self.deadline_ms,
        }

    @classmethod
    def from_wire(cls, meta: dict) -> "Replan":
        try:
            msg = cls(
                _get(meta, REPLAN, "plan_hash", str),
                _get(meta, REPLAN, "from", str),
                _get(meta, REPLAN, "plan", str),
                _get(meta, REPLAN, "new_hash", str),
                _num(meta, REPLAN, "deadline_ms", DEFAULT_DEADLINE_MS),
            )
        except TransportError as e:
            raise PeerRejected(str(e)) from None
        if len(msg.plan) > MAX_PLAN_CHARS:
            raise PeerRejected(
                f"malformed replan message: the plan has {len(msg.plan)} characters (at most {MAX_PLAN_CHARS})"
            )
        return msg

    def new_plan(self) -> Plan:
        """The proposed plan, validated, its hash checked against ``new_hash`` (:class:`PeerRejected` if not)."""
        from pydantic import ValidationError

        try:
            plan = Plan.model_validate_json(self.plan)
        except ValidationError as e:
            first = e.errors()[0] if e.errors() else {"loc": (), "msg": str(e)}
            where = ".".join(str(x) for x in first.get("loc", ())) or "plan"
            raise PeerRejected(
                f"malformed replan message: the plan does not validate: {where}: {first.get('msg', '')[:80]}"
            ) from None
        if plan_hash(plan) != self.new_hash:
            raise PeerRejected(
                f"malformed replan message: the plan hashes to {plan_hash(plan)[:12]}, the message says {self.new_hash[:12]}"
            )
        return plan


@dataclass(slots=True)
class End:
    """The end of a failed request's session (the envelope's ``session_id``): the receiver drops its session of
    that id from this sender and sends an :class:`End` on to the next tier; answered with an :class:`End`."""

    KIND: ClassVar[str] = END
    plan_hash: str
    sender: str
    deadline_ms: float = DEFAULT_DEADLINE_MS

    def to_wire(self) -> dict:
        return {"plan_hash": self.plan_hash, "from": self.sender, "deadline_ms": self.deadline_ms}

    @classmethod
    def from_wire(cls, meta: dict) -> "End":
        return cls(
            _get(meta, END, "plan_hash", str),
            _get(meta, END, "from", str),
            _num(meta, END, "deadline_ms", DEFAULT_DEADLINE_MS),
        )


# -- batched steps: one message per link per batch pass ------------------------------------------------------------
INFER_BATCH, RESULT_BATCH = "infer_batch", "result_batch"
#: Most sessions one :class:`InferBatch` (or :class:`ResultBatch`) may carry (a sender splits larger batches).
MAX_BATCH_SESSIONS = 512
#: Most frame bytes one batch message may carry (all sessions together).
MAX_BATCH_BYTES = 256 << 20


def _batch_count(kind: str, key: str, raw: list) -> None:
    if not 1 <= len(raw) <= MAX_BATCH_SESSIONS:
        raise TransportError(
            f"malformed {kind} message: {len(raw)} entries in {key!r} (1 to {MAX_BATCH_SESSIONS} sessions a batch)"
        )


def _batch_bytes(kind: str, frames: Sequence[FrameLike]) -> None:
    n = sum(len(f) for f in frames)
    if n > MAX_BATCH_BYTES:
        raise TransportError(f"malformed {kind} message: {n} frame bytes (at most {MAX_BATCH_BYTES} a batch)")


def _split_frames(parts: Sequence[Any], frames: Sequence[FrameLike]) -> list[list[FrameLike]]:
    """``frames`` cut into one list per part (``len(part.tensors)`` each, in order)."""
    out, at = [], 0
    for part in parts:
        n = len(part.tensors)
        out.append(list(frames[at : at + n]))
        at += n
    return out


@dataclass(slots=True)
class BatchStep:
    """One session's step in an :class:`InferBatch`: its transport session id and its :class:`Infer` (whose
    ``plan_hash`` and ``sender`` are the batch's)."""

    session_id: int
    infer: Infer


@dataclass(slots=True)
class InferBatch:
    """The steps of several sessions that one tier's batch pass produced, sent on as one message: each session's
    :class:`Infer` fields (phase, stage, tensors, sampling, deadline, trace context) and session id; the frames are
    every step's frames in step order. ``deadline_ms``: the latest of the steps' deadlines (the message's own).
    Answered with one :class:`ResultBatch` (a result or an error per step, in step order), or with an
    :class:`Error` when the message itself is refused (malformed, oversized: at most :data:`MAX_BATCH_SESSIONS`
    sessions and :data:`MAX_BATCH_BYTES` frame bytes, distinct session ids)."""

    KIND: ClassVar[str] = INFER_BATCH
    plan_hash: str
    sender: str
    steps: tuple[BatchStep, ...]
    deadline_ms: float = DEFAULT_DEADLINE_MS

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(t for s in self.steps for t in s.infer.tensors)

    def to_wire(self) -> dict:
        steps = []
        for s in self.steps:
            w = s.infer.to_wire()
            del w["plan_hash"], w["from"]
            w["session"] = s.session_id
            steps.append(w)
        return {"plan_hash": self.plan_hash, "from": self.sender, "deadline_ms": self.deadline_ms, "steps": steps}

    @classmethod
    def from_wire(cls, meta: dict) -> "InferBatch":
        k = INFER_BATCH
        ph, sender = _get(meta, k, "plan_hash", str), _get(meta, k, "from", str)
        raw = _get(meta, k, "steps", list)
        _batch_count(k, "steps", raw)
        steps, seen = [], set()
        for e in raw:
            if type(e) is not dict:
                raise _bad(k, "steps", "a list of step objects", e)
            sid = e.get("session")
            if type(sid) is not int or not 0 <= sid < (1 << 64):
                raise _bad(k, "session", "a session id (u64)", sid)
            if sid in seen:
                raise TransportError(f"malformed {k} message: session {sid} appears twice in one batch")
            seen.add(sid)
            steps.append(BatchStep(sid, Infer.from_wire({**e, "plan_hash": ph, "from": sender})))
        return cls(ph, sender, tuple(steps), _num(meta, k, "deadline_ms", DEFAULT_DEADLINE_MS))

    def check_frames(self, frames: Sequence[FrameLike]) -> None:
        _batch_bytes(INFER_BATCH, frames)

    def split(self, frames: Sequence[FrameLike]) -> list[tuple[BatchStep, list[FrameLike]]]:
        """Each step with its own frames."""
        return list(zip(self.steps, _split_frames([s.infer for s in self.steps], frames)))


@dataclass(slots=True)
class ResultBatch:
    """The answer to :class:`InferBatch`: per step, in step order, its :class:`Result` or the :class:`Error` that
    step alone failed with (one session's failure fails only that session); frames: every result's frames in order."""

    KIND: ClassVar[str] = RESULT_BATCH
    results: tuple[Union[Result, Error], ...]

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return tuple(t for r in self.results if isinstance(r, Result) for t in r.tensors)

    def to_wire(self) -> dict:
        return {
            "results": [
                {"result": r.to_wire()} if isinstance(r, Result) else {"error": r.to_wire()} for r in self.results
            ]
        }

    @classmethod
    def from_wire(cls, meta: dict) -> "ResultBatch":
        k = RESULT_BATCH
        raw = _get(meta, k, "results", list)
        _batch_count(k, "results", raw)
        out: list[Union[Result, Error]] = []
        for e in raw:
            if type(e) is dict and len(e) == 1 and type(e.get("result")) is dict:
                out.append(Result.from_wire(e["result"]))
            elif type(e) is dict and len(e) == 1 and type(e.get("error")) is dict:
                out.append(Error.from_wire(e["error"]))
            else:
                raise _bad(k, "results", "a list of {result: ...} or {error: ...} objects", e)
        return cls(tuple(out))

    def check_frames(self, frames: Sequence[FrameLike]) -> None:
        _batch_bytes(RESULT_BATCH, frames)

    def split(self, frames: Sequence[FrameLike]) -> list[Union[tuple[Result, list[FrameLike]], Error]]:
        """Each step's result with its own frames, or its error."""
        ok = [r for r in self.results if isinstance(r, Result)]
        mine = iter(zip(ok, _split_frames(ok, frames)))
        return [next(mine) if isinstance(r, Result) else r for r in self.results]


Request = Union[Hello, Infer, Verify, Replan, InferBatch, End]
Reply = Union[HelloReply, Result, Error, ResultBatch, End]
AnyMessage = Union[Hello, HelloReply, Infer, Verify, Replan, Result, Error, InferBatch, ResultBatch, End]

#: Every message class by its kind.
MESSAGES: dict[str, Any] = {
    c.KIND: c for c in (Hello, HelloReply, Infer, Verify, Replan, Result, Error, InferBatch, ResultBatch, End)
}
#: Messages that carry one frame per entry of ``tensors``.
_WITH_FRAMES = (Infer, Verify, Result, InferBatch, ResultBatch)
#: Messages whose frames are bounded in all (``check_frames``).
_BATCHES = (InferBatch, ResultBatch)
#: Messages sent with a binary header (one line per message; the layout is derived from the dataclass).
BINARY: dict[str, HeaderCodec] = {c.KIND: HeaderCodec(c, PROTOCOL_VERSION) for c in (Infer, Result)}


# -- the envelope -----------------------------------------------------------------------------------------------
def encode(msg: AnyMessage, frames: Sequence[FrameLike] = (), session_id: int = 0, *, binary: bool = True) -> Message:
    """The transport envelope of ``msg`` (its frames, if it carries tensors, in ``tensors`` order); with a binary
    header when its kind has one (:data:`BINARY`) and ``binary``, else as JSON."""
    codec = BINARY.get(msg.KIND) if binary else None
    if codec is not None:
        return Message(msg.KIND, codec.encode(msg), list(frames), session_id)
    meta = msg.to_wire()
    meta["v"] = PROTOCOL_VERSION
    return Message(msg.KIND, meta, list(frames), session_id)


def check_version(meta: dict) -> None:
    """Refuses a message of another protocol version (:class:`PeerRejected`, naming both versions)."""
    v = meta.get("v", 1)
    if v != PROTOCOL_VERSION:
        raise PeerRejected(
            f"protocol version mismatch: this tier speaks version {PROTOCOL_VERSION}, the peer sent "
            f"version {str(v)[:20]}; run the same aiflow version on every tier"
        )


def decode(env: Message) -> AnyMessage:
    """Validates a received envelope into its message class; raises :class:`PeerRejected` for another protocol
    version, :class:`TransportError` for an unknown kind or a malformed field. An :class:`Error` of another
    version is still decoded, so that the peer's reason (often that very mismatch) reaches the user."""
    cls = MESSAGES.get(env.kind)
    if cls is None:
        raise TransportError(f"unknown message kind {env.kind[:40]!r} (expected one of {', '.join(MESSAGES)})")
    meta = env.meta
    if isinstance(meta, bytes):
        codec = BINARY.get(env.kind)
        if codec is None:
            raise TransportError(f"a {env.kind[:40]} message has no binary form (expected JSON)")
        msg = codec.decode(meta)
        check = getattr(msg, "check", None)  # checks beyond the field types (Infer.check)
        if check is not None:
            check()
    else:
        if type(meta) is not dict:
            raise TransportError(f"malformed {env.kind} message: its meta is not a JSON object")
        if meta.get("v") != PROTOCOL_VERSION and cls is not Error:
            check_version(meta)
        msg = cls.from_wire(meta)
    if cls in _WITH_FRAMES and len(msg.tensors) != len(env.frames):
        raise TransportError(
            f"malformed {env.kind} message: it lists {len(msg.tensors)} tensors but carries {len(env.frames)} frames"
        )
    if cls in _BATCHES:
        msg.check_frames(env.frames)
    return msg


def expect_reply(env: Message, cls: Any) -> Any:
    """The reply ``env`` decoded as ``cls``; raises the error an :class:`Error` reply carries, or
    :class:`TransportError` for a reply of another kind."""
    msg = decode(env)
    if isinstance(msg, Error):
        raise msg.exception()
    if not isinstance(msg, cls):
        raise TransportError(f"expected a {cls.KIND} reply, got {env.kind!r}")
    return msg


def error_reply(tier: str, exc: BaseException) -> Message:
    """The reply that carries ``exc`` back up the chain (its class when it is an :class:`AiflowError`)."""
    return encode(error_of(tier, exc))


def error_of(tier: str, exc: BaseException) -> Error:
    """``exc`` as an :class:`Error` of ``tier`` (its class when it is an :class:`AiflowError`)."""
    if isinstance(exc, AiflowError):
        kind = type(exc).__name__
        origin = getattr(exc, "tier", None) or tier
    else:
        kind, origin = "RemoteError", tier
        exc = RemoteError(f"{type(exc).__name__}: {exc}")
    return Error(kind, str(exc), origin, getattr(exc, "param", None))


# -- checks -----------------------------------------------------------------------------------------------------
def plan_hash(plan: Plan) -> str:
    """SHA-256 of the plan's canonical JSON: two tiers agree on a plan iff they hold byte-equal plans."""
    text = json.dumps(plan.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_peer(tier: str, plan: Plan, my_plan_hash: str, msg: Request) -> None:
    """Refuses a peer whose plan or model differs from ours, saying which side holds what."""
    if msg.plan_hash != my_plan_hash:
        raise PeerRejected(
            f"plan mismatch: {tier} holds plan {my_plan_hash[:12]} ({plan.summary()}), {msg.sender} sent "
            f"{msg.plan_hash[:12] or 'none'}; give every tier the same plan file"
        )
    model_hash = getattr(msg, "model_hash", None)
    if model_hash is not None and model_hash != plan.model_hash:
        raise PeerRejected(
            f"model mismatch: {tier} runs {plan.model} (hash {plan.model_hash[:12]}), {msg.sender} runs hash "
            f"{model_hash[:12]}"
        )
