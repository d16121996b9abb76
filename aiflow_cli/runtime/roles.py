"""The rules of a tier's place in the chain, torch-free: which roles a server takes, whom it trusts, when it must
reach the next tier. Their one home: the library classes (:class:`~aiflow_cli.runtime.serve.TierServer`,
:class:`~aiflow_cli.runtime.node.TierNode`, :class:`~aiflow_cli.runtime.pipeline.Pipeline`) apply them, and the
CLI applies them first, before importing torch (aiflow_cli/commands/checks.py). Errors name the parameter;
the CLI writes its flag (aiflow_cli/commands/flags.py)."""

from __future__ import annotations

from typing import Sequence

from aiflow_cli.errors import InputError
from aiflow_cli.plan.schema import Plan

#: The roles a server takes (the device side is a :class:`~aiflow_cli.runtime.pipeline.Pipeline`).
ROLES = ("edge", "cloud")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise InputError(f"role={role!r}: choose edge or cloud (the device side is `aiflow run`)", param="role")


def check_trust(trust: Sequence[object], insecure_dev: bool) -> None:
    """A server trusts listed fingerprints only: there is no default trust."""
    if not trust and not insecure_dev:
        raise InputError(
            "give `trust` FINGERPRINT for every peer (devices and the next tier); there is no "
            "default trust (`insecure_dev` exists for local experiments only)",
            param="trust,insecure_dev",
        )


def check_next_hop(plan: Plan, tier: str, given: bool, param: str) -> list[str]:
    """Refuses ``tier`` without a next hop (``given``: whether ``param`` names one) when tiers behind it run stages
    of ``plan``; returns those tiers (:class:`PlanError` for a tier the plan does not have)."""
    behind = plan.tiers_behind(tier)
    if behind and not given:
        nxt = plan.tiers[[t.name for t in plan.tiers].index(tier) + 1].name
        raise InputError(
            f"{tier} must reach the next tier ({nxt}): {', '.join(behind)} run stages of this plan (give `{param}`)",
            param=param,
        )
    return behind


__all__ = ["ROLES", "check_role", "check_trust", "check_next_hop"]
