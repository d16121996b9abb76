"""Models as chains of stages: one adapter per family, built-in configs, loaders.

Public surface::

    load_model(name, dtype=torch.float32, device="cpu") -> StagedModel         # every stage
    load_stages(name, stages, dtype=..., device=...) -> StagedModel            # only those stages' weights
    list_builtins() -> [{name, description}]
    StagedModel: name, family, task, model_hash, num_stages, stage_names, decode_start,
                 make_inputs(batch, seq_len, image_size, seed), prepare(text=, image=), run_stage(i, state, cache),
                 roles(state), output(state), monolithic(inputs), new_cache(), next_inputs(prev, tokens), generate()

Boundary states and roles: :mod:`aiflow_cli.models.state`. Names: :mod:`aiflow_cli.models.loading`.
"""

from aiflow_cli.models.adapter import StageCache, StageSpec
from aiflow_cli.models.loading import list_builtins, load_model, load_stages, parse_dtype, resolve
from aiflow_cli.models.staged import ModelInfo, StagedModel
from aiflow_cli.models.state import ROLES, BoundaryState, Role, roles, state_bytes

__all__ = [
    "load_model",
    "load_stages",
    "list_builtins",
    "resolve",
    "parse_dtype",
    "StagedModel",
    "ModelInfo",
    "StageSpec",
    "StageCache",
    "BoundaryState",
    "Role",
    "ROLES",
    "roles",
    "state_bytes",
]
