"""Boundary states on the wire: a dict of named tensors <-> a tensor table plus codec frames.

Floating tensors are encoded with the cut's codec; integer tensors (masks, positions, token ids) always go
``raw``. The table (:class:`~aiflow_cli.runtime.protocol.TensorSpec` per frame, carried in the message) lists
each tensor's name, role and codec in frame order, so the receiver rebuilds the same dict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from aiflow_cli import codec
from aiflow_cli.errors import FrameError
from aiflow_cli.runtime.protocol import TensorSpec
from aiflow_cli.transport import FrameLike


@dataclass
class PackedState:
    """A boundary state ready to send: ``tensors`` goes in the message, ``frames`` are the payloads."""

    tensors: tuple[TensorSpec, ...]
    frames: list[FrameLike]
    encode_ms: float

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)


def pack_state(state: Mapping[str, torch.Tensor], roles: Mapping[str, str], codec_spec: str) -> PackedState:
    """Encodes every tensor of ``state``; floating ones with ``codec_spec``, the rest ``raw``."""
    t0 = time.perf_counter()
    tensors: list[TensorSpec] = []
    frames: list[FrameLike] = []
    for name, tensor in state.items():
        spec = codec_spec if tensor.is_floating_point() else "raw"
        frames.append(codec.encode(tensor, spec))
        tensors.append(TensorSpec(name, roles.get(name, "hidden"), spec))
    return PackedState(tensors=tuple(tensors), frames=frames, encode_ms=(time.perf_counter() - t0) * 1e3)


def unpack_state(
    tensors: Sequence[TensorSpec],
    frames: Sequence[FrameLike],
    *,
    max_decoded_bytes: int = codec.DEFAULT_MAX_DECODED_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, str], float]:
    """Decodes frames back into (state, roles, decode_ms). Raises :class:`FrameError` on any mismatch."""
    if len(tensors) != len(frames):
        raise FrameError(f"message lists {len(tensors)} tensors but carries {len(frames)} frames")
    t0 = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    roles: dict[str, str] = {}
    for spec, frame in zip(tensors, frames):
        state[spec.name] = codec.decode(frame, max_decoded_bytes=max_decoded_bytes)
        roles[spec.name] = spec.role
    return state, roles, (time.perf_counter() - t0) * 1e3
