"""The model profile: what `aiflow profile` measures and `aiflow plan` reads. Schema version 1.

Indexing: a model is a chain of ``len(stages)`` stages; ``cuts[k]`` is the boundary after stage ``k``
(k = 0 .. len(stages) - 2). What crosses a cut is a *boundary state*: several tensors, each with a role:

- ``hidden``: the main activation stream; in generation it is sent again at every decode step (one token's worth);
- ``side``: produced once per request and needed by later stages (e.g. the captioner's encoder output, which
  feeds every decoder block's cross-attention): crosses each link once per request, never per decode step;
- ``control``: small integer tensors (attention mask, position ids); always sent ``raw``.

Codecs apply to the floating tensors (``hidden`` and ``side``). Times are milliseconds, sizes bytes.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from aiflow_cli.schema import Strict
from aiflow_cli.task import Task

PROFILE_SCHEMA_VERSION: Literal[1] = 1


class Hardware(Strict):
    """The machine a profile was measured on."""

    device: Literal["cpu", "cuda"]
    cpu: str
    cores: int = Field(ge=1)
    torch_threads: int = Field(ge=1)
    gpu: Optional[str] = None
    torch_version: str
    label: str = Field(default="", description="free-form name of the machine, e.g. 'nvidia-h100-x1'")


class Settings(Strict):
    """What was measured: input shape, dtype, repetitions."""

    dtype: str
    batch: int = Field(ge=1)
    seq_len: Optional[int] = Field(default=None, ge=1)
    image_size: Optional[int] = Field(default=None, ge=1)
    decode_tokens: int = Field(default=0, ge=0, description="KV-cache length of the profiled decode step")
    repeats: int = Field(ge=1)
    warmup: int = Field(ge=0)


class Endpoint(Strict):
    """The request's input (what cloud-only uploads) or output (what returns to the device)."""

    bytes: int = Field(ge=0)
    description: str = ""
    decode_step_bytes: Optional[int] = Field(default=None, ge=0, description="per generated token, for LMs")


class StageProfile(Strict):
    index: int = Field(ge=0)
    name: str
    kind: str = Field(description="embed | block | encoder_block | decoder_block | head | ...")
    param_bytes: int = Field(ge=0)
    prefill_ms: float = Field(ge=0, description="median")
    prefill_p90_ms: float = Field(ge=0)
    decode_ms: Optional[float] = Field(default=None, ge=0, description="median of one decode step; LMs only")
    decode_p90_ms: Optional[float] = Field(default=None, ge=0)
    peak_activation_bytes: int = Field(ge=0, description="peak extra memory while running this stage")


class CutTensor(Strict):
    name: str
    role: Literal["hidden", "side", "control"]
    dtype: str
    shape: list[int]
    bytes: int = Field(ge=0)
    decode_step_bytes: Optional[int] = Field(default=None, ge=0, description="hidden only: per decode step")


class Fidelity(Strict):
    """End output with only this cut passed through the codec, against the exact output."""

    cosine: float = Field(ge=-1.0, le=1.0 + 1e-6)
    max_abs_error: Optional[float] = Field(default=None, ge=0)
    top1_agreement: Optional[float] = Field(default=None, ge=0, le=1, description="LMs: share of positions whose argmax agrees")


class CodecResult(Strict):
    bytes: int = Field(ge=0, description="whole boundary state as frames (all tensors, headers included)")
    decode_step_bytes: Optional[int] = Field(default=None, ge=0, description="one decode step's frames")
    encode_ms: float = Field(ge=0)
    decode_ms: float = Field(ge=0)
    fidelity: Fidelity


class CutProfile(Strict):
    after_stage: int = Field(ge=0)
    tensors: list[CutTensor]
    activation_bytes: int = Field(ge=0, description="sum of tensor bytes, raw")
    codecs: dict[str, CodecResult] = Field(description="codec spec -> result; always includes 'raw'")

    @model_validator(mode="after")
    def _has_raw(self) -> "CutProfile":
        if "raw" not in self.codecs:
            raise ValueError(f"cut after stage {self.after_stage} has no 'raw' codec result")
        return self


class ModelProfile(Strict):
    schema_version: Literal[1] = PROFILE_SCHEMA_VERSION
    model: str = Field(description="as given to aiflow profile: builtin:gpt2, an HF id, a path, minilm")
    model_hash: str = Field(description="sha256 of the model's config and weights; plans and peers check it")
    family: str = Field(description="gpt2 | llama | bert | vit | captioner | fx")
    task: Task = Field(description="generate | encode | classify | caption (aiflow_cli.task)")
    hardware: Hardware
    settings: Settings
    input: Endpoint
    output: Endpoint
    stages: list[StageProfile] = Field(min_length=1)
    cuts: list[CutProfile]
    profile_wall_s: float = Field(ge=0, description="how long profiling took")

    @model_validator(mode="after")
    def _consistent(self) -> "ModelProfile":
        for i, s in enumerate(self.stages):
            if s.index != i:
                raise ValueError(f"stages[{i}].index is {s.index}; stages must be listed in order from 0")
        if len(self.cuts) != len(self.stages) - 1:
            raise ValueError(f"{len(self.stages)} stages need {len(self.stages) - 1} cuts, found {len(self.cuts)}")
        for k, c in enumerate(self.cuts):
            if c.after_stage != k:
                raise ValueError(f"cuts[{k}].after_stage is {c.after_stage}, expected {k}")
        return self


def load_profile(path: str) -> ModelProfile:
    """Reads and validates a profile JSON; errors name the file and field."""
    from aiflow_cli.schema import load_model

    return load_model(ModelProfile, path, kind="model profile")
