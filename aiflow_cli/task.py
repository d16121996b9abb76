"""What a model does, in one place: the task names a profile, plan and model carry, and what each implies.

- ``generate``: text in, tokens out (decoder LMs).
- ``encode``: text or tensors in, an embedding or hidden state out.
- ``classify``: an image in, class logits out.
- ``caption``: an image in, tokens out (encoder-decoder captioner).

A leaf module (no imports of its own), so the model families, the profile and plan schemas and the CLI all
import it without a cycle.
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["generate", "encode", "classify", "caption"]
TASKS: tuple[str, ...] = get_args(Task)


def generates(task: str) -> bool:
    """Whether a ``task`` model generates tokens (decode steps, a KV cache, a decoding objective)."""
    return task in ("generate", "caption")


def takes_image(task: str) -> bool:
    """Whether a request to a ``task`` model is an image (a file the device may upload as it is)."""
    return task in ("caption", "classify")


__all__ = ["TASKS", "Task", "generates", "takes_image"]
