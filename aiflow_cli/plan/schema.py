"""The plan: what `aiflow plan` writes and the runtime reads. Schema version 3 (version 2 added ``fidelity``: the
task's metric, bounded from the profile and measured end to end on the calibration set; version 3 places stage 0,
``input.prepare``, like any stage, and lists the raw input's upload as a cut with ``after_stage`` -1).

A plan places every stage of one model (``model_hash``) on one tier and names the codec of every cut between
tiers. ``tiers`` lists every tier of the problem in flow order (device first) with its stage range
``[start, end)``; an empty range means the tier runs nothing (it may still forward frames). ``cuts`` lists the
used cuts: after stage ``after_stage`` the boundary state goes from ``from_tier`` to ``to_tier`` over ``links``
coded with ``codec``; ``after_stage`` -1 is the raw input, sent ``raw`` by a device that runs no stage. The runtime needs only :meth:`Plan.stages_for`, :meth:`Plan.cut_codec` and
:func:`load_plan`; the rest records the prediction and the inputs the plan was solved for.
Times are milliseconds, sizes bytes, rates Mbit/s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from aiflow_cli.errors import PlanError
from aiflow_cli.links import LinkProfile
from aiflow_cli.schema import Strict, save_model
from aiflow_cli.task import Task

PLAN_SCHEMA_VERSION: Literal[3] = 3


class ProfileRef(Strict):
    """The profile a tier's figures came from."""

    path: Optional[str] = None
    model_hash: str
    hardware: str
    speed: float = Field(gt=0, description="stage and codec times were divided by this")


class TierPlan(Strict):
    name: str
    start: int = Field(ge=0, description="first stage run here")
    end: int = Field(ge=0, description="one past the last stage; start == end: runs nothing")
    stages: list[str] = Field(description="names of stages [start, end)")
    compute_ms: float = Field(ge=0, description="predicted compute per request (all decode steps for 'generate')")
    memory_bytes: int = Field(ge=0, description="params + largest peak activation of its stages")
    memory_limit_bytes: Optional[int] = None
    profile: ProfileRef


class CutPlan(Strict):
    after_stage: int = Field(ge=-1, description="-1: the raw input (before stage 0, input.prepare)")
    from_tier: str
    to_tier: str
    links: list[str] = Field(description="links crossed, in order (more than one when a tier in between relays)")
    codec: str
    bytes: int = Field(ge=0, description="encoded boundary state per request")
    decode_step_bytes: Optional[int] = Field(default=None, ge=0, description="per decode step ('generate')")
    fidelity: float = Field(
        description="the profile's fidelity (plan.fidelity.metric, lowest calibration item) with only this cut coded"
    )
    encode_ms: float = Field(ge=0)
    decode_ms: float = Field(ge=0)


class Prediction(Strict):
    """Predicted cost of one warm request. ``total_ms`` = sum of compute_ms + codec_ms + transfer_ms + rtt_ms +
    message_ms."""

    objective_value: float = Field(description="what was minimised: total_ms, or bottleneck_ms for throughput")
    total_ms: float
    prefill_ms: float
    per_token_ms: float = Field(description="one decode step ('generate'); 0 otherwise")
    tokens: int
    compute_ms: dict[str, float] = Field(description="tier -> ms")
    codec_ms: dict[str, float] = Field(description="cut 'from->to@after_stage' -> encode + decode ms")
    transfer_ms: dict[str, float] = Field(description="link -> serialisation ms (both directions)")
    rtt_ms: dict[str, float] = Field(description="link -> propagation ms (rtt/2 per crossing)")
    message_ms: dict[str, float] = Field(default_factory=dict, description="link -> fixed ms per message round trip")
    handshake_ms: dict[str, float] = Field(
        default_factory=dict, description="link -> connection set-up ms, paid once (not in total_ms)"
    )
    busy_ms: dict[str, float] = Field(description="pipeline resource -> ms per request (throughput model)")
    bottleneck: str
    bottleneck_ms: float
    throughput_rps: float
    fidelity_loss_bound: float = Field(
        description="sum over cuts of (1 - fidelity): the profile's composition (docs/planner.md)"
    )
    speculation: Optional[dict[str, Any]] = Field(
        default=None,
        description="when the decode steps were priced as self-speculative rounds: device_end, exit_after_stage, "
        "draft, acceptance, tokens_per_round (docs/planner.md, Speculation); None otherwise",
    )


class SolvedFor(Strict):
    objective: Literal["latency", "generate", "throughput"]
    tokens: int
    links: dict[str, LinkProfile]
    memory_bytes: dict[str, int]
    min_fidelity: Optional[float]
    skip: list[str]
    require: list[str]
    codecs: Optional[list[str]] = Field(description="codecs the solver could choose; None: every profiled one")
    profiles: dict[str, ProfileRef]
    input_bytes: Optional[int] = Field(
        default=None, description="raw input size used (bytes; the profile's unless given)"
    )
    speculate: int = Field(default=0, description="draft length priced in 'generate' (0: off, -1: auto)")


class PlanFidelity(Strict):
    """The plan's fidelity in the task's metric: the bound composed from the profile and, when measured, the
    chosen codecs at the chosen cuts run end to end on the calibration set (free-running for generation)."""

    metric: str = Field(description="token_agreement | embedding_cosine | label_agreement | output_cosine")
    floor: Optional[float] = Field(description="--min-fidelity the plan was solved for")
    bound: float = Field(description="1 - sum over used cuts of (1 - per-cut fidelity), from the profile")
    status: Literal["exact", "verified", "not measured"] = Field(
        description="exact: only lossless codecs; verified: measured >= floor; not measured: see note"
    )
    measured_min: Optional[float] = Field(default=None, description="lowest calibration item, end to end")
    measured_mean: Optional[float] = None
    items: int = Field(default=0, ge=0, description="calibration items measured")
    tokens: int = Field(default=0, ge=0, description="generated tokens per item (generation)")
    calibration_hash: Optional[str] = None
    tries: int = Field(default=1, ge=1, description="solves until a combination measured at or above the floor")
    excluded: list[str] = Field(
        default_factory=list, description="'codec@cut' excluded after measuring below the floor"
    )
    measure_s: float = Field(
        default=0.0, ge=0, description="time spent measuring (0 when every measurement was cached)"
    )
    note: str = ""


class SolverInfo(Strict):
    method: str
    solve_ms: float


class Plan(Strict):
    schema_version: Literal[3] = PLAN_SCHEMA_VERSION
    model: str
    model_hash: str
    family: str
    task: Task
    n_stages: int = Field(ge=1)
    stage_names: list[str]
    tiers: list[TierPlan]
    cuts: list[CutPlan]
    input_tier: str = Field(description="first tier that computes: the raw input is uploaded to it")
    output_tier: str = Field(description="last tier that computes: the output returns from it to the device")
    prediction: Prediction
    fidelity: PlanFidelity
    solved_for: SolvedFor
    solver: SolverInfo

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        if len(self.stage_names) != self.n_stages:
            raise ValueError(f"stage_names has {len(self.stage_names)} names for {self.n_stages} stages")
        if not self.tiers or self.tiers[0].name != "device":
            raise ValueError("tiers must start with 'device'")
        pos = 0
        for t in self.tiers:
            if t.start != pos or t.end < t.start:
                raise ValueError(
                    f"tier {t.name} has range [{t.start}, {t.end}); ranges must be contiguous from stage {pos}"
                )
            if t.stages != self.stage_names[t.start : t.end]:
                raise ValueError(f"tier {t.name}: stages do not match stage_names[{t.start}:{t.end}]")
            pos = t.end
        if pos != self.n_stages:
            raise ValueError(f"tier ranges end at stage {pos}, the model has {self.n_stages}")
        comp = [t for t in self.tiers if t.end > t.start]
        holders = self.tiers[:1] + [t for t in comp if t.name != "device"]  # the device holds the raw input
        expected = [(a.end - 1, a.name, b.name) for a, b in zip(holders, holders[1:])]
        got = [(c.after_stage, c.from_tier, c.to_tier) for c in self.cuts]
        if got != expected:
            raise ValueError(f"cuts {got} do not match the tier boundaries {expected}")
        if comp[0].name != self.input_tier or comp[-1].name != self.output_tier:
            raise ValueError("input_tier/output_tier must be the first/last tier that runs stages")
        return self

    # --- what the runtime asks -------------------------------------------------------------------------------
    def tier(self, name: str) -> TierPlan:
        for t in self.tiers:
            if t.name == name:
                return t
        raise PlanError(f"the plan has no tier {name!r} (tiers: {', '.join(t.name for t in self.tiers)})")

    def stages_for(self, tier: str) -> range:
        """Stage indices this tier loads and runs (possibly empty)."""
        t = self.tier(tier)
        return range(t.start, t.end)

    def tier_of_stage(self, stage: int) -> str:
        for t in self.tiers:
            if t.start <= stage < t.end:
                return t.name
        raise PlanError(f"stage {stage} is out of range: the model has {self.n_stages} stages")

    def cut_codec(self, after_stage: int) -> Optional[str]:
        """Codec of the boundary after ``after_stage`` (-1: the raw input); None when that boundary does not
        leave a tier."""
        for c in self.cuts:
            if c.after_stage == after_stage:
                return c.codec
        return None

    def boundary_name(self, after_stage: int) -> str:
        """What crosses after ``after_stage``: the stage's name, or ``raw input`` for -1."""
        return "raw input" if after_stage < 0 else self.stage_names[after_stage]

    def outgoing_cut(self, tier: str) -> Optional[CutPlan]:
        """The cut this tier sends on (None for the last computing tier or a tier that runs nothing)."""
        return next((c for c in self.cuts if c.from_tier == tier), None)

    def incoming_cut(self, tier: str) -> Optional[CutPlan]:
        return next((c for c in self.cuts if c.to_tier == tier), None)

    def computing_tiers(self) -> list[str]:
        return [t.name for t in self.tiers if t.end > t.start]

    def tiers_behind(self, tier: str) -> list[str]:
        """The tiers after ``tier`` (in the chain's order) that run stages: ``tier`` must reach the next tier when
        there are any (:class:`PlanError` for a tier the plan does not have)."""
        i = self.tiers.index(self.tier(tier))
        return [t.name for t in self.tiers[i + 1 :] if t.end > t.start]

    def check_model(self, model_hash: str) -> None:
        """Refuses a model other than the one the plan was solved for."""
        if model_hash != self.model_hash:
            raise PlanError(
                f"the plan is for model {self.model} (hash {self.model_hash[:12]}), this model's hash is "
                f"{model_hash[:12]}: re-run aiflow plan with profiles of this model"
            )

    def summary(self) -> str:
        """One line: where the stages run and the codec of each cut."""
        parts = []
        for t in self.tiers:
            if t.end > t.start:
                parts.append(f"{t.name}[{t.start}:{t.end}]")
                cut = self.outgoing_cut(t.name)
                if cut is not None:
                    parts.append(f"-{cut.codec}->")
        return " ".join(parts)


def load_plan(path: str | Path) -> Plan:
    """Reads and validates a plan JSON; errors name the file, the field and the fix. Older schema versions are
    refused in one line that says how to regenerate the file."""
    from aiflow_cli.errors import SchemaError
    from aiflow_cli.schema import read_data_file, validate

    data = read_data_file(path)
    got = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(got, int) and got < PLAN_SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: plan schema_version {got} has no input stage (input.prepare); re-run `aiflow plan ... -o "
            f"{path}` on profiles of schema version 3 (`aiflow profile`) to write schema version {PLAN_SCHEMA_VERSION}"
        )
    return validate(Plan, data, source=str(path), kind="plan")


def save_plan(plan: Plan, path: str | Path) -> None:
    save_model(plan, path)


def plan_from_solution(
    problem,
    placement,
    ev,
    *,
    solve_ms: float,
    sources: dict[str, str],
    method: str = "dp",
    fidelity: Optional[PlanFidelity] = None,
) -> Plan:
    """Builds the :class:`Plan` of a solved :class:`~aiflow_cli.plan.problem.Problem`. ``fidelity``: what the
    verifier measured (:mod:`aiflow_cli.plan.verify`); default: the profile's bound, not measured."""
    from aiflow_cli.plan.cost import segment_memory_bytes

    p, b = problem, placement.bounds
    refs = {t: ProfileRef(path=sources.get(t, sources.get("*")), **p.profile_ids[t]) for t in p.tiers}
    tiers = [
        TierPlan(
            name=t,
            start=b[i],
            end=b[i + 1],
            stages=p.stage_names[b[i] : b[i + 1]],
            compute_ms=ev.compute_ms[t],
            memory_bytes=segment_memory_bytes(p, i, b[i], b[i + 1]),
            memory_limit_bytes=p.memory_bytes[i],
            profile=refs[t],
        )
        for i, t in enumerate(p.tiers)
    ]
    cuts = []
    for k, a, z in placement.used_cuts():
        c = placement.codecs[k]
        step = int(p.cut_step_bytes[k, c]) if p.tokens and p.cut_decodes[k] else None
        cuts.append(
            CutPlan(
                after_stage=k - 1,
                from_tier=p.tiers[a],
                to_tier=p.tiers[z],
                links=p.link_names[a:z],
                codec=p.codecs[c],
                bytes=int(p.cut_bytes[k, c]),
                decode_step_bytes=step,
                fidelity=1.0 - float(p.cut_loss[k, c]),
                encode_ms=float(p.enc_ms[a, k, c]),
                decode_ms=float(p.dec_ms[z, k, c]),
            )
        )
    comp = placement.computing()
    pred = Prediction(
        objective_value=ev.objective_value(p.objective),
        total_ms=ev.total_ms,
        prefill_ms=ev.prefill_ms,
        per_token_ms=ev.per_token_ms,
        tokens=p.tokens,
        compute_ms=ev.compute_ms,
        codec_ms=ev.codec_ms,
        transfer_ms=ev.transfer_ms,
        rtt_ms=ev.propagation_ms,
        message_ms=ev.message_ms,
        handshake_ms=ev.handshake_ms,
        busy_ms=ev.busy_ms,
        bottleneck=ev.bottleneck,
        bottleneck_ms=ev.bottleneck_ms,
        throughput_rps=ev.throughput_rps,
        fidelity_loss_bound=ev.fidelity_loss,
        speculation=ev.speculation,
    )
    solved_for = SolvedFor(
        objective=p.objective,
        tokens=p.tokens,
        links=dict(zip(p.link_names, p.links)),
        memory_bytes={t: m for t, m in zip(p.tiers, p.memory_bytes) if m is not None},
        min_fidelity=p.limits.min_fidelity,
        skip=sorted(p.limits.skip),
        require=sorted(p.limits.require),
        codecs=list(p.limits.codecs) if p.limits.codecs is not None else None,
        profiles=refs,
        input_bytes=int(p.input_bytes),
        speculate=p.speculate,
    )
    if fidelity is None:
        from aiflow_cli.plan.verify import unmeasured

        fidelity = unmeasured(p, placement, "not verified (plan solved without a model)")
    return Plan(
        model=p.model,
        model_hash=p.model_hash,
        family=p.family,
        task=p.task,
        n_stages=p.n_stages,
        stage_names=p.stage_names,
        tiers=tiers,
        cuts=cuts,
        input_tier=p.tiers[comp[0]],
        output_tier=p.tiers[comp[-1]],
        prediction=pred,
        fidelity=fidelity,
        solved_for=solved_for,
        solver=SolverInfo(method=method, solve_ms=solve_ms),
    )
