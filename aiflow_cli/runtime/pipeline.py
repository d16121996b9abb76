"""The device side of a plan: :class:`Pipeline` runs requests through device -> edge -> cloud.

    with Pipeline("plan.json", edge="10.0.0.2:4433", identity="keys/device", trust=[edge_fp]) as p:
        p.hello()                                    # checks every tier holds the same plan and model
        r = p.run(image=PIL.Image.open("cat.jpg"))   # or text="...", or inputs={...}
        print(r.text or r.output, r.total_ms, r.timings.to_json())

``speculate=K`` (or ``"auto"``) makes the device draft K tokens per round with its own layers and the upper tiers
verify them in one round trip (:mod:`aiflow_cli.runtime.speculate`): greedy output unchanged, fewer round trips.
``draft`` says what drafts (:mod:`aiflow_cli.runtime.drafters`): ``auto`` (default: the trained exit of the device's
last block when ``aiflow draft train`` made one, else the untrained exit), ``exit``, ``untrained`` or a draft MODEL.
``precheck=True`` has the edge cut each greedy round after the first draft its own exit rejects, so the cloud
verifies fewer positions (:mod:`aiflow_cli.runtime.precheck`).

``replan=True`` measures the device's link and, when another plan is predicted better on it by a margin, switches
every tier to that plan between requests (:mod:`aiflow_cli.runtime.replan`). Off by default.

``fallback="local"`` finishes a request on the device (its own stages plus a local copy of the rest, loaded on
first need) when the upper tiers cannot be reached or time out; the result says so.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from aiflow_cli import codec
from aiflow_cli.errors import InputError, PeerRejected, TransportError
from aiflow_cli.models import StagedModel, load_stages
from aiflow_cli.models.sampling import GREEDY, Sampling
from aiflow_cli.models.state import BoundaryState
from aiflow_cli.plan.schema import Plan, load_plan
from aiflow_cli.runtime import tracing
from aiflow_cli.runtime.drafters import make_drafter
from aiflow_cli.runtime.node import DEFAULT_CACHE_BYTES, Payload, TierNode
from aiflow_cli.runtime.protocol import PREFILL
from aiflow_cli.runtime.roles import check_next_hop
from aiflow_cli.runtime.routing import connect
from aiflow_cli.runtime.speculate import SpecPolicy, Speculate, parse_speculate, unsupported
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.transport import Identity, Limits

Fallback = Literal["none", "local"]

#: Tokens generated when the caller does not say (the plan's own figure when it was solved for generation).
DEFAULT_NEW_TOKENS = 16


@dataclass
class RunResult:
    """One request's answer and how it went."""

    tokens: Optional[torch.Tensor]
    """[B, n] generated token ids (generating models)."""
    output: Optional[torch.Tensor]
    """The output tensor (embeddings, class logits) of non-generating models."""
    text: Optional[list[str]]
    """Generated token ids as text (byte tokenizer for built-ins, the model's tokenizer otherwise)."""
    total_ms: float
    timings: Timings
    fallback: Optional[str] = None
    """Why the request finished locally (``fallback="local"``), or None."""
    speculation: Optional[dict[str, Any]] = None
    """Rounds, drafts and acceptance of a speculative generation (``speculate``), or None."""
    replan: Optional[dict[str, Any]] = None
    """With ``replan``: the link as measured so far, and the plan switch made after this request, if any."""

    def to_json(self, plan: Optional[Plan] = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "total_ms": round(self.total_ms, 3),
            "timings": self.timings.to_json(),
            "fallback": self.fallback,
        }
        if self.speculation is not None:
            out["speculation"] = self.speculation
        if self.replan is not None:
            out["replan"] = self.replan
        if self.tokens is not None:
            out["tokens"] = self.tokens.tolist()
            out["text"] = self.text
        if self.output is not None:
            out["output_shape"] = list(self.output.shape)
            out["output"] = self.output.flatten()[:16].tolist()
        if plan is not None:
            out["predicted"] = predicted(plan)
        return out


def predicted(plan: Plan) -> dict[str, Any]:
    """The plan's prediction in the shape of :class:`Timings` (ms), for side-by-side printing."""
    p = plan.prediction
    links: dict[str, float] = {}
    for d in (p.transfer_ms, p.rtt_ms):
        for k, v in d.items():
            links[k] = links.get(k, 0.0) + v
    return {
        "total_ms": p.total_ms,
        "compute_ms": dict(p.compute_ms),
        "codec_ms": dict(p.codec_ms),
        "link_ms": links,
        "tokens": p.tokens,
    }


def precheck_unsupported(plan: Plan) -> Optional[str]:
    """Why the edge of ``plan`` cannot pre-check drafts (None when it can): it must run blocks, and the cloud
    stages after them."""
    edge, cloud = plan.stages_for("edge"), plan.stages_for("cloud")
    if len(edge) == 0:
        return f"the plan runs no stage on the edge ({plan.summary()}): it has no exit to pre-check with"
    if len(cloud) == 0:
        return f"the edge is the plan's last computing tier ({plan.summary()}): it verifies the drafts itself"
    return None


def detokenize(model: StagedModel, tokens: torch.Tensor) -> list[str]:
    """Token ids -> answer text per row (see :meth:`StagedModel.decode_text`)."""
    return model.decode_text(tokens)


class Pipeline:
    """The device tier of ``plan`` (a :class:`Plan` or a path), talking to the next tier at ``edge``.

    ``timeout_s`` bounds a whole request (every tier's work and every round trip); ``speed`` and ``dilation``
    emulate another device (see :class:`TierNode`). Thread-safe for concurrent :meth:`run` calls.
    """

    def __init__(
        self,
        plan: Plan | str | Path,
        *,
        edge: Optional[str],
        identity: Identity | str | Path,
        trust: Sequence[str | Identity],
        timeout_s: float = 60.0,
        fallback: Fallback = "none",
        speed: float = 1.0,
        limits: Optional[Limits] = None,
        dilation: float = 1.0,
        speculate: Speculate = None,
        draft: Optional[str] = None,
        replan: Any = False,
        precheck: bool = False,
    ):
        self.plan = plan if isinstance(plan, Plan) else load_plan(plan)
        if fallback not in ("none", "local"):
            raise InputError(f"fallback={fallback!r}: choose none or local", param="fallback")
        if timeout_s <= 0:
            raise InputError(f"timeout_s={timeout_s}: must be > 0 seconds", param="timeout_s")
        upper = check_next_hop(self.plan, "device", bool(edge), "edge")
        client = None
        if edge and (upper or replan):  # a re-plan may move stages up: keep the connection
            # edge="A,B,...": a pool of edge replicas (docs/scale.md)
            client = connect(edge, identity=identity, trust=trust, limits=limits, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.fallback = fallback
        k = parse_speculate(speculate)
        if draft is not None and k is None:
            raise InputError(
                f"draft={draft}: drafts are for speculation; give `speculate` too", param="draft,speculate"
            )
        drafter = None
        if k is not None and self.plan.stages_for("device").stop > 0:
            skeleton = load_stages(self.plan.model, [])
            drafter = make_drafter(draft, skeleton, self.plan.stages_for("device").stop)
        self.node = TierNode(
            self.plan,
            "device",
            next_client=client,
            speed=speed,
            cache_limit_bytes=DEFAULT_CACHE_BYTES,
            dilation=dilation,
            exit_head=k is not None and (drafter is None or drafter.needs_head),
        )
        self.node.drafter = drafter
        self.speculate: Optional[SpecPolicy] = None
        """The speculation policy of this device's generations (None: one round trip per token)."""
        if k is not None:
            why = unsupported(self.node.model) or (
                None
                if self.node.is_driver
                else f"the plan runs no decode stage on the device ({self.plan.summary()}): nothing to draft with"
            )
            if why:
                raise InputError(f"speculate={k}: {why}", param="speculate")
            self.speculate = SpecPolicy(k, precheck=precheck)
        if precheck:
            why = precheck_unsupported(self.plan) if k is not None else "pre-checking is of drafts; give `speculate`"
            if why:
                raise InputError(f"precheck: {why}", param="precheck")
        self._local: Optional[StagedModel] = None
        self._client, self._speed, self._dilation, self._draft = client, speed, dilation, draft
        self.replanner = None
        """Re-planning when the link changes (``replan``: True or a ReplanConfig; aiflow_cli/runtime/replan.py)."""
        if replan:
            from aiflow_cli.runtime.replan import ReplanConfig, Replanner

            if client is None:
                raise InputError("replan: give the edge's address (edge=HOST:PORT)", param="replan,edge")
            self.replanner = Replanner(self.plan, replan if isinstance(replan, ReplanConfig) else ReplanConfig())
            self.node.on_link = self.replanner.observe

    @property
    def model(self) -> StagedModel:
        """The device's part of the model (it can prepare inputs even when it runs no stage)."""
        return self.node.model

    def hello(self) -> list[dict[str, Any]]:
        """Checks that every tier holds this plan and model; returns each tier's description (device first)."""
        return [self.node.describe()] + self.node.hello_chain(time.monotonic() + self.timeout_s)

    def prepare(self, *, text: Any = None, image: Any = None) -> BoundaryState:
        """The request's raw input, what stage 0 (``input.prepare``) reads: the token ids of ``text``, or ``image``
        (a PIL image, a path or encoded bytes) as its encoded file (a JPEG stays a JPEG; PIL images go as lossless
        PNG). Whichever tier the plan gives stage 0 decodes it (see :meth:`StagedModel.raw_input`)."""
        return self.model.raw_input(text=text, image=image)

    def run(
        self,
        *,
        text: Any = None,
        image: Any = None,
        inputs: Optional[BoundaryState] = None,
        max_new_tokens: Optional[int] = None,
        sampling: Sampling = GREEDY,
    ) -> RunResult:
        """Runs one request (one of ``text``, ``image``, ``inputs``); generating models return ``max_new_tokens``
        tokens (default: the plan's, else 16), greedy unless ``sampling`` says otherwise (the same seed gives the
        same tokens with every plan, and with the local fallback)."""
        if inputs is None:
            inputs = self.prepare(text=text, image=image)
        n = 0
        if self.node.generates:
            n = max_new_tokens or self.plan.prediction.tokens or DEFAULT_NEW_TOKENS
            if n < 1:
                raise InputError(f"max_new_tokens={n}: must be >= 1", param="max_new_tokens")
        key = ("local", random.getrandbits(63))
        t0 = time.perf_counter()
        node = self.node  # a re-plan after another request swaps it: this request finishes under its plan
        try:
            with tracing.span("aiflow request", tier="device"):  # a new trace; every tier continues it
                r = node.step(
                    key,
                    PREFILL,
                    0,
                    Payload(state=inputs),
                    max_new_tokens=n,
                    last=n <= 1,
                    deadline=time.monotonic() + self.timeout_s,
                    speculate=self.speculate,
                    sampling=sampling,
                )
        except TransportError as e:
            if self.fallback != "local" or isinstance(e, PeerRejected):
                raise
            return self._run_locally(inputs, n, t0, reason=str(e), sampling=sampling)
        total = (time.perf_counter() - t0) * 1e3
        r.timings.tier("device").handle_ms = total
        output = r.output
        if output is None and r.output_packed is not None:
            output = codec.decode(r.output_packed.frames[0])
        text_out = detokenize(self.model, r.tokens) if r.tokens is not None else None
        spec = r.spec.to_json() if r.spec is not None else None
        result = RunResult(
            tokens=r.tokens, output=output, text=text_out, total_ms=total, timings=r.timings, speculation=spec
        )
        if self.replanner is not None:  # between requests: this one is done
            from aiflow_cli.runtime.replan import after_request

            result.replan = after_request(self)
        return result

    def _run_locally(
        self, inputs: BoundaryState, n: int, t0: float, reason: str, sampling: Sampling = GREEDY
    ) -> RunResult:
        if self._local is None:
            self._local = load_stages(self.plan.model, None)
        m = self._local
        t1 = time.perf_counter()
        tokens = output = None
        if m.generates:
            tokens = m.generate(inputs, n, sampling=sampling)
        else:
            output = m.output(m.run(inputs))
        timings = Timings()
        timings.tier("device").compute_ms = (time.perf_counter() - t1) * 1e3
        total = (time.perf_counter() - t0) * 1e3
        timings.tier("device").handle_ms = total
        return RunResult(
            tokens=tokens,
            output=output,
            text=detokenize(m, tokens) if tokens is not None else None,
            total_ms=total,
            timings=timings,
            fallback=reason,
        )

    def close(self) -> None:
        if self.node.next is not None:
            self.node.next.close()
        elif self._client is not None:
            self._client.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
