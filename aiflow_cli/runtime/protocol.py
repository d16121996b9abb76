"""The runtime's messages on top of the transport, and how errors cross tiers.

Kinds (requests go down the chain device -> edge -> cloud, replies come back up):

- ``hello``: ``{plan_hash, model_hash, from}`` -> ``{tier, plan_hash, model_hash, stages, loaded_param_bytes,
  rss_bytes, next}``. Each server answers for itself and (when it forwards) for the tiers behind it, so the
  device learns the whole chain in one round trip. A mismatch is refused naming the side that differs.
- ``infer``: one step of one request. ``meta`` = ``{plan_hash, phase: "prefill" | "decode", stage, tensors,
  max_new_tokens, last, deadline_ms}``; ``stage`` is the index of the first stage the carried state feeds;
  ``tensors`` (see :mod:`aiflow_cli.runtime.wire`) describes the frames. ``session_id`` (transport header) names
  the request across its decode steps.
- replies: ``result`` = ``{tensors, tokens?, timings}`` with the output frames, or ``error`` =
  ``{error_kind, message, tier}``, re-raised on the device as the same :class:`AiflowError` class.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiflow_cli import errors
from aiflow_cli.errors import AiflowError, PeerRejected, RemoteError
from aiflow_cli.plan.schema import Plan
from aiflow_cli.transport import Message

HELLO, INFER, RESULT, ERROR = "hello", "infer", "result", "error"
PREFILL, DECODE = "prefill", "decode"


def plan_hash(plan: Plan) -> str:
    """SHA-256 of the plan's canonical JSON: two tiers agree on a plan iff they hold byte-equal plans."""
    text = json.dumps(plan.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_peer(tier: str, plan: Plan, my_plan_hash: str, meta: dict[str, Any]) -> None:
    """Refuses a peer whose plan or model differs from ours, saying which side holds what."""
    theirs = meta.get("plan_hash")
    sender = meta.get("from", "the peer")
    if theirs != my_plan_hash:
        raise PeerRejected(
            f"plan mismatch: {tier} holds plan {my_plan_hash[:12]} ({plan.summary()}), {sender} sent "
            f"{str(theirs)[:12] or 'none'}; give every tier the same plan file"
        )
    if meta.get("model_hash") not in (None, plan.model_hash):
        raise PeerRejected(
            f"model mismatch: {tier} runs {plan.model} (hash {plan.model_hash[:12]}), {sender} runs hash "
            f"{str(meta.get('model_hash'))[:12]}"
        )


def error_reply(tier: str, exc: BaseException) -> Message:
    """The reply that carries ``exc`` back up the chain (its class when it is an :class:`AiflowError`)."""
    if isinstance(exc, AiflowError):
        kind = type(exc).__name__
        origin = getattr(exc, "tier", None) or tier
    else:
        kind, origin = "RemoteError", tier
        exc = RemoteError(f"{type(exc).__name__}: {exc}")
    return Message(ERROR, {"error_kind": kind, "message": str(exc), "tier": origin})


def raise_error_reply(reply: Message) -> None:
    """Raises the :class:`AiflowError` an ``error`` reply carries (tagged with ``.tier``); returns otherwise."""
    if reply.kind != ERROR:
        return
    meta = reply.meta
    cls = getattr(errors, str(meta.get("error_kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, AiflowError)):
        cls = RemoteError
    tier = str(meta.get("tier", "?"))
    message = str(meta.get("message", "no message"))
    exc = cls(message if message.startswith(f"{tier}:") else f"{tier}: {message}")
    exc.tier = tier  # type: ignore[attr-defined]
    raise exc
