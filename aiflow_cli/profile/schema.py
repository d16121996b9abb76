"""The model profile: what `aiflow profile` measures and `aiflow plan` reads. Schema version 3.

Indexing: a model is a chain of ``len(stages)`` stages; stage 0 is ``input.prepare``, which turns the raw input
(token ids, an image file) into the tensors of the model's first stage. ``input`` is the boundary before stage 0,
the raw input as the device holds it (``after_stage`` -1, codec ``raw`` only); ``cuts[k]`` is the boundary after
stage ``k`` (k = 0 .. len(stages) - 2). What crosses a cut is a *boundary state*: several tensors, each with a role:

- ``hidden``: the main activation stream; in generation it is sent again at every decode step (one token's worth);
- ``side``: produced once per request and needed by later stages (e.g. the captioner's encoder output, which
  feeds every decoder block's cross-attention): crosses each link once per request, never per decode step;
- ``control``: small integer tensors (attention mask, position ids); always sent ``raw``.

Codecs apply to the floating tensors (``hidden`` and ``side``). Times are milliseconds, sizes bytes.

Fidelity (version 2) is the task's own metric on the shipped calibration set (:class:`Calibration` says which):
``token_agreement`` for generation and captioning, ``embedding_cosine`` for sentence embeddings,
``label_agreement`` for classifiers; ``output_cosine`` on random inputs only for models that take no text or
image. Version 1 measured the cosine of end logits on random tokens, which real inputs do not resemble; version 2
had no input stage (the raw input's upload was a special case of planner and runtime): such profiles are refused
with a message naming ``aiflow profile``.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from aiflow_cli.schema import Strict
from aiflow_cli.task import Task

PROFILE_SCHEMA_VERSION: Literal[3] = 3

#: What a profile's fidelity figures measure (see docs/planner.md, "Fidelity").
FidelityMetric = Literal["token_agreement", "embedding_cosine", "label_agreement", "output_cosine"]


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
    """The request's output (what returns to the device)."""

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
    exit_acceptance: Optional[float] = Field(
        default=None,
        ge=0,
        le=1,
        description="LMs: share of the exact greedy tokens on the calibration set that an early exit after this "
        "stage (the model's head on its output) predicts, teacher-forced: the per-draft acceptance of "
        "self-speculation with the device's last stage here (docs/runtime.md)",
    )
    trained_exit_acceptance: Optional[float] = Field(
        default=None,
        ge=0,
        le=1,
        description="LMs, blocks with a trained exit (`aiflow draft train MODEL --exit-layer K`, K this block's "
        "layer): exit_acceptance through that exit adapter; None where none was trained when profiling",
    )


class CutTensor(Strict):
    name: str
    role: Literal["hidden", "side", "control"]
    dtype: str
    shape: list[int]
    bytes: int = Field(ge=0)
    decode_step_bytes: Optional[int] = Field(default=None, ge=0, description="hidden only: per decode step")


class Fidelity(Strict):
    """The end output with only this cut passed through the codec, against the reference, over the calibration
    items: ``mean`` and ``min`` of the profile's metric (:attr:`Calibration.metric`). The planner reads ``min``."""

    mean: float = Field(ge=-1.0, le=1.0 + 1e-6, description="metric, mean over calibration items")
    min: float = Field(ge=-1.0, le=1.0 + 1e-6, description="metric, lowest calibration item")
    kl_mean: Optional[float] = Field(
        default=None, ge=0, description="LMs: next-token KL(exact || coded), nats, mean over positions"
    )
    cosine: Optional[float] = Field(
        default=None, ge=-1.0, le=1.0 + 1e-6, description="cosine of the end output rows (logits or embeddings), mean"
    )
    max_abs_error: Optional[float] = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Fidelity":
        if self.min > self.mean + 1e-9:
            raise ValueError(f"fidelity min {self.min} is above its mean {self.mean}")
        return self


class Calibration(Strict):
    """What the fidelity figures of a profile were measured on, and against what."""

    metric: FidelityMetric
    source: str = Field(description="'calibration set' (aiflow_cli/assets/calibration) or 'random inputs'")
    hash: Optional[str] = Field(default=None, description="sha256 (16 hex) of the calibration files used")
    items: int = Field(ge=1, description="calibration items (prompts, images, sentences)")
    tokens: Optional[int] = Field(
        default=None, ge=1, description="generation: continuation tokens per item, teacher-forced"
    )
    reference: str = Field(description="what outputs are compared with, e.g. sentence-transformers encode()")
    reference_min: Optional[float] = Field(
        default=None, description="the exact model against that reference, lowest item (1: identical)"
    )
    measured_cuts: list[int] = Field(
        description="cuts where lossy codecs were measured; elsewhere only lossless ones are listed"
    )
    wall_s: float = Field(ge=0, description="time spent measuring fidelity")


class CodecResult(Strict):
    bytes: int = Field(ge=0, description="whole boundary state as frames (all tensors, headers included)")
    decode_step_bytes: Optional[int] = Field(default=None, ge=0, description="one decode step's frames")
    encode_ms: float = Field(ge=0)
    decode_ms: float = Field(ge=0)
    fidelity: Fidelity


class CutProfile(Strict):
    after_stage: int = Field(ge=-1, description="-1: the raw input, before stage 0 (input.prepare)")
    description: str = Field(default="", description="what the boundary is (the raw input's words)")
    tensors: list[CutTensor]
    activation_bytes: int = Field(ge=0, description="sum of tensor bytes, raw")
    codecs: dict[str, CodecResult] = Field(description="codec spec -> result; always includes 'raw'")

    @model_validator(mode="after")
    def _has_raw(self) -> "CutProfile":
        if "raw" not in self.codecs:
            raise ValueError(f"cut after stage {self.after_stage} has no 'raw' codec result")
        return self


class ModelProfile(Strict):
    schema_version: Literal[3] = PROFILE_SCHEMA_VERSION
    model: str = Field(description="as given to aiflow profile: builtin:gpt2, an HF id, a path, minilm")
    model_hash: str = Field(description="sha256 of the model's config and weights; plans and peers check it")
    family: str = Field(description="gpt2 | llama | bert | vit | captioner | fx")
    task: Task = Field(description="generate | encode | classify | caption (aiflow_cli.task)")
    hardware: Hardware
    settings: Settings
    input: CutProfile = Field(description="the boundary before stage 0: the raw input as uploaded (codec raw)")
    output: Endpoint
    stages: list[StageProfile] = Field(min_length=1)
    cuts: list[CutProfile]
    calibration: Calibration
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
        if self.input.after_stage != -1:
            raise ValueError(f"input.after_stage is {self.input.after_stage}, expected -1 (before stage 0)")
        return self

    @property
    def input_bytes(self) -> int:
        """Bytes of the raw input as uploaded (boundary before stage 0, codec ``raw``, frame headers included)."""
        return self.input.codecs["raw"].bytes

    def boundaries(self) -> list[CutProfile]:
        """Every boundary in flow order: ``[input, cuts[0], ...]``; entry ``b`` is what stage ``b`` reads."""
        return [self.input, *self.cuts]


#: Why each older profile version is refused (one clause each).
_OLD_VERSIONS = {
    1: "measured fidelity as logit cosine on random inputs",
    2: "has no input stage (input.prepare) and so no measured raw-input boundary",
}


def load_profile(path: str) -> ModelProfile:
    """Reads and validates a profile JSON; errors name the file and field. Older schema versions are refused in
    one line that says how to regenerate the file."""
    from aiflow_cli.errors import SchemaError
    from aiflow_cli.schema import read_data_file, validate

    data = read_data_file(path)
    got = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(got, int) and got < PROFILE_SCHEMA_VERSION:
        model = data.get("model", "MODEL")
        raise SchemaError(
            f"{path}: model profile schema_version {got} {_OLD_VERSIONS.get(got, 'is out of date')}; "
            f"regenerate it with `aiflow profile {model} -o {path}` (schema version {PROFILE_SCHEMA_VERSION})"
        )
    return validate(ModelProfile, data, source=str(path), kind="model profile")
