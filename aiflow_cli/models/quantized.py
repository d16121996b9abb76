"""An int8 copy of a model, for drafting (``draft=int8``): the same network with every ``nn.Linear`` as a dynamic
int8 linear (weights quantized per output channel once, activations per call; torch's fbgemm kernels, CPU only).

A quantized copy of the target drafts with the target's own weights, so it needs no training and no other model,
and it is cheaper per token than the float model where int8 kernels are (x86 CPUs). What it costs and how often
its drafts are accepted is measured by ``aiflow draft cost`` (row ``int8``): on SmolLM2-135M the int8 copy is
cheaper per position but its greedy token differs from the float model's more often than int8 suggests (small
models carry activation outliers that per-call activation quantization clips). Greedy output is unchanged either
way: the tiers verify every draft.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from aiflow_cli.errors import ModelError
from aiflow_cli.models.staged import StagedModel

#: what the copy's name adds to the model's (``smollm2`` -> ``smollm2+int8``)
SUFFIX = "+int8"


def int8_copy(model: StagedModel) -> StagedModel:
    """A copy of ``model`` (every stage loaded) whose linear layers are dynamic int8 (see the module docstring);
    ``model`` is left as it is. One-line :class:`ModelError` off the CPU or when stages are missing."""
    if model.device.type != "cpu":
        raise ModelError(f"{model.name}: an int8 draft runs on the CPU only (the model is on {model.device})")
    if len(model.loaded) != model.num_stages:
        raise ModelError(f"{model.name}: an int8 copy needs every stage loaded (loaded: {sorted(model.loaded)})")
    q = copy.deepcopy(model)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch announces the move of eager-mode quantization to torchao
        warnings.simplefilter("ignore")
        quantize_dynamic(
            q.adapter.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    q.info = dataclasses.replace(model.info, name=model.name + SUFFIX)
    return q
