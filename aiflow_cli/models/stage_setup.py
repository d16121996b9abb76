"""The per-forward setup of a run of consecutive stages, built once and shared by its block stages.

A block stage builds what the model's ``forward`` builds once per forward before its layers: the 4-D attention
mask (``create_causal_mask`` & co.), the rotary position embeddings. Run one stage at a time, every block pays it
again (10-15 % of a small model's step). Inside :func:`shared_setup` (``StagedModel.run``, a tier's
``run_stages``) a block asks :func:`setup` instead, which returns the value an earlier block of the same run built
from the same inputs, or builds it. Outside one (the profiler timing stages one by one, a lone ``run_stage``) every
call builds, as before.

Reuse is exact, never a guess: an entry is reused only when every input the builder reads is the same - the same
tensor objects (``is``; at the same version where torch tracks one: inference tensors track none, and no stage
changes a boundary's control tensors in place), and equal plain values (shapes, dtypes, the layer's KV cache
sizes, the layer type). The builder is the library's own function, so a reused value is the
tensor that call would return again: outputs stay bitwise those of stage-by-stage runs.

The builders ask transformers' ``is_tracing`` whether a graph is being traced, and that asks
``torch.cuda.is_current_stream_capturing()``: 30-80 us per call where torch has CUDA but the machine no driver
(the CUDA call fails, and an exception is made and dropped each time), at least once per mask built (XPU: ~7 us,
the same way). Importing this module makes that check answer False at once while torch's CUDA (XPU) is not
initialized, which is exact: a graph is captured on a stream torch created, and that initializes the backend
first (:func:`cheap_capture_check`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Optional

import torch

_local = threading.local()


@contextmanager
def shared_setup() -> Iterator[None]:
    """Within the block, :func:`setup` reuses what an earlier stage of this thread built from the same inputs.
    Nested blocks share the outer one's memo; it is dropped (with the tensors it holds) when the outermost ends."""
    outer = getattr(_local, "memo", None)
    if outer is not None:
        yield
        return
    _local.memo = {}
    try:
        yield
    finally:
        _local.memo = None


def setup(what: str, objects: tuple[Any, ...], values: tuple[Hashable, ...], build: Callable[[], Any]) -> Any:
    """``build()``, or the value it returned earlier in this :func:`shared_setup` block for the same ``what``, the
    same ``objects`` (compared by identity; tensors also by version) and equal ``values``."""
    memo: Optional[dict] = getattr(_local, "memo", None)
    if memo is None:
        return build()
    versions = tuple(_version(o) for o in objects)
    entry = memo.get(what)
    if entry is not None:
        objs, vers, vals, value = entry
        if (
            vals == values
            and vers == versions
            and len(objs) == len(objects)
            and all(a is b for a, b in zip(objs, objects))
        ):
            return value
    value = build()
    memo[what] = (objects, versions, values, value)
    return value


def _version(o: Any) -> Optional[int]:
    # inference tensors (what stages make under inference_mode) track no version: identity alone tells them apart
    return o._version if isinstance(o, torch.Tensor) and not o.is_inference() else None


def active() -> bool:
    """Whether this thread is inside a :func:`shared_setup` block."""
    return getattr(_local, "memo", None) is not None


def tensor_key(t: Optional[torch.Tensor]) -> tuple:
    """The plain values of a tensor a builder reads besides its contents: shape, dtype, device."""
    return (None,) if t is None else (tuple(t.shape), t.dtype, t.device)


def kv_sizes(kv: Any, q_length: int, layer: Optional[int]) -> tuple:
    """What a mask builder reads of the KV cache for ``layer``: its class, query offset and mask sizes."""
    if kv is None:
        return (None,)
    if layer is not None and not hasattr(kv, "get_mask_sizes"):  # transformers 4.x: the mask reads the length
        return (type(kv), kv.get_seq_length(layer))
    offset = kv.get_query_offset(layer) if layer is not None and hasattr(kv, "get_query_offset") else None
    if isinstance(offset, torch.Tensor):
        offset = int(offset)
    sizes = kv.get_mask_sizes(q_length, layer) if layer is not None and hasattr(kv, "get_mask_sizes") else None
    return (type(kv), offset, sizes, getattr(kv, "is_compileable", None))


def cheap_capture_check() -> None:
    """Makes transformers' ``is_cuda_stream_capturing`` (and ``is_xpu_stream_capturing``) skip the device call
    while torch's CUDA (XPU) is not initialized (see the module docstring): the same answer, without its cost.
    Idempotent; leaves a transformers without those functions alone."""
    from transformers.utils import import_utils

    for name, backend in (("is_cuda_stream_capturing", torch.cuda), ("is_xpu_stream_capturing", torch.xpu)):
        real = getattr(import_utils, name, None)
        if real is None or getattr(real, "aiflow_cheap", False):
            continue
        setattr(import_utils, name, _when_initialized(backend, real))


def _when_initialized(backend: Any, real: Callable[[], bool]) -> Callable[[], bool]:
    def capturing() -> bool:
        return backend.is_initialized() and real()

    capturing.aiflow_cheap = True
    return capturing


cheap_capture_check()
