"""One decode step (or the prefill) of several sessions as one forward pass (continuous batching, see
runtime/batching.py). Prefills: :func:`batched_prefill` (prompts right-padded); decode steps, below.

Each session brings its own state of one token (``input_ids`` [1, 1] before the embed stage, ``hidden_states``
[1, 1, H] after it, ``attention_mask`` [1, past + 1], ``position_ids`` [1, 1]) and its own KV cache, whose
lengths differ. The step runs the family's own stage code (``StagedModel.run_stage``, the library's layers) once
on the stacked batch, against a temporary cache that holds every session's keys and values *left-padded* to the
longest past: the padded positions get 0 in the 2-D attention mask, so the library's mask builder excludes them
and each row attends to exactly its own past (softmax weight 0 on padding). Positions are per row
(``position_ids``: GPT-2's position embedding, Llama's rotary), so padding does not shift them. After the pass,
each session's cache gets the new token's keys and values of its row, and each session its own output row.

What batches: GPT-2 layouts (``gpt2``, without cross-attention) and the decoder families whose layers all use full
attention (Llama, SmolLM2, Qwen, ...): plain growing caches (``DynamicLayer``). Sliding-window layers, the
captioner's cross-attention and other families report :func:`unbatchable` and run one session at a time.
Dense layers see B rows instead of one and attention a padded mask, so logits match a solo step within float
tolerance (matrix kernels may sum in another order), not bitwise; greedy tokens match (tests/test_batching.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers.cache_utils import DynamicCache, DynamicLayer

from aiflow_cli.models.adapter import StageCache
from aiflow_cli.models.stage_setup import shared_setup
from aiflow_cli.models.state import BoundaryState

#: Families whose decode steps batch (GPT-2 layout and the decoder path of families/decoder.py).
BATCHED_FAMILIES = ("gpt2", "decoder")


def unbatchable(model, cache: Optional[StageCache]) -> Optional[str]:
    """Why ``model``'s decode steps with ``cache`` cannot join a batch (None when they can)."""
    from aiflow_cli.models.families.decoder import DecoderAdapter
    from aiflow_cli.models.families.gpt2 import GPT2Adapter

    if not isinstance(model.adapter, (GPT2Adapter, DecoderAdapter)):
        return f"{model.family} models run one session per step"
    if cache is None or cache.side:
        return "no cache, or side tensors (cross-attention) in it"
    kv = cache.kv
    if type(kv) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in kv.layers):
        return "a cache with sliding-window or cross-attention layers"
    return None


def step_kind(state: BoundaryState, cache: StageCache) -> Optional[str]:
    """``decode`` (one sequence, one new token, a cache holding its past), ``prefill`` (one sequence, its whole
    prompt, an empty cache) or None (runs alone): which batches a step of one session may join."""
    t = state.get("input_ids", state.get("hidden_states"))
    mask, pos = state.get("attention_mask"), state.get("position_ids")
    if t is None or mask is None or pos is None or t.dim() < 2 or t.shape[0] != 1 or mask.shape[0] != 1:
        return None
    if not any(layer.is_initialized for layer in cache.kv.layers):
        return "prefill" if mask.shape[1] == t.shape[1] == pos.shape[1] else None
    return "decode" if t.shape[1] == 1 else None


@torch.inference_mode()
def batched_prefill(model, stages: range, states: list[BoundaryState], caches: list[StageCache]) -> list[BoundaryState]:
    """The prefills of several sessions as one pass: prompts right-padded to the longest (padding masked out; a
    prompt's own positions attend only to its own earlier positions, so padding after it changes nothing there);
    each session's cache gets its own positions of every layer (copied), its output its own positions."""
    lens = [s["attention_mask"].shape[1] for s in states]
    longest = max(lens)
    batch = {
        k: torch.cat(
            [F.pad(s[k], (0, 0, 0, longest - n) if s[k].dim() == 3 else (0, longest - n)) for s, n in zip(states, lens)]
        )
        for k in states[0]
    }
    layers = sorted({model.stages[i].layer for i in stages if model.stages[i].layer is not None})
    tmp = model.new_cache()
    with shared_setup():  # one mask for the pass's blocks, as a solo run of stages builds
        for i in stages:
            batch = model.run_stage(i, batch, tmp)
    for layer in layers:
        new = tmp.kv.layers[layer]
        for c, k, v, n in zip(caches, new.keys.split(1), new.values.split(1), lens):
            c.kv.update(k[:, :, :n], v[:, :, :n], layer)
    rows = {k: v.split(1) for k, v in batch.items() if k not in ("attention_mask", "position_ids")}
    outs = [{k: r[row][:, : lens[row]] for k, r in rows.items()} for row in range(len(states))]
    for out, s in zip(outs, states):  # the head drops them; blocks carry each session's own on
        out.update({k: s[k] for k in ("attention_mask", "position_ids") if k in batch})
    return outs


@torch.inference_mode()
def batched_step(model, stages: range, states: list[BoundaryState], caches: list[StageCache]) -> list[BoundaryState]:
    """Runs ``stages`` of ``model`` once for all sessions; returns each session's output state (see module doc).
    Every session's cache is updated only after the whole pass succeeded (a failure leaves them as they were)."""
    masks = [s["attention_mask"] for s in states]
    longest = max(m.shape[1] for m in masks)
    pads = [longest - m.shape[1] for m in masks]
    batch: BoundaryState = {
        k: torch.cat([s[k] for s in states], dim=0) for k in states[0] if k not in ("attention_mask",)
    }
    batch["attention_mask"] = torch.cat([F.pad(m, (p, 0)) for m, p in zip(masks, pads)], dim=0)
    layers = sorted({model.stages[i].layer for i in stages if model.stages[i].layer is not None})
    tmp = model.new_cache()
    for layer in layers:
        kv = [c.kv.layers[layer] for c in caches]
        for cl, m in zip(kv, masks):
            if not cl.is_initialized or cl.keys.shape[-2] + 1 != m.shape[1]:
                raise RuntimeError(
                    f"layer {layer}: a session's cache holds {cl.keys.shape[-2] if cl.is_initialized else 0} positions, "
                    f"its attention mask {m.shape[1]} (past + 1)"
                )
        # [1, heads, past, dim] each -> [B, heads, longest past, dim], left-padded (one copy in C++)
        keys = pad_sequence([cl.keys[0].transpose(0, 1) for cl in kv], batch_first=True, padding_side="left")
        values = pad_sequence([cl.values[0].transpose(0, 1) for cl in kv], batch_first=True, padding_side="left")
        tmp.kv.update(keys.transpose(1, 2), values.transpose(1, 2), layer)
    with shared_setup():  # one mask for the pass's blocks, as a solo run of stages builds
        for i in stages:
            batch = model.run_stage(i, batch, tmp)
    for layer in layers:
        # each session's cache becomes its row of the batch's cache (a view: no copy per session); the batch's
        # tensors live until every session of the batch has moved on (its next step, or its end)
        new = tmp.kv.layers[layer]
        for c, k, v, p in zip(caches, new.keys.split(1), new.values.split(1), pads):
            cl = c.kv.layers[layer]
            cl.keys, cl.values = k[:, :, p:], v[:, :, p:]
    rows = {k: v.split(1) for k, v in batch.items() if k != "attention_mask"}
    outs = [{k: r[row] for k, r in rows.items()} for row in range(len(states))]
    if "attention_mask" in batch:  # the head drops it; blocks carry each session's own mask on
        for out, s in zip(outs, states):
            out["attention_mask"] = s["attention_mask"]
    return outs


def batched_pass(kind: str, model, stages: range, states: list[BoundaryState], caches: list[StageCache]):
    """:func:`batched_prefill` or :func:`batched_step` by ``kind`` (see :func:`step_kind`)."""
    return (batched_prefill if kind == "prefill" else batched_step)(model, stages, states, caches)
