"""``StagedModel``: a model as a chain of stages, some or all of them loaded, run one stage at a time.

    m = load_model("builtin:gpt2-tiny")                      # every stage
    state = m.make_inputs(batch=1, seq_len=32, seed=0)        # or m.raw_input(text=...) / m.raw_input(image=path)
    for i in range(m.num_stages):
        state = m.run_stage(i, state)                          # == the library's forward, bitwise on CPU fp32
    logits = m.output(state)

    part = load_stages("builtin:gpt2-tiny", range(3, 5))      # reads only those stages' tensors
    cache = part.new_cache()                                   # one request at a time per cache
    state = part.run_stage(3, state, cache=cache)              # prefill, then one token per decode step

Stage 0 is ``input.prepare`` (:data:`~aiflow_cli.models.adapter.INPUT_STAGE`): it turns the raw input (token ids,
an image file) into the tensors of the model's first stage, and passes prepared tensors through. Decode steps
run stages ``m.decode_start .. num_stages-1`` (the captioner's encoder runs once, at prefill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from aiflow_cli.errors import InputError, ModelError
from aiflow_cli.models.adapter import Adapter, StageCache, StageSpec
from aiflow_cli.models.sampling import GREEDY, Sampling, sample
from aiflow_cli.models.stage_setup import shared_setup
from aiflow_cli.models.state import BoundaryState, Role, roles
from aiflow_cli.models.weights import LoadStats, loaded_param_bytes, module_param_bytes
from aiflow_cli.task import Task


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a model: the name it was loaded by, its family, task and hash."""

    name: str
    family: str
    task: Task
    model_hash: str
    description: str = ""


class StagedModel:
    """A model cut into stages. Stages not in :attr:`loaded` have no weights here and refuse to run."""

    def __init__(
        self,
        info: ModelInfo,
        adapter: Adapter,
        loaded: Iterable[int],
        *,
        device: torch.device,
        dtype: torch.dtype,
        stats: LoadStats,
    ):
        self.info = info
        self.adapter = adapter
        self.stages: list[StageSpec] = adapter.stage_specs()
        self.loaded: frozenset[int] = frozenset(loaded)
        self.device = device
        self.dtype = dtype
        self.load_stats = stats

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def task(self) -> Task:
        return self.info.task

    @property
    def model_hash(self) -> str:
        return self.info.model_hash

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def generates(self) -> bool:
        """Whether the model generates tokens (has a KV cache and decode steps)."""
        return self.adapter.generates

    @property
    def decode_start(self) -> int:
        """First stage of a decode step (0 for LMs; the decoder's embed stage for the captioner)."""
        return next((i for i, s in enumerate(self.stages) if s.decodes), self.num_stages)

    def stage_param_bytes(self, index: int) -> int:
        """Bytes of the weights stage ``index`` needs, in this model's dtype (tied weights counted per stage)."""
        return module_param_bytes(self.adapter.model, list(self._spec(index).modules), self.dtype)

    def loaded_param_bytes(self) -> int:
        """Bytes of weights actually in memory in this process."""
        return loaded_param_bytes(self.adapter.model)

    # -- running --------------------------------------------------------------------------------------------
    def _spec(self, index: int) -> StageSpec:
        if not 0 <= index < self.num_stages:
            raise InputError(f"stage {index} out of range: {self.name} has stages 0..{self.num_stages - 1}")
        return self.stages[index]

    @torch.inference_mode()
    def run_stage(self, index: int, state: BoundaryState, cache: StageCache | None = None) -> BoundaryState:
        """Runs stage ``index`` on the boundary state before it; returns the boundary state after it.

        With ``cache`` the stage appends to (and reads) its KV cache: first a prefill with the whole prompt, then
        decode steps of one token each (see :meth:`next_inputs`).
        """
        spec = self._spec(index)
        if index not in self.loaded:
            raise ModelError(
                f"stage {index} ({spec.name}) is not loaded in this process (loaded: {sorted(self.loaded)})"
            )
        if spec.kind == "input":
            return self.adapter.prepare_input(state, device=self.device, dtype=self.dtype)
        return self.adapter.run_stage(spec, state, cache)

    def run(
        self, state: BoundaryState, stages: Iterable[int] | None = None, cache: StageCache | None = None
    ) -> BoundaryState:
        """Runs the given stages (default: all) in order; their blocks build the per-forward setup (attention
        mask, rotary embeddings) once and share it (:func:`~aiflow_cli.models.stage_setup.shared_setup`)."""
        with shared_setup():
            for i in range(self.num_stages) if stages is None else stages:
                state = self.run_stage(i, state, cache)
        return state

    @staticmethod
    def roles(state: BoundaryState) -> dict[str, Role]:
        """``{tensor name: role}`` (hidden | side | control) of a boundary state."""
        return roles(state)

    # -- inputs and outputs ---------------------------------------------------------------------------------
    def make_inputs(
        self, batch: int = 1, seq_len: int | None = None, image_size: int | None = None, seed: int = 0
    ) -> BoundaryState:
        """Random stage-0 input of the given shape (token ids / pixel values), deterministic in ``seed``."""
        if batch < 1:
            raise InputError(f"batch must be >= 1, got {batch}")
        if seq_len is not None and seq_len < 1:
            raise InputError(f"seq_len must be >= 1, got {seq_len}")
        if image_size is not None and image_size < 1:
            raise InputError(f"image_size must be >= 1, got {image_size}")
        g = torch.Generator().manual_seed(seed)
        return self.adapter.make_inputs(
            batch=batch, seq_len=seq_len, image_size=image_size, generator=g, device=self.device, dtype=self.dtype
        )

    def prepare(self, *, text: Any = None, image: Any = None) -> BoundaryState:
        """The prepared input (what stage 0 outputs) from real data: ``text`` (str or list) and/or ``image`` (PIL
        image or list). It is also a valid stage-0 input (stage 0 passes it through)."""
        return self.adapter.prepare(text=text, image=image, device=self.device, dtype=self.dtype)

    def raw_input(self, *, text: Any = None, image: Any = None) -> BoundaryState:
        """The raw input as a device holds it, for stage 0: the token ids of ``text``, or ``image`` (a path,
        encoded bytes, a PIL image, or a list of them) as its encoded file (a JPEG stays a JPEG, PIL images go as
        lossless PNG)."""
        from aiflow_cli.models.inputs import image_file_state

        if image is None:
            return self.prepare(text=text)
        if text is not None:
            raise InputError("give text or an image, not both")
        return image_file_state(image)

    def output(self, state: BoundaryState) -> torch.Tensor:
        """The end output (logits [B, S, V] or embeddings [B, H]) from the last stage's boundary state."""
        return self.adapter.output(state)

    @torch.inference_mode()
    def monolithic(self, inputs: BoundaryState) -> torch.Tensor:
        """The transformers model's own forward on the same inputs (reference; needs every stage loaded)."""
        if len(self.loaded) != self.num_stages:
            raise ModelError("the monolithic forward needs every stage loaded")
        return self.adapter.monolithic(self.adapter.prepare_input(inputs, device=self.device, dtype=self.dtype))

    # -- generation -----------------------------------------------------------------------------------------
    def new_cache(self) -> StageCache:
        """An empty KV cache for the stages of this process (one request at a time)."""
        return self.adapter.new_cache()

    def next_inputs(self, prev_inputs: BoundaryState, tokens: torch.Tensor) -> BoundaryState:
        """The input of stage :attr:`decode_start` for the next decode step, given the previous step's input (or
        the prompt) and the tokens just chosen ([B])."""
        return self.adapter.next_inputs(prev_inputs, tokens)

    @property
    def has_tokenizer(self) -> bool:
        """Whether the model ships a real tokenizer (generated text is then readable; built-ins use bytes)."""
        return bool(self.adapter.options.get("tokenizer_dir"))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a generated answer: the generation config's and the tokenizer's EOS, for models
        that ship a tokenizer (built-ins with random weights have none and always generate every token asked)."""
        return self.adapter.eos_token_ids()

    def finished(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] bool: which rows of the tokens generated so far ([B, N]) contain an end-of-sequence token."""
        eos = self.eos_token_ids
        if not eos or tokens.numel() == 0:
            return torch.zeros(tokens.shape[0], dtype=torch.bool)
        return torch.isin(tokens, torch.tensor(sorted(eos), dtype=tokens.dtype, device=tokens.device)).any(dim=1)

    def decode_text(self, tokens: torch.Tensor) -> list[str]:
        """Generated token ids [B, N] -> one answer text per row (cut at its first end-of-sequence token)."""
        from aiflow_cli.models.inputs import decode_tokens

        return decode_tokens(self.adapter.options, tokens, self.eos_token_ids)

    @torch.inference_mode()
    def generate(
        self,
        inputs: BoundaryState,
        max_new_tokens: int,
        cache: StageCache | None = None,
        sampling: Sampling = GREEDY,
    ) -> torch.Tensor:
        """Generation through the stages with a KV cache: [B, N] token ids, N = ``max_new_tokens``, or fewer when
        every row has ended with an end-of-sequence token (see :attr:`eos_token_ids`). Greedy by default; a
        :class:`~aiflow_cli.models.sampling.Sampling` draws the same tokens as every split of the model does
        with it (the draws are keyed by seed and answer place, see :mod:`aiflow_cli.models.sampling`)."""
        if not self.generates:
            raise ModelError(f"{self.name} ({self.task}) does not generate")
        cache = cache or self.new_cache()
        state = self.run(inputs, range(self.decode_start), cache)
        step_in = self.decode_inputs_of(state)  # the prompt as the first decode stage reads it (stage 0 prepared it)
        state = self.run(state, range(self.decode_start, self.num_stages), cache)
        tokens = sample(self.output(state)[:, -1], sampling, 0)
        out = [tokens]
        for n in range(1, max_new_tokens):
            if bool(self.finished(torch.stack(out, dim=1)).all()):
                break
            step_in = self.next_inputs(step_in, tokens)
            state = self.run(step_in, range(self.decode_start, self.num_stages), cache)
            tokens = sample(self.output(state)[:, -1], sampling, n)
            out.append(tokens)
        return torch.stack(out, dim=1)

    def decode_inputs_of(self, inputs: BoundaryState) -> BoundaryState:
        """The part of a prompt's input that decode steps extend (drops the image of the captioner)."""
        return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}

    def __repr__(self) -> str:
        return (
            f"StagedModel({self.name!r}, family={self.family}, task={self.task}, stages={self.num_stages}, "
            f"loaded={len(self.loaded)}, dtype={str(self.dtype).removeprefix('torch.')}, device={self.device})"
        )
