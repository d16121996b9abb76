"""Helpers of the runtime tests: a plan for a tiny built-in model that uses all three tiers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from aiflow_cli.links import load_link
from aiflow_cli.plan import Limits, solve
from aiflow_cli.plan.schema import Plan, save_plan
from aiflow_cli.profile import profile_model

THREE_TIERS = frozenset({"device", "edge", "cloud"})


@lru_cache(maxsize=None)
def _profile(model: str):
    return profile_model(
        model, repeats=1, warmup=0, codecs=["raw", "int8", "fp16"], calibration_items=2, calibration_tokens=4
    )


def three_tier_plan(model: str, path: Path, codec: str = "raw", tokens: int = 6) -> Plan:
    """A plan that runs stages on device, edge and cloud, every cut coded with ``codec``; saved at ``path``."""
    prof = _profile(model)
    links = {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")}
    objective = "generate" if prof.task in ("generate", "caption") else "latency"
    plan = solve(
        {"*": prof},
        links,
        objective=objective,
        tokens=tokens if objective == "generate" else 0,
        limits=Limits(require=THREE_TIERS, codecs=(codec,)),
        speeds={"device": 1, "edge": 1, "cloud": 1},
    )
    save_plan(plan, path)
    return plan


class Direct:
    """Stands in for the transport client of a tier: hands each request to the next tier's handler in-process."""

    def __init__(self, target) -> None:
        self.target = target

    def request(self, msg, timeout_s):
        from aiflow_cli.transport import PeerInfo

        return self.target.handle(msg, PeerInfo("127.0.0.1:0", "test-peer", 1))

    def reset_after(self, error) -> None:
        pass
