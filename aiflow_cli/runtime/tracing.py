"""W3C trace context of a request (https://www.w3.org/TR/trace-context/), so that one device-edge-cloud request
can be followed across the tiers.

The device starts a trace per request; every ``infer`` message carries the sender's ``traceparent``
(``00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>``) and each tier continues it with a span of
its own. Without OpenTelemetry the ids are only propagated (and logged by whoever wants them); when the
``opentelemetry`` API is importable and the user configured a tracer provider (an exporter: e.g. the SDK set up
in code, or ``opentelemetry-instrument``), each tier's work is also recorded as a span of that trace.

A malformed ``traceparent`` from a peer is ignored (the tier starts a new trace), as the W3C text says.
"""

from __future__ import annotations

import os
import re
import secrets
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional

#: version 00: trace id, parent (span) id, flags; all-zero ids are invalid.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
#: Sampled: a collector keeps the trace.
SAMPLED = "01"

#: The traceparent this thread's current work sends to the next tier ("" outside a request).
_current: ContextVar[str] = ContextVar("aiflow_traceparent", default="")


_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse(traceparent: str) -> Optional[tuple[str, str, str]]:
    """``(trace_id, span_id, flags)`` of a valid traceparent, else None."""
    m = _TRACEPARENT.fullmatch(traceparent) if type(traceparent) is str else None
    if m is None:
        return None
    trace_id, span_id, flags = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags


def _format(trace_id: str, span_id: str, flags: str) -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def child_of(traceparent: str) -> str:
    """A new span of ``traceparent``'s trace (a new trace if it is empty or malformed)."""
    p = parse(traceparent)
    trace_id, flags = (p[0], p[2]) if p else (secrets.token_hex(16), SAMPLED)
    return _format(trace_id, os.urandom(8).hex(), flags)


def current() -> str:
    """The traceparent to send with this thread's next message ("" outside a request)."""
    return _current.get()


#: OpenTelemetry's trace API once imported (False: not looked for yet; None: not installed). Imported on the
#: first request, not at start-up (the import takes ~65 ms), and only once: a repeated import statement cost
#: ~20 us per handled request.
_otel_trace: Any = False
#: (provider, its aiflow tracer or None) as last looked up: a provider is set once, so the lookup is per change.
_otel_last: tuple[Any, Any] = (None, None)


def _otel_tracer() -> Any:
    """OpenTelemetry's tracer if the API is importable and a real tracer provider is configured, else None (the
    provider is looked up per call: a user may configure one after the first request)."""
    global _otel_trace
    if _otel_trace is False:
        try:
            from opentelemetry import trace as api
        except ImportError:
            api = None  # type: ignore[assignment]
        _otel_trace = api
    trace = _otel_trace
    if trace is None:
        return None
    global _otel_last
    provider = trace.get_tracer_provider()
    last, tracer = _otel_last
    if provider is last:
        return tracer
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        tracer = None  # nothing configured: spans would go nowhere
    else:
        tracer = trace.get_tracer("aiflow")
    _otel_last = (provider, tracer)
    return tracer


@contextmanager
def span(name: str, traceparent: str = "", **attributes: Any) -> Iterator[str]:
    """This tier's span ``name``, a child of ``traceparent`` (a new trace when it is ""), current for the block:
    messages sent meanwhile carry it (:func:`current`). Yields its traceparent. Recorded in OpenTelemetry when
    that is configured (see the module docstring)."""
    tracer = _otel_tracer()
    if tracer is None:
        token = _current.set(child_of(traceparent))
        try:
            yield _current.get()
        finally:
            _current.reset(token)
        return
    from opentelemetry import propagate

    ctx = propagate.extract({"traceparent": traceparent}) if parse(traceparent) else None
    with tracer.start_as_current_span(name, context=ctx, attributes=attributes):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        token = _current.set(carrier.get("traceparent") or child_of(traceparent))
        try:
            yield _current.get()
        finally:
            _current.reset(token)


@contextmanager
def spans(steps: list[tuple[str, str]], **attributes: Any) -> Iterator[list[str]]:
    """One span per ``(name, traceparent)`` of ``steps`` (the session steps of one batched pass: each continues
    its own request's trace), open for the block but none of them current; yields their traceparents, in order,
    for each step's message to the next tier. Recorded in OpenTelemetry when that is configured."""
    tracer = _otel_tracer()
    if tracer is None:
        yield [child_of(tp) for _, tp in steps]
        return
    from opentelemetry import context, propagate, trace

    opened = []
    try:
        for name, tp in steps:  # a step without a valid parent starts its own trace (not a child of the current)
            ctx = propagate.extract({"traceparent": tp}) if parse(tp) else context.Context()
            opened.append(tracer.start_span(name, context=ctx, attributes=attributes))
        out = []
        for s in opened:
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(s))
            out.append(carrier.get("traceparent") or child_of(""))
        yield out
    finally:
        for s in opened:
            s.end()
