"""Edge pre-check of speculative drafts (hierarchical verification): a middle tier cuts a verify round short with
its own early exit before the output tier verifies it.

A greedy :class:`~aiflow_cli.runtime.protocol.Verify` round with ``precheck`` set reaches a middle tier (the edge)
that holds blocks: it crops its cache and runs all ``g + 1`` positions through its stages as always, then puts
its last block's output through the model's final norm + LM head (the ``head`` stage: loaded beside its stages
when the node was built with ``exit_head``, else on the first pre-checked round) and takes the argmax after each of
the first ``g`` positions. With ``m`` drafts matching those tokens it forwards only the first ``m + 1`` drafts (the
``m + 2`` positions up to and including the first draft its exit rejects; every draft when all match): the output
tier verifies fewer positions (less compute, fewer bytes on the edge-cloud link) and answers with fewer tokens.

Greedy output stays the full model's: the output tier still decides every emitted token, the edge only shortens
the round. A shortened round emits what the full round would have when the full model rejects a draft at or
before the one the edge rejected; it emits fewer tokens (never different ones) when the full model accepts past
it. Every tier applies :func:`~aiflow_cli.runtime.speculate.emitted` to the shorter target list (the accepted
prefix stops one before the end of the targets), so each tier sees the same tokens, the same end of the request,
and frees its session on the same round; the next round's crop to ``cache_len`` drops the positions the edge
ran and the cloud did not, on every tier. Sampled rounds (temperature > 0) are forwarded whole: the rejection rule
needs the full model's distribution at every draft, which the edge's exit does not give exactly.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Optional

import torch

from aiflow_cli.models.sampling import Sampling
from aiflow_cli.models.state import BoundaryState
from aiflow_cli.runtime.protocol import Verify
from aiflow_cli.runtime.speculate import accepted

if TYPE_CHECKING:
    from aiflow_cli.models import StagedModel
    from aiflow_cli.runtime.node import TierNode

_LOCK = threading.Lock()


def exit_model(node: "TierNode") -> "StagedModel":
    """The model whose head stage ``node``'s exit runs: its own when the head is loaded, else the head alone,
    loaded once per node (a tied head reads the embedding matrix: its bytes are added to the tier's weights)."""
    from aiflow_cli.models import load_stages

    head = node.model.num_stages - 1
    if head in node.model.loaded:
        return node.model
    with _LOCK:
        m: Optional["StagedModel"] = getattr(node, "precheck_head", None)
        if m is None:
            m = load_stages(node.plan.model, [head])
            node.precheck_head = m  # type: ignore[attr-defined]
    return m


def keep_positions(state: BoundaryState, drop: int) -> BoundaryState:
    """``state`` of ``p`` positions (along dim 1) less its last ``drop``; the attention mask, which covers the cache
    and every position, loses its last ``drop`` columns (the inverse of
    :func:`~aiflow_cli.runtime.speculate.join_positions`)."""
    if drop <= 0:
        return state
    return {k: v[:, : v.shape[1] - drop] for k, v in state.items()}


@torch.inference_mode()
def cut(
    node: "TierNode", state: BoundaryState, verify: Verify, sampling: Sampling, mine
) -> tuple[BoundaryState, Verify]:
    """The state and round ``node`` forwards after pre-checking ``verify``'s drafts against its exit (see the
    module docstring); unchanged for sampled rounds, rounds without drafts, and when every draft matches."""
    g = len(verify.draft)
    if not sampling.greedy or g == 0:
        return state, verify
    with node.computing(mine):
        m = exit_model(node)
        h = state["hidden_states"][:, :g]  # the exit's token after each position but the last (no draft follows)
        mine_tokens = m.output(m.run_stage(m.num_stages - 1, {"hidden_states": h}))[0].argmax(-1).tolist()
        keep = min(g, accepted(verify.draft, mine_tokens + [-1]) + 1)
    if keep == g:
        return state, verify
    return keep_positions(state, g - keep), replace(verify, draft=verify.draft[:keep])
