"""Where a speculating driver's drafts come from (``draft=`` of :class:`~aiflow_cli.runtime.pipeline.Pipeline`,
``--draft`` of ``aiflow run``):

- ``untrained``: the device's last block's output through the model's own final norm + (tied) LM head;
- ``exit``: the same through a trained :class:`~aiflow_cli.models.exit_adapter.ExitAdapter` first
  (``aiflow draft train MODEL --exit-layer K``, K = the device's last block);
- ``auto`` (default): ``exit`` when an adapter for the device's last block exists, else ``untrained``;
- ``int8``: the target model itself with int8 linear layers (:mod:`aiflow_cli.models.quantized`), run whole on
  the device as a draft model (below): the device loads every stage of the target for it;
- any other value: a separate draft MODEL sharing the target's vocabulary, run whole on the device with its own KV
  cache (cropped back to the committed tokens after each round).

``auto:N`` / ``exit:N`` / ``untrained:N`` draft over a truncated vocabulary: the exit's head computes the logits of
the ``N`` most frequent tokens only (the model's :class:`~aiflow_cli.models.exit_adapter.DraftVocab`, counted by
``aiflow draft vocab`` or ``aiflow draft train``), not the whole vocabulary's (SmolLM2: 4096 of 49152 rows of the
tied head, which is about a fifth of a token's multiply-adds). Exactness is untouched: greedy drafts are verified
like any other, and a sampled draft's distribution is simply zero outside the subset (the rejection rule of
:mod:`aiflow_cli.models.sampling` is exact for any draft distribution). What the head applies to logits after
``lm_head`` (Gemma's soft-capping, a logit scale) is left out of the truncated head: monotone, it changes no greedy
draft, and a sampled draft distribution only needs to be *a* distribution.

A drafter only proposes tokens: the tiers behind verify every one, so greedy output is the full model's whatever
the drafts are. Exit drafters run the device's stages one position at a time (each draft is the exit's token
after the position before); a draft model proposes all ``g`` drafts first, then the device runs its stages on the
``g + 1`` positions in one pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from aiflow_cli.errors import InputError
from aiflow_cli.models.exit_adapter import ExitAdapter, exit_path, find_exit, find_vocab, vocab_path
from aiflow_cli.models.sampling import DraftDist, Sampling, draft_dist, draft_token
from aiflow_cli.models.state import BoundaryState

if TYPE_CHECKING:
    from aiflow_cli.models import StagedModel
    from aiflow_cli.runtime.node import TierNode

#: draft= values that are not a model name (the exits'; ``N`` most frequent tokens with ``KIND:N``).
KINDS = ("auto", "exit", "untrained")
#: draft= value of the target's own int8 copy.
INT8 = "int8"


def parse_draft(draft: Optional[str]) -> tuple[str, Optional[int]]:
    """``draft=`` as (kind or model, truncated vocabulary size or None): ``exit:4096`` -> ("exit", 4096); a model
    name (which may hold a colon: ``builtin:gpt2-tiny``) is returned whole. One-line error for ``exit:abc``."""
    text = (draft or "auto").strip()
    kind, sep, n = text.partition(":")
    if not sep or kind.strip() not in KINDS:
        return text, None
    try:
        size = int(n.strip())
    except ValueError:
        size = 0
    if size < 1:  # (N past the model's vocabulary: DraftVocab.subset)
        raise InputError(
            f"draft={text}: give {kind}:N with N the number of most frequent tokens to draft from (e.g. {kind}:4096)",
            param="draft",
        )
    return kind.strip(), size


Proposal = tuple[list[BoundaryState], BoundaryState, list[int], list[DraftDist]]
"""Per-position inputs of the device's first decode stage, the device's output for all positions (one state),
the drafts, and (sampling) the distribution each draft was drawn from."""


def choose(
    logits: torch.Tensor, sampling: Sampling, index: int, dists: list[DraftDist], ids: Optional[torch.Tensor] = None
) -> int:
    """The draft after ``logits`` ([V], or [N] of the token ids ``ids``) at answer place ``index``: the argmax
    when greedy, else a draw from the draft distribution (:func:`~aiflow_cli.models.sampling.draft_dist`, appended
    to ``dists``: it travels with the draft so that the output tier can apply the rejection rule; zero outside
    ``ids``)."""
    if sampling.greedy:
        i = int(logits.argmax(-1))
        return i if ids is None else int(ids[i])
    q = draft_dist(logits, sampling)
    if ids is not None:
        q = DraftDist(tuple(int(ids[i]) for i in q.ids), q.probs)
    dists.append(q)
    return draft_token(q, sampling, index)


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
    """The device's own layers + (optionally) a trained adapter + the model's head, over the whole vocabulary or
    (``vocab``: sorted token ids) over a truncated one."""

    def __init__(self, adapter: Optional[ExitAdapter] = None, vocab: Optional[torch.Tensor] = None):
        self.adapter = adapter
        self.name = "exit" if adapter is not None else "untrained"
        self.vocab = vocab
        self._head: Optional[tuple[Any, torch.Tensor, Optional[torch.Tensor]]] = None  # norm, rows, bias rows

    def describe(self) -> dict:
        out: dict = {"draft": self.name}
        if self.adapter is not None:
            out["exit_layer"] = self.adapter.exit_layer
        if self.vocab is not None:
            out["draft_vocab"] = int(self.vocab.numel())
        return out

    def logits(self, model: "StagedModel", h: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The exit's logits of the last position of ``h`` ([V], or [N] over :attr:`vocab`) and the token ids
        they are of (None: the whole vocabulary)."""
        if self.adapter is not None:
            h = self.adapter.to(h.device)(h)
        if self.vocab is None:
            return model.output(model.run_stage(model.num_stages - 1, {"hidden_states": h}))[0, -1], None
        if self._head is None:  # the head's rows of the subset, once (the head stage is loaded beside the device's)
            mods = [model.adapter.model.get_submodule(n) for n in model.stages[-1].modules]
            norm, lm = mods[0], mods[-1]
            weight: torch.Tensor = lm.weight  # type: ignore[assignment]
            lm_bias: Optional[torch.Tensor] = getattr(lm, "bias", None)
            ids = self.vocab.to(weight.device)
            bias = lm_bias.detach()[ids] if lm_bias is not None else None
            self._head = (norm, weight.detach()[ids].contiguous(), bias)
        norm, w, b = self._head
        return torch.nn.functional.linear(norm(h[:, -1:]), w, b)[0, -1], self.vocab

    def propose(
        self, node: "TierNode", cache, base: BoundaryState, pending: int, g: int, mine, sampling: Sampling, index: int
    ) -> Proposal:
        from aiflow_cli.runtime.speculate import join_positions

        model = node.model
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
                    logits, ids = self.logits(model, state["hidden_states"])
                    tok = torch.tensor([choose(logits, sampling, index + i, dists, ids)], dtype=torch.long)
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


def draft_vocab(model: "StagedModel", size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``model`` (its cached :class:`DraftVocab`); one-line errors when
    none was counted or ``size`` is out of range."""
    found = find_vocab(model.model_hash)
    if found is None:
        raise InputError(
            f"draft vocabulary of {model.name}: none counted ({vocab_path(model.model_hash)}); count it with "
            f"`aiflow draft vocab {model.name}` (or `aiflow draft train`)",
            param="draft",
        )
    return found.subset(size)


def make_drafter(draft: Optional[str], model: "StagedModel", stop: int) -> Drafter:
    """The drafter a device whose stages end at ``stop`` uses for ``draft`` (see the module docstring); one-line
    :class:`InputError` for an ``exit`` that was never trained or a draft model with another vocabulary."""
    kind, size = parse_draft(draft)
    layer = device_exit_layer(model, stop)
    vocab = draft_vocab(model, size) if size is not None else None
    if kind == "untrained":
        return ExitDrafter(None, vocab)
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
        return ExitDrafter(adapter, vocab)
    from aiflow_cli.models import load_model

    if kind == INT8:
        from aiflow_cli.models.quantized import int8_copy

        whole = model if len(model.loaded) == model.num_stages and model.dtype == torch.float32 else None
        whole = whole or load_model(model.name)
        return ModelDrafter(int8_copy(whole))
    other = load_model(kind)
    why = check_vocab(model, other)
    if why:
        raise InputError(f"draft={kind}: {why}", param="draft")
    return ModelDrafter(other)
