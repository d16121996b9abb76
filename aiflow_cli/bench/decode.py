"""``aiflow bench decode``: token generation over a split model, with and without self-speculation.
(placeholder: filled in below)"""

from __future__ import annotations

from aiflow_cli.links import load_link
from aiflow_cli.models import StagedModel
from aiflow_cli.plan import Limits, solve
from aiflow_cli.plan.schema import Plan
from aiflow_cli.plan.synthetic import synthetic_profile

TIERS = ("device", "edge", "cloud")


def fixed_plan(model: StagedModel, bounds: tuple[int, int], codec: str = "raw") -> Plan:
    """A plan of ``model`` with fixed stage ranges: device ``[0:a)``, edge ``[a:b)``, cloud ``[b:n)`` for
    ``bounds = (a, b)`` (``(0, 0)``: cloud-only). Its prediction is of a synthetic profile (the runtime reads only
    the stage ranges and codecs)."""
    a, b = bounds
    n = model.num_stages
    if not 0 <= a <= b < n or (0 < a == b):
        raise ValueError(f"bounds {bounds}: need 0 <= device end <= edge end < {n}, the edge non-empty when split")
    prof = synthetic_profile(n, n_codecs=1, model_hash=model.model_hash).model_copy(
        update={"model": model.name, "family": model.family, "task": model.task}
    )
    computing = {t for t, (lo, hi) in zip(TIERS, ((0, a), (a, b), (b, n))) if hi > lo}
    plan = solve(
        {"*": prof},
        {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")},
        objective="generate",
        tokens=4,
        limits=Limits(require=frozenset(computing), skip=frozenset(TIERS) - computing, codecs=(codec,)),
        speeds={t: 1 for t in TIERS},
    )
    d = plan.model_dump(mode="json")
    ranges = dict(zip(TIERS, ((0, a), (a, b), (b, n))))
    for t in d["tiers"]:
        t["start"], t["end"] = ranges[t["name"]]
        t["stages"] = model.stage_names[t["start"] : t["end"]]
    ends = {t["name"]: t["end"] for t in d["tiers"]}
    for c in d["cuts"]:
        c["after_stage"] = ends[c["from_tier"]] - 1
    d["stage_names"] = model.stage_names
    return Plan.model_validate(d)
