"""Boundary states on the wire: a dict of named tensors <-> message metadata plus codec frames.

Floating tensors are encoded with the cut's codec; integer tensors (masks, positions, token ids) always go
``raw``. The metadata lists each tensor's name and role in frame order, so the receiver rebuilds the same dict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

import torch

from aiflow_cli import codec
from aiflow_cli.errors import FrameError


@dataclass
class PackedState:
    """A boundary state ready to send: ``meta`` goes in the message metadata, ``frames`` are the payloads."""

    meta: list[dict]
    frames: list[bytes]
    encode_ms: float

    @property
    def nbytes(self) -> int:
        return sum(len(f) for f in self.frames)


def pack_state(state: Mapping[str, torch.Tensor], roles: Mapping[str, str], codec_spec: str) -> PackedState:
    """Encodes every tensor of ``state``; floating ones with ``codec_spec``, the rest ``raw``."""
    t0 = time.perf_counter()
    meta, frames = [], []
    for name, tensor in state.items():
        spec = codec_spec if tensor.is_floating_point() else "raw"
        frames.append(codec.encode(tensor, spec))
        meta.append({"name": name, "role": roles.get(name, "hidden"), "codec": spec})
    return PackedState(meta=meta, frames=frames, encode_ms=(time.perf_counter() - t0) * 1e3)


def unpack_state(meta: list[dict], frames: list[bytes], *, max_decoded_bytes: int = codec.DEFAULT_MAX_DECODED_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, str], float]:
    """Decodes frames back into (state, roles, decode_ms). Raises :class:`FrameError` on any mismatch."""
    if not isinstance(meta, list) or len(meta) != len(frames):
        raise FrameError(f"message lists {len(meta) if isinstance(meta, list) else '?'} tensors but carries {len(frames)} frames")
    t0 = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    roles: dict[str, str] = {}
    for entry, frame in zip(meta, frames):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise FrameError("malformed tensor entry in message metadata")
        state[entry["name"]] = codec.decode(frame, max_decoded_bytes=max_decoded_bytes)
        roles[entry["name"]] = str(entry.get("role", "hidden"))
    return state, roles, (time.perf_counter() - t0) * 1e3
