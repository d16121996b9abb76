"""Boundary states: the named tensors that cross a cut between two stages, and the role of each.

A boundary state is a plain ``dict[str, torch.Tensor]``. Every name has one role, fixed here for all families:

- ``hidden``: the main activation stream (``hidden_states``; ``pixel_values`` at the input; ``logits`` /
  ``embeddings`` at the output). In generation it crosses again at every decode step, one token's worth.
- ``side``: produced once per request and read by many later stages (``encoder_hidden_states``: the captioner's
  encoder output, read by every decoder block's cross-attention). A stage that holds a cache keeps it, so it
  crosses each link once per request, never per decode step.
- ``control``: small integer tensors (token ids, attention mask, position ids); always shipped ``raw``.
"""

from __future__ import annotations

from typing import Literal

import torch

from aiflow_cli.errors import ModelError

Role = Literal["hidden", "side", "control"]
BoundaryState = dict[str, torch.Tensor]

ROLES: dict[str, Role] = {
    "pixel_values": "hidden",
    "hidden_states": "hidden",
    "logits": "hidden",
    "embeddings": "hidden",
    "encoder_hidden_states": "side",
    "input_ids": "control",
    "attention_mask": "control",
    "position_ids": "control",
    "token_type_ids": "control",
    "image_file": "control",  # images as their encoded files (JPEG/PNG bytes): the raw input, decoded by stage 0
    "image_file_sizes": "control",  # bytes of each file in image_file when a request holds several images
}


def role_of(name: str) -> Role:
    """The role of a boundary tensor name; names of the fx fallback (``fx:<node>``) are ``hidden``."""
    if name.startswith("fx:"):
        return "hidden"
    try:
        return ROLES[name]
    except KeyError:
        raise ModelError(f"boundary tensor {name!r} has no role; known names: {', '.join(ROLES)}") from None


def roles(state: BoundaryState) -> dict[str, Role]:
    """``{tensor name: role}`` for every tensor of a boundary state."""
    return {name: role_of(name) for name in state}


def state_bytes(state: BoundaryState) -> int:
    """Raw size of a boundary state in bytes (numel x element size, summed)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def is_codec_tensor(name: str, t: torch.Tensor) -> bool:
    """Whether a codec applies to this tensor (floating ``hidden``/``side``); ``control`` always goes ``raw``."""
    return role_of(name) != "control" and t.is_floating_point()


def tile_batch(states: list[BoundaryState]) -> BoundaryState:
    """Concatenates several states of equal shapes along the batch dimension (dim 0)."""
    return {k: torch.cat([s[k] for s in states], dim=0) for k in states[0]}


__all__ = ["Role", "BoundaryState", "ROLES", "role_of", "roles", "state_bytes", "is_codec_tensor", "tile_batch"]
