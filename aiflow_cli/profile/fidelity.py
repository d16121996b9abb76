"""Fidelity of an end output against the exact one: the numbers a codec's cut is judged by."""

from __future__ import annotations

import torch

from aiflow_cli.profile.schema import Fidelity


def compare(exact: torch.Tensor, approx: torch.Tensor, *, token_outputs: bool) -> Fidelity:
    """Cosine similarity (mean over output rows: one per position for logits, one per sequence for embeddings),
    max absolute error, and for LMs the share of positions whose argmax token agrees."""
    e = exact.float().reshape(-1, exact.shape[-1])
    a = approx.float().reshape(-1, approx.shape[-1])
    cos = torch.nn.functional.cosine_similarity(e, a, dim=-1, eps=1e-12)
    same = torch.equal(e, a)
    cosine = 1.0 if same else float(cos.mean().clamp(-1.0, 1.0))
    top1 = None
    if token_outputs:
        top1 = float((e.argmax(-1) == a.argmax(-1)).float().mean())
    return Fidelity(cosine=cosine, max_abs_error=float((e - a).abs().max()) if e.numel() else 0.0, top1_agreement=top1)
