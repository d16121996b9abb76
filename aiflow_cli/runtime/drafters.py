"""Where a speculating driver's drafts come from (``draft=`` of :class:`~aiflow_cli.runtime.pipeline.Pipeline`,
``--draft`` of ``aiflow run``):

- ``untrained``: the device's last block's output through the model's own final norm + (tied) LM head;
- ``exit``: the same through a trained :class:`~aiflow_cli.models.exit_adapter.ExitAdapter` first
  (``aiflow draft train MODEL --exit-layer K``, K = the device's last block);
- ``auto`` (default): ``exit`` when an adapter for the device's last block exists, else ``untrained``;
- any other value: a separate draft MODEL sharing the target's vocabulary, run whole on the device with its own KV
  cache (cropped back to the committed tokens after each round).

A drafter only proposes tokens: the tiers behind verify every one, so greedy output is the full model's whatever
the drafts are. Exit drafters run the device's stages one position at a time (each draft is the exit's token
after the position before); a draft model proposes all ``g`` drafts first, then the device runs its stages on the
``g + 1`` positions in one pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from aiflow_cli.errors import InputError
from aiflow_cli.models.exit_adapter import ExitAdapter, exit_path, find_exit
from aiflow_cli.models.sampling import DraftDist, Sampling, draft_dist, draft_token
from aiflow_cli.models.state import BoundaryState

if TYPE_CHECKING:
    from aiflow_cli.models import StagedModel
    from aiflow_cli.runtime.node import TierNode

#: draft= values that are not a model name.
KINDS = ("auto", "exit", "untrained")

Proposal = tuple[list[BoundaryState], BoundaryState, list[int], list[DraftDist]]
"""Per-position inputs of the device's first decode stage, the device's output for all positions (one state),
the drafts, and (sampling) the distribution each draft was drawn from."""


def choose(logits: torch.Tensor, sampling: Sampling, index: int, dists: list[DraftDist]) -> int:
    """The draft after ``logits`` ([V]) at answer place ``index``: the argmax when greedy, else a draw from the
    draft distribution (:func:`~aiflow_cli.models.sampling.draft_dist`, appended to ``dists``: it travels with the
    draft so that the output tier can apply the rejection rule)."""
    if sampling.greedy:
        return int(logits.argmax(-1))
    dists.append(draft_dist(logits, sampling))
    return draft_token(dists[-1], sampling, index)


def device_exit_layer(model: "StagedModel", stop: int) -> Optional[int]:
    """The block layer whose output the device's exit reads (its last stage ``stop - 1``), None if not a block."""
    spec = model.stages[stop - 1] if stop > 0 else None
    return spec.layer if spec is not None and spec.kind == "block" else None


class Drafter:
    """Proposes drafts for one driver; :meth:`start` makes its per-request state."""

    name = "drafter"
    needs_head = True  # whether the driver loads the head stage beside its stages

    def start(self, node: "TierNode", prompt: BoundaryState) -> "Drafter":
        return self

    def propose(
        self, node: "TierNode", cache, base: BoundaryState, pending: int, g: int, mine, sampling: Sampling, index: int
    ) -> Proposal:
        """``g`` drafts after the ``pending`` token (answer place ``index - 1``; the first draft's is ``index``),
        and the device's stages run on the ``g + 1`` positions with ``cache``."""
        raise NotImplementedError

    def commit(self, pending: int, tokens: list[int]) -> None:
        """A round ran the ``pending`` token and emitted ``tokens`` (accepted drafts + the full model's one)."""

    def describe(self) -> dict:
        return {"draft": self.name}


class ExitDrafter(Drafter):
    """The device's own layers + (optionally) a trained adapter + the model's head."""

    def __init__(self, adapter: Optional[ExitAdapter] = None):
        self.adapter = adapter
        self.name = "exit" if adapter is not None else "untrained"

    def describe(self) -> dict:
        out: dict = {"draft": self.name}
        if self.adapter is not None:
            out["exit_layer"] = self.adapter.exit_layer
        return out

    def propose(
        self, node: "TierNode", cache, base: BoundaryState, pending: int, g: int, mine, sampling: Sampling, index: int
    ) -> Proposal:
        from aiflow_cli.runtime.speculate import join_positions

        model = node.model
        head = model.num_stages - 1
        inputs: list[BoundaryState] = []
        states: list[BoundaryState] = []
        draft: list[int] = []
        dists: list[DraftDist] = []
        tok = torch.tensor([pending], dtype=torch.long)
        for i in range(g + 1):
            step_in = model.next_inputs(inputs[-1] if inputs else base, tok)
            state, _ = node.run_stages(node.decode_start, step_in, cache, mine)
            mine.steps += 1
            inputs.append(step_in)
            states.append(state)
            if i < g:  # the early exit: this tier's last block -> (adapter) -> the final norm -> the LM head
                with node.computing(mine), torch.inference_mode():
                    h = state["hidden_states"]
                    if self.adapter is not None:
                        h = self.adapter.to(h.device)(h)
                    logits = model.output(model.run_stage(head, {"hidden_states": h}))
                    tok = torch.tensor([choose(logits[0, -1], sampling, index + i, dists)], dtype=torch.long)
                draft.append(int(tok))
        return inputs, join_positions(states), draft, dists


class ModelDrafter(Drafter):
    """A separate draft model on the device (see the module docstring). One request at a time per instance:
    :meth:`start` returns a fresh per-request copy that shares the weights."""

    needs_head = False

    def __init__(self, draft: "StagedModel"):
        self.draft = draft
        self.name = draft.name
        self.cache: Any = None  # a StageCache of the draft model, per request (start)
        self.tokens: list[int] = []  # the committed tokens (prompt + emitted but the pending one)
        self.fed = 0  # positions in the draft's cache

    def describe(self) -> dict:
        return {"draft": "model", "draft_model": self.draft.name}

    def start(self, node: "TierNode", prompt: BoundaryState) -> "ModelDrafter":
        req = ModelDrafter(self.draft)
        req.cache = self.draft.new_cache()
        req.tokens = [int(t) for t in prompt["input_ids"][0]]
        return req

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Runs ``ids`` (the next positions) through the draft model; returns its logits after the last ([V])."""
        d, n = self.draft, len(ids)
        state = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones(1, self.fed + n, dtype=torch.long),
            "position_ids": torch.arange(self.fed, self.fed + n).unsqueeze(0),
        }
        out = d.output(d.run(state, range(d.num_stages), self.cache))
        self.fed += n
        return out[0, -1]

    def propose(
        self, node: "TierNode", cache, base: BoundaryState, pending: int, g: int, mine, sampling: Sampling, index: int
    ) -> Proposal:
        from aiflow_cli.runtime.speculate import join_positions

        model = node.model
        draft: list[int] = []
        dists: list[DraftDist] = []
        with node.computing(mine):
            if self.fed > len(self.tokens):  # drop the previous round's rejected drafts
                self.cache.crop(len(self.tokens))
                self.fed = len(self.tokens)
            if g:
                # catch up (the prompt; a bonus token) + pending
                tok = choose(self._feed(self.tokens[self.fed :] + [pending]), sampling, index, dists)
                draft.append(tok)
                for i in range(1, g):
                    tok = choose(self._feed([tok]), sampling, index + i, dists)
                    draft.append(tok)
        inputs: list[BoundaryState] = []
        for tok in [pending] + draft:
            inputs.append(model.next_inputs(inputs[-1] if inputs else base, torch.tensor([tok], dtype=torch.long)))
        state, _ = node.run_stages(node.decode_start, join_positions(inputs), cache, mine)
        mine.steps += 1
        return inputs, state, draft, dists

    def commit(self, pending: int, tokens: list[int]) -> None:
        # the pending token and the accepted drafts are committed; the last emitted token is the next pending one
        self.tokens += [pending] + tokens[:-1]


def check_vocab(target: "StagedModel", draft: "StagedModel") -> Optional[str]:
    """Why ``draft`` cannot draft for ``target`` (None when it can): a language model with the same vocabulary."""
    if draft.task != "generate" or draft.stages[-1].kind not in ("head",):
        return f"{draft.name} ({draft.task}) is not a language model"
    if target.decode_start != 1 or draft.decode_start != 1:
        return f"{target.name}: a draft model drafts for text-only language models"
    tv, dv = target.adapter.config.vocab_size, draft.adapter.config.vocab_size
    if tv != dv:
        return f"{draft.name} has a vocabulary of {dv} tokens, {target.name} of {tv}: they must share one"
    tt, dt = target.adapter.options.get("tokenizer_dir"), draft.adapter.options.get("tokenizer_dir")
    if bool(tt) != bool(dt):
        return f"{draft.name} and {target.name} do not share a tokenizer (one has none)"
    if tt and dt:
        from aiflow_cli.models.inputs import load_tokenizer

        if load_tokenizer(str(tt)).get_vocab() != load_tokenizer(str(dt)).get_vocab():
            return f"{draft.name} and {target.name} have different tokenizers' vocabularies"
    return None


def make_drafter(draft: Optional[str], model: "StagedModel", stop: int) -> Drafter:
    """The drafter a device whose stages end at ``stop`` uses for ``draft`` (see the module docstring); one-line
    :class:`InputError` for an ``exit`` that was never trained or a draft model with another vocabulary."""
    kind = (draft or "auto").strip()
    layer = device_exit_layer(model, stop)
    if kind == "untrained":
        return ExitDrafter(None)
    if kind in ("auto", "exit"):
        adapter = find_exit(model.model_hash, layer)
        if adapter is None and kind == "exit":
            where = f"block {layer}" if layer is not None else "the device's last stage (not a block)"
            train = (
                f"; train one with `aiflow draft train {model.name}`, exit_layer={layer}" if layer is not None else ""
            )
            raise InputError(
                f"draft=exit: no trained exit for {model.name} after {where} "
                f"({exit_path(model.model_hash, layer if layer is not None else -1).parent}){train}",
                param="draft,exit_layer",
            )
        return ExitDrafter(adapter)
    from aiflow_cli.models import load_model

    other = load_model(kind)
    why = check_vocab(model, other)
    if why:
        raise InputError(f"draft={kind}: {why}", param="draft")
    return ModelDrafter(other)
