"""The generic fallback: any ``torch.nn.Module`` that ``torch.fx`` can trace, cut only where a single tensor crosses.

:func:`stage_module` traces the module, finds every point of the graph where exactly one value is live (one
tensor from the part before to the part after, nothing else: no second activation, no input reused later), keeps
up to ``max_stages - 1`` of them evenly spread, and splits the graph there (``torch.fx.passes.split_module``).
Boundary states are ``{"fx:input"}`` -> ``{"fx:hidden"}`` ... -> ``{"fx:output"}`` (role ``hidden``). A module
that fx cannot trace, or that has no such point, is refused with :class:`ModelError`.

The module is already in memory, so there is no per-stage loading here; from the CLI, ``fx:pkg.mod:factory``
names a function returning ``(module, example_input)``.
"""

from __future__ import annotations

import hashlib
import importlib

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from aiflow_cli.errors import InputError, ModelError
from aiflow_cli.models.adapter import Adapter, StageSpec
from aiflow_cli.models.staged import ModelInfo, StagedModel
from aiflow_cli.models.weights import LoadStats


def single_tensor_cuts(graph: fx.Graph) -> list[int]:
    """Positions ``i`` in the list of compute nodes such that exactly one value defined before ``i`` is used at or
    after ``i`` (parameters fetched by ``get_attr`` do not count: each side reads its own)."""
    nodes = [n for n in graph.nodes if n.op not in ("get_attr", "output")]
    order = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for n in graph.nodes:
        for a in n.all_input_nodes:
            if a in order:
                last_use[a] = max(last_use.get(a, -1), order.get(n, len(nodes)))
    cuts = []
    first_compute = next((i for i, n in enumerate(nodes) if n.op != "placeholder"), len(nodes))
    for i in range(first_compute + 1, len(nodes)):
        live = [n for n in nodes[:i] if last_use.get(n, -1) >= i]
        if len(live) == 1 and live[0].op != "placeholder":
            cuts.append(i)
    return cuts


class FxAdapter(Adapter):
    family = "fx"
    task = "encode"

    def __init__(self, split: fx.GraphModule, n_stages: int, example: torch.Tensor):
        super().__init__(split, None)
        self.n_stages = n_stages
        self.example = example

    def model_stages(self):
        return [StageSpec(f"part{i}", "block", (f"submod_{i}",)) for i in range(self.n_stages)]

    def run_stage(self, spec, state, cache):
        i = int(spec.name.removeprefix("part"))
        x = state["fx:input"] if i == 0 else state["fx:hidden"]
        y = getattr(self.model, f"submod_{i}")(x)
        if not isinstance(y, torch.Tensor):
            raise ModelError(f"stage {spec.name} returned {type(y).__name__}, not one tensor")
        return {"fx:output" if i == self.n_stages - 1 else "fx:hidden": y}

    def default_seq_len(self):
        return None

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        if seq_len is not None or image_size is not None:
            raise InputError("fx models take their example input's shape; only `batch` applies", param="batch")
        shape = (batch,) + tuple(self.example.shape[1:])
        if self.example.is_floating_point():
            x = torch.randn(shape, generator=generator).to(dtype)
        else:
            x = self.example[:1].expand(shape).clone()
        return {"fx:input": x.to(device)}

    def output(self, state):
        return state["fx:output"]

    def output_description(self) -> str:
        return "module output"

    def monolithic(self, inputs):
        return self.original(inputs["fx:input"])


def stage_module(
    module: nn.Module,
    example_input: torch.Tensor,
    *,
    name: str = "fx",
    max_stages: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> StagedModel:
    """Cuts a plain module into stages where a single tensor crosses; :class:`ModelError` where it cannot."""
    module = module.eval().to(device=device, dtype=dtype)
    try:
        traced = fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds on untraceable code
        raise ModelError(
            f"{name}: torch.fx cannot trace this module ({type(e).__name__}: {e}); it cannot be cut"
        ) from None
    cuts = single_tensor_cuts(traced.graph)
    if not cuts:
        raise ModelError(f"{name}: no point in the graph where a single tensor crosses; it cannot be cut into stages")
    if len(cuts) > max_stages - 1:
        step = len(cuts) / (max_stages - 1)
        cuts = [cuts[int(k * step)] for k in range(max_stages - 1)]
    nodes = [n for n in traced.graph.nodes if n.op not in ("get_attr", "output")]
    part_of: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        part_of[n] = sum(1 for c in cuts if c <= i)
    for n in traced.graph.nodes:  # a parameter goes with its first user
        if n.op == "get_attr":
            part_of[n] = min(part_of.get(u, 0) for u in n.users) if n.users else 0
    split = split_module(traced, module, lambda n: part_of[n], keep_original_order=True)
    n_stages = len(cuts) + 1
    adapter = FxAdapter(split, n_stages, example_input.to(device))
    adapter.original = module
    h = hashlib.sha256(name.encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    info = ModelInfo(name, "fx", adapter.task, h.hexdigest(), f"{type(module).__name__} cut by torch.fx")
    return StagedModel(
        info, adapter, range(len(adapter.stage_specs())), device=torch.device(device), dtype=dtype, stats=LoadStats()
    )


def load_fx(name: str, *, dtype: torch.dtype, device: str | torch.device) -> StagedModel:
    """``fx:package.module:factory``: imports ``factory`` and cuts the ``(module, example_input)`` it returns."""
    target = name.removeprefix("fx:")
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise ModelError(f"{name}: write fx:package.module:factory (a function returning (module, example_input))")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"{name}: cannot import {target}: {e}") from None
    module, example = factory()
    return stage_module(module, example, name=name, dtype=dtype, device=device)
