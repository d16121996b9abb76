"""The strategies aiflow is compared with: one table of names and definitions, used by ``aiflow plan
--explain``, ``aiflow demo`` and ``aiflow bench e2e``.

| name          | definition                                                                                      |
|---------------|-------------------------------------------------------------------------------------------------|
| device-only   | every stage on the device                                                                       |
| edge-only     | every stage on the edge; the request input goes up uncoded, the output comes back               |
| cloud-only    | every stage on the cloud; the input goes up uncoded (the edge relays), the output comes back    |
| raw-split     | the best placement over all tiers with the ``raw`` codec only (a Neurosurgeon-style split; it  |
|               | may coincide with one of the above)                                                             |
| aiflow        | the optimum: placement and codec per cut, under the fidelity floor                              |

Each is solved by the same planner on the same profile, links, tier speeds and overheads, so the predictions are
comparable (:func:`solve_strategies`). The same names are what :mod:`aiflow_cli.plan.explain` prices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from aiflow_cli.errors import PlanError
from aiflow_cli.links import LinkProfile
from aiflow_cli.plan.problem import TIER_ORDER, Limits, Overheads
from aiflow_cli.profile.schema import ModelProfile

if TYPE_CHECKING:
    from aiflow_cli.plan.schema import Plan

OPTIMAL = "aiflow"
RAW_SPLIT = "raw-split"


def only(tier: str) -> str:
    """The name of the strategy that runs every stage on ``tier``."""
    return f"{tier}-only"


@dataclass(frozen=True)
class StrategyDef:
    """One strategy: its ``name``, a one-line ``definition`` and the limits that make the planner solve it."""

    name: str
    definition: str

    def limits(self, tiers: tuple[str, ...] | list[str], min_fidelity: Optional[float] = None) -> Limits:
        """The planner's limits for this strategy over ``tiers``; ``min_fidelity`` binds only the codec choice
        of ``aiflow`` (the others send exactly what the model computes)."""
        if self.name == OPTIMAL:
            return Limits(min_fidelity=min_fidelity)
        if self.name == RAW_SPLIT:
            return Limits(codecs=("raw",))
        tier = self.name.removesuffix("-only")
        return Limits(skip=frozenset(t for t in tiers if t != tier))


STRATEGIES: tuple[StrategyDef, ...] = (
    *(
        StrategyDef(
            only(t),
            f"every stage on the {t}" + ("" if t == "device" else "; the input goes up uncoded, the output comes back"),
        )
        for t in TIER_ORDER
    ),
    StrategyDef(RAW_SPLIT, "the best placement with the raw codec only (no compression)"),
    StrategyDef(OPTIMAL, "the planned placement and codecs, under the fidelity floor"),
)
BY_NAME = {s.name: s for s in STRATEGIES}
#: The strategies aiflow is compared with (everything but the optimum), in table order.
BASELINES = tuple(s.name for s in STRATEGIES if s.name != OPTIMAL)


def strategy_names(tiers: tuple[str, ...] | list[str] = TIER_ORDER) -> list[str]:
    """Strategy names for a problem over ``tiers`` (single-tier strategies only for tiers it has)."""
    return [s.name for s in STRATEGIES if not s.name.endswith("-only") or s.name.removesuffix("-only") in tiers]


def solve_strategies(
    profile: ModelProfile,
    links: dict[str, LinkProfile],
    speeds: dict[str, float],
    *,
    names: Optional[list[str]] = None,
    tokens: int = 16,
    input_bytes: Optional[int] = None,
    overheads: Optional[Overheads] = None,
    min_fidelity: Optional[float] = None,
) -> dict[str, Union[Plan, PlanError]]:
    """One plan per strategy (``names``: default all for the tiers in ``speeds``), by
    :func:`aiflow_cli.plan.solver.solve_variants`; a strategy no placement satisfies maps to its PlanError."""
    from aiflow_cli.plan.solver import solve_variants

    tiers = [t for t in TIER_ORDER if t in speeds]
    out: dict = {}
    for name in names or strategy_names(tiers):
        if name not in BY_NAME:
            raise ValueError(f"unknown strategy {name!r}: {', '.join(BY_NAME)}")
        try:
            out.update(
                solve_variants(
                    profile,
                    links,
                    speeds,
                    {name: BY_NAME[name].limits(tiers, min_fidelity)},
                    tokens=tokens,
                    input_bytes=input_bytes,
                    overheads=overheads,
                )
            )
        except PlanError as e:
            out[name] = e
    return out
