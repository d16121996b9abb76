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


def in_process_tiers(name: str, bounds: tuple[int, int]):
    """The model and device, edge and cloud :class:`TierNode` s of the plan that cuts ``name`` after the stages
    of ``bounds``, in this process (messages still go through their encoding); the device holds the exit head."""
    from aiflow_cli.bench.decode import fixed_plan
    from aiflow_cli.models import load_model, load_stages
    from aiflow_cli.runtime.node import TierNode

    m = load_model(name)
    plan = fixed_plan(m, bounds)
    cloud = TierNode(plan, "cloud", model=load_stages(name, plan.stages_for("cloud")))
    edge = TierNode(plan, "edge", next_client=Direct(cloud), model=load_stages(name, plan.stages_for("edge")))
    device = TierNode(plan, "device", next_client=Direct(edge), exit_head=True)
    return m, (device, edge, cloud)


def generate_on(device, x, n: int, k, session: int, sampling=None):
    """One generation of ``n`` tokens driven by ``device`` (a :class:`TierNode`) in this process, speculating
    with ``k`` drafts per round (None: plain decoding; or a :class:`SpecPolicy`), greedy unless ``sampling``."""
    import time

    from aiflow_cli.models.sampling import GREEDY
    from aiflow_cli.runtime import speculate as spec
    from aiflow_cli.runtime.node import Payload
    from aiflow_cli.runtime.protocol import PREFILL

    return device.step(
        ("local", session),
        PREFILL,
        0,
        Payload(state=x),
        max_new_tokens=n,
        last=n <= 1,
        deadline=time.monotonic() + 120,
        speculate=k if isinstance(k, spec.SpecPolicy) or k is None else spec.SpecPolicy(k),
        sampling=sampling or GREEDY,
    )
