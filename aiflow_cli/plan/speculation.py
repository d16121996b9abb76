"""Speculation in the ``generate`` objective: how self-speculative decoding changes what a split costs.

With speculation the device (the driver of the generation, holding stages ``[0, k)``) drafts ``g`` tokens per
round with its own layers and the shared head (an early exit after stage ``k - 1``), and the tiers behind it
verify the ``g + 1`` positions in one message per link (aiflow_cli/runtime/speculate.py). If the exit's greedy
token equals the full model's with probability ``a`` (the profile's per-stage ``exit_acceptance``; a trained
exit's ``trained_exit_acceptance`` when the profile has one), a round yields on average

    E(a, g) = (1 - a^(g+1)) / (1 - a)        (g + 1 when a = 1)

tokens, so a token costs ``1 / E`` rounds. Per round the device drafts ``g`` tokens (its decode stages and the
head, each ``g`` times), every tier behind it runs one verification step (priced as one decode step: the ``g + 1``
positions run as one batch), and each link carries ``g + 1`` positions' step bytes up and ``g + 1`` token ids down,
plus one round trip and one message. A split whose device exit is accepted more needs fewer round trips per
token: that is what moves the optimum. docs/planner.md ("Speculation") gives the formula in full.

Pure functions of a :class:`~aiflow_cli.plan.problem.Problem`; the DP (solver.py) and the term-by-term
evaluator (cost.py) both price a split through :func:`spec_for`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from aiflow_cli.errors import InputError

#: ``speculate`` value meaning "choose the draft length per plan" (the planner tries 1 .. AUTO_MAX_DRAFT).
AUTO = -1
AUTO_MAX_DRAFT = 8
#: Largest fixed draft length accepted (the runtime's own bound is of the same order).
MAX_DRAFT = 16


def expected_tokens(a: float, g: int) -> float:
    """Expected tokens one round yields: the accepted prefix of ``g`` drafts, each accepted with probability
    ``a`` independently, plus the verifier's own token: ``(1 - a^(g+1)) / (1 - a)``."""
    if g < 0:
        raise ValueError(f"draft length {g} < 0")
    a = min(max(float(a), 0.0), 1.0)
    if a >= 1.0:
        return float(g + 1)
    return (1.0 - a ** (g + 1)) / (1.0 - a)


def parse_speculate(value: Union[None, int, str]) -> int:
    """``None``/``0``/``"off"`` -> 0 (no speculation), ``"auto"`` -> :data:`AUTO`, ``"K"``/K -> K (1..16)."""
    if value is None:
        return 0
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("", "off", "none", "0"):
            return 0
        if v == "auto":
            return AUTO
        try:
            value = int(v)
        except ValueError:
            raise InputError(
                f"speculate={value!r}: give a draft length K (1..{MAX_DRAFT}), auto, or off", param="speculate"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or not (value == AUTO or 0 <= value <= MAX_DRAFT):
        raise InputError(
            f"speculate={value!r}: give a draft length K (1..{MAX_DRAFT}), auto, or off", param="speculate"
        )
    return value


def stage_acceptance(stage: Any) -> Optional[float]:
    """The acceptance of an early exit after ``stage`` (a profile's StageProfile): the trained exit's when the
    profile has one, else the untrained exit's; None when neither was measured. Read defensively: older
    profiles have neither field."""
    for name in ("trained_exit_acceptance", "exit_acceptance"):
        v = getattr(stage, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0:
            return float(v)
    return None


@dataclass(frozen=True)
class Spec:
    """How one split speculates: the device ends at stage ``device_end`` (its exit follows stage
    ``device_end - 1``), drafts ``draft`` tokens per round accepted with probability ``acceptance`` each,
    ``tokens_per_round`` = E(a, g)."""

    device_end: int
    draft: int
    acceptance: float
    tokens_per_round: float

    @property
    def rounds_per_token(self) -> float:
        return 1.0 / self.tokens_per_round

    def to_json(self) -> dict[str, Any]:
        return {
            "device_end": self.device_end,
            "exit_after_stage": self.device_end - 1,
            "draft": self.draft,
            "acceptance": round(self.acceptance, 4),
            "tokens_per_round": round(self.tokens_per_round, 4),
        }


def spec_for(problem: Any, device_end: int, draft: Optional[int] = None) -> Optional[Spec]:
    """The speculation a plan whose device runs ``[0, device_end)`` gets under ``problem`` (draft length
    ``draft``, default the problem's), or None: speculation off, not a generation, the device does not drive the
    decode loop (it holds no decode stage), nothing behind it verifies (``device_end`` = all stages), or the
    exit after its last stage has no measured acceptance."""
    g = problem.speculate if draft is None else draft
    if g <= 0 or problem.objective != "generate" or problem.exit_acceptance is None:
        return None
    S = problem.n_stages
    first_decode = next((s for s in range(S) if problem.decode_stage[s]), S)
    if not (first_decode < device_end < S):
        return None
    a = problem.exit_acceptance[device_end - 1]
    if a is None or not math.isfinite(a):
        return None
    return Spec(device_end, g, float(a), expected_tokens(float(a), g))


def draft_lengths(problem: Any) -> list[int]:
    """The draft lengths to price: the problem's, or 1 .. AUTO_MAX_DRAFT for ``auto``."""
    return list(range(1, AUTO_MAX_DRAFT + 1)) if problem.speculate == AUTO else [problem.speculate]


def describe(problem: Any, rows: list) -> str:
    """The lines ``aiflow plan --explain`` prints under its table when speculation is priced: per strategy
    whether its decode steps were priced as speculative rounds (exit, draft length, acceptance, tokens per
    round) or as one round trip per token, and why."""
    measured = [
        i for i, a in enumerate(problem.exit_acceptance if problem.exit_acceptance is not None else []) if a == a
    ]
    g = "auto (best of 1.." + str(AUTO_MAX_DRAFT) + ")" if problem.speculate == AUTO else str(problem.speculate)
    lines = [
        f"speculation priced with draft length {g}: a round yields E = (1 - a^(g+1)) / (1 - a) tokens for exit "
        f"acceptance a; exits measured after stages "
        + (
            ", ".join(str(i) for i in measured)
            if measured
            else "none (the profile has no exit_acceptance: re-profile, or every split is priced without speculation)"
        )
    ]
    S = problem.n_stages
    first_decode = next((s for s in range(S) if problem.decode_stage[s]), S)
    for r in rows:
        ev = getattr(r, "evaluation", None)
        if ev is None or not ev.feasible:
            continue
        sp = ev.speculation
        if sp:
            lines.append(
                f"  {r.name}: device drafts with the exit after stage {sp['exit_after_stage']} "
                f"(a = {sp['acceptance']:.3f}), {sp['draft']} drafts per round, {sp['tokens_per_round']:.2f} tokens "
                f"per round trip"
            )
            continue
        k = r.placement.bounds[1]
        if k == S:
            why = "the device runs every stage: no round trips"
        elif k <= first_decode:
            why = "the device holds no decode stage: it does not drive the decoding"
        elif spec_for(problem, k, 1) is None:
            why = f"the exit after stage {k - 1} has no measured acceptance: a round trip per token"
        else:
            why = f"drafting with the exit after stage {k - 1} does not pay: a round trip per token"
        lines.append(f"  {r.name}: no speculation ({why})")
    return "\n".join(lines)
