"""The contract between :class:`~aiflow_cli.models.staged.StagedModel` and one model family.

A family adapter knows three things about a transformers model: how to build its skeleton, which submodules make
each stage (embeddings -> blocks -> head), and how to run one stage on a boundary state, calling the library's
own modules (the same calls, with the same masks, as the monolithic forward, so that split == monolithic bitwise).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from aiflow_cli.errors import InputError, ModelError
from aiflow_cli.models.state import BoundaryState
from aiflow_cli.task import Task, generates


@dataclass(frozen=True)
class StageSpec:
    """One stage: a name, a kind (embed | block | encoder_block | decoder_block | head | ...), the submodules whose
    weights it needs, whether it runs in decode steps, and the global layer index of a block (for its cache)."""

    name: str
    kind: str
    modules: tuple[str, ...]
    decodes: bool = False
    layer: Optional[int] = None


@dataclass
class StageCache:
    """Per-request generation state of the stages one process runs: the KV cache of their attention layers and the
    ``side`` tensors received once per request (reused by every decode step). One request at a time."""

    kv: Any
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens_seen: int = 0

    @property
    def length(self) -> Optional[int]:
        """Positions the KV cache holds (None: no attention layer of this cache holds any yet)."""
        kv = self.kv
        caches = [kv.self_attention_cache] if hasattr(kv, "self_attention_cache") else [kv]
        held = [layer.keys.shape[-2] for c in caches for layer in getattr(c, "layers", ()) if _held(layer)]
        return max(held) if held else None

    def crop(self, length: int) -> None:
        """Forgets every cached position from ``length`` on (to re-time a decode step at a fixed cache length)."""
        kv = self.kv
        caches = [kv.self_attention_cache] if hasattr(kv, "self_attention_cache") else [kv]
        for c in caches:
            for layer in c.layers:
                if _held(layer):
                    layer.keys = layer.keys[..., :length, :]
                    layer.values = layer.values[..., :length, :]
        self.tokens_seen = length


def _held(layer: Any) -> bool:
    return bool(getattr(layer, "is_initialized", False) and layer.keys.numel())


#: Stage 0 of every model: turns the raw input as the user has it (token ids; an image as its encoded file) into
#: the tensors the model's first stage reads (pixel values, the captioner's prompt). It has no weights; the plan
#: places it like any other stage, so a device that runs nothing uploads the raw input and the first tier that
#: computes prepares it. A state that is already prepared (``make_inputs``, ``prepare``) passes through unchanged.
INPUT_STAGE = StageSpec("input.prepare", "input", ())


class Adapter:
    """Base of the family adapters. Subclasses set ``family``, ``task`` and implement the methods below."""

    family: ClassVar[str]
    task: ClassVar[Task]
    model_class: ClassVar[type[nn.Module]]

    def __init__(self, model: nn.Module, config: Any, options: dict[str, Any] | None = None):
        self.model = model
        self.config = config
        self.options = options or {}

    @classmethod
    def model_class_for(cls, config: Any) -> type[nn.Module]:
        """The transformers class this adapter cuts, for this config."""
        return cls.model_class

    @staticmethod
    def prune(model: nn.Module) -> None:
        """Drops submodules no stage uses (poolers), so a fully loaded model has no weightless parts."""

    # -- structure ------------------------------------------------------------------------------------------
    def stage_specs(self) -> list[StageSpec]:
        """Every stage, in order: :data:`INPUT_STAGE`, then the model's own (:meth:`model_stages`)."""
        return [INPUT_STAGE] + self.model_stages()

    def model_stages(self) -> list[StageSpec]:
        """The model's stages after the input stage (embeddings -> blocks -> head)."""
        raise NotImplementedError

    def prepare_input(self, state: BoundaryState, *, device: torch.device, dtype: torch.dtype) -> BoundaryState:
        """Stage 0 (:data:`INPUT_STAGE`): an image file (``image_file``) becomes what :meth:`prepare` makes of the
        image; token ids and already prepared tensors pass through (the device tokenized them)."""
        from aiflow_cli.models.inputs import IMAGE_FILE, images_of

        if IMAGE_FILE in state:
            return self.prepare(image=images_of(state), device=device, dtype=dtype)
        return dict(state)

    def run_stage(self, spec: StageSpec, state: BoundaryState, cache: StageCache | None) -> BoundaryState:
        raise NotImplementedError

    # -- inputs and outputs ---------------------------------------------------------------------------------
    def make_inputs(
        self,
        *,
        batch: int,
        seq_len: int | None,
        image_size: int | None,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> BoundaryState:
        raise NotImplementedError

    def default_seq_len(self) -> int | None:
        return 32

    def default_image_size(self) -> int | None:
        return None

    def prepare(self, *, text=None, image=None, device: torch.device, dtype: torch.dtype) -> BoundaryState:
        raise InputError(f"{self.family} models take no {'text' if text is not None else 'image'} input")

    def output(self, state: BoundaryState) -> torch.Tensor:
        """The end output from the last stage's state (logits or embeddings)."""
        key = "embeddings" if "embeddings" in state else "logits"
        return state[key]

    def output_description(self) -> str:
        return "logits"

    def monolithic(self, inputs: BoundaryState) -> torch.Tensor:
        """The library's own full forward on the same inputs (needs every stage loaded)."""
        raise NotImplementedError

    # -- generation -----------------------------------------------------------------------------------------
    @property
    def generates(self) -> bool:
        return generates(self.task)

    def new_cache(self) -> StageCache:
        raise ModelError(f"{self.family} models do not generate; they have no KV cache")

    def next_inputs(self, prev_inputs: BoundaryState, tokens: torch.Tensor) -> BoundaryState:
        raise ModelError(f"{self.family} models do not generate")

    def eos_token_ids(self) -> frozenset[int]:
        """End-of-sequence ids of a model that ships a tokenizer (generation config and tokenizer); none else."""
        tok_dir = self.options.get("tokenizer_dir")
        if not self.generates or not tok_dir:
            return frozenset()
        if "_eos" not in self.__dict__:
            import json
            from pathlib import Path

            from aiflow_cli.models.inputs import load_tokenizer

            values = [getattr(self.config, "eos_token_id", None), load_tokenizer(str(tok_dir)).eos_token_id]
            gen = Path(tok_dir) / "generation_config.json"
            if gen.is_file():
                values.append(json.loads(gen.read_text()).get("eos_token_id"))
            self._eos = frozenset(i for v in values for i in ([v] if isinstance(v, int) else list(v or [])))
        return self._eos

    # -- helpers shared by the families ----------------------------------------------------------------------
    @staticmethod
    def check_ids(ids: torch.Tensor, vocab_size: int, what: str = "input_ids") -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise InputError(f"{what} must lie in [0, {vocab_size}); got {int(ids.min())}..{int(ids.max())}")


def text_positions(batch: int, seq_len: int, device: torch.device, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask of ones [batch, past+seq_len], position_ids [batch, seq_len]) for unpadded text."""
    mask = torch.ones(batch, past + seq_len, dtype=torch.long, device=device)
    pos = torch.arange(past, past + seq_len, device=device).unsqueeze(0).expand(batch, -1).contiguous()
    return mask, pos


def extend_for_token(prev: BoundaryState, tokens: torch.Tensor) -> BoundaryState:
    """The stage-0 input of the next decode step: one token per row, mask grown by one, next positions."""
    tokens = tokens.reshape(-1, 1).to(prev["input_ids"].device)
    mask = prev["attention_mask"]
    mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], dim=1)
    pos = prev["position_ids"][:, -1:] + 1
    return {"input_ids": tokens, "attention_mask": mask, "position_ids": pos}


class TextLMAdapter(Adapter):
    """Base of the text language models' adapters (gpt2, the HF decoders): the full forward on token ids, next-token
    ids as the output, each decode step's input one token longer (:func:`extend_for_token`)."""

    task: ClassVar[Task] = "generate"

    def monolithic(self, inputs: BoundaryState) -> torch.Tensor:
        return self.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            use_cache=False,
        ).logits

    def output_description(self) -> str:
        return "next-token ids (int64), one per sequence per step"

    def next_inputs(self, prev_inputs: BoundaryState, tokens: torch.Tensor) -> BoundaryState:
        return extend_for_token(prev_inputs, tokens)


def accepts(fn, name: str) -> bool:
    """Whether callable ``fn`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@cache
def cache_kwarg(layer_class: type) -> str:
    """The name a layer's forward gives its KV cache: ``cache`` from transformers 5.x on (``past_key_values`` is
    deprecated there, with a FutureWarning), ``past_key_values`` / ``past_key_value`` before (GPT-NeoX: ``layer_past``)."""
    names = ("cache", "past_key_values", "past_key_value", "layer_past")
    return next((n for n in names if accepts(layer_class.forward, n)), "past_key_values")


#: The KV-cache keyword of transformers' mask builders (``create_causal_mask`` and friends).
MASK_CACHE_KWARG = "cache" if accepts(create_causal_mask, "cache") else "past_key_values"
