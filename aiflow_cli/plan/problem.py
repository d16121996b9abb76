"""The planning problem as arrays: profiles, links and limits checked against each other and flattened.

Every solver (the DP, the brute force, explain, sweep) reads a :class:`Problem`; nothing downstream touches the
profile objects again. Building one is where bad inputs are refused: a missing tier or link, profiles of
different models, an unknown codec in ``--codecs``, generation asked of a profile without decode timings.

Indexing: tiers ``0 .. T-1`` in flow order (device first); stages ``0 .. S-1`` (stage 0 is ``input.prepare``);
boundary ``b`` (``0 .. S-1``) is what stage ``b`` reads: ``b = 0`` is the raw input, held by the device (the
profile's ``input``, codec ``raw``), ``b >= 1`` the state after stage ``b - 1`` (the profile's ``cuts[b - 1]``,
a plan's ``after_stage = b - 1``). Every boundary is priced alike: a device that computes nothing sends boundary 0
to the first tier that does, as any tier sends its last boundary on. Codecs ``0 .. C-1`` (``raw`` first); link
``l`` joins tier ``l`` and tier ``l + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from aiflow_cli.errors import InputError, PlanError
from aiflow_cli.links import LinkProfile
from aiflow_cli.profile.schema import ModelProfile
from aiflow_cli.task import Task

#: Tier names aiflow knows, in flow order. A problem uses a subset of them, always including ``device``.
TIER_ORDER = ("device", "edge", "cloud")

Objective = Literal["latency", "generate", "throughput"]
OBJECTIVES: tuple[str, ...] = ("latency", "generate", "throughput")

#: Bytes of one generated token id travelling back down when a profile does not say (an int64 id, unframed).
DEFAULT_TOKEN_BYTES = 8


@dataclass
class Limits:
    """What a plan must respect. ``memory_bytes``: tier -> limit on params + peak activation (bytes).
    ``min_fidelity``: floor on the profile's fidelity metric (token agreement, embedding cosine, ...; see the
    profile's ``calibration``), per cut and end to end (docs/planner.md, "Fidelity", gives the composition).
    ``skip``: tiers that must run no stage (they may still relay). ``require``: tiers that must run a stage of
    the model itself: ``input.prepare`` alone does not count (for text it passes token ids through)."""

    memory_bytes: dict[str, int] = field(default_factory=dict)
    min_fidelity: Optional[float] = None
    skip: frozenset[str] = frozenset()
    require: frozenset[str] = frozenset()
    codecs: Optional[tuple[str, ...]] = None  # restrict the codecs the solver may choose (None: all profiled)


@dataclass(frozen=True)
class Overheads:
    """Fixed costs that a model profile cannot see (ms), measured on this machine by
    :func:`aiflow_cli.runtime.calibrate.calibrate` (zero when no calibration is given).

    ``message_ms``: one request/reply over one link beyond propagation and serialisation (framing, the Python
    hand-offs of both tiers, the transport, the link emulator's timer when there is one); paid once per message
    round trip: once per link a request crosses, and once per link per decode step in the decode path.
    ``handshake_ms``: opening one connection beyond one round trip of its link (QUIC + TLS 1.3 is a 1-RTT
    handshake); paid once per connection, reported apart from warm requests, never in the objective."""

    message_ms: float = 0.0
    handshake_ms: float = 0.0
    source: str = "none"

    def dilated(self, factor: float) -> "Overheads":
        """Under time dilation by ``factor`` these real-time costs appear ``factor`` times smaller."""
        return Overheads(self.message_ms / factor, self.handshake_ms / factor, f"{self.source} / {factor:g} (dilated)")


@dataclass
class Problem:
    """A planning instance as arrays (times ms, sizes bytes). Built by :func:`build_problem`."""

    model: str
    model_hash: str
    family: str
    task: Task
    tiers: list[str]
    stage_names: list[str]
    codecs: list[str]
    links: list[LinkProfile]
    objective: str
    tokens: int
    prefill_ms: np.ndarray  # (T, S) per-stage prefill time on each tier
    decode_ms: np.ndarray  # (T, S) per-stage decode-step time (0 where the stage does not run per step)
    decode_stage: np.ndarray  # (S,) bool: the stage runs at every decode step
    param_bytes: np.ndarray  # (S,)
    peak_bytes: np.ndarray  # (T, S) peak extra activation memory per stage on each tier
    cut_bytes: np.ndarray  # (S, C) encoded bytes of boundary b's whole state (inf: codec not available)
    cut_step_bytes: np.ndarray  # (S, C) encoded bytes of one decode step's boundary (0 where none)
    step_fraction: np.ndarray  # (S,) raw step bytes / raw prefill bytes: scales codec time per step
    enc_ms: np.ndarray  # (T, S, C) encode time when the tier sends boundary b
    dec_ms: np.ndarray  # (T, S, C) decode time when the tier receives it
    cut_loss: (
        np.ndarray
    )  # (S, C) 1 - fidelity (the profile's metric, lowest calibration item) with only this boundary coded (>= 0)
    available: np.ndarray  # (S, C) bool: codec measured at this boundary (and allowed)
    output_bytes: float
    token_bytes: float
    limits: Limits
    memory_bytes: list[Optional[int]]  # per tier
    skip: np.ndarray  # (T,) bool
    require: np.ndarray  # (T,) bool
    input_stage: bool = False  # stage 0 is input.prepare: running it alone does not meet `require`
    profile_ids: dict[str, dict] = field(default_factory=dict)  # tier -> identity of the profile it used
    input_description: str = ""  # what the stage-0 input is (the profile's words), for explanations
    overheads: Overheads = field(default_factory=Overheads)  # fixed per-message / per-connection costs (ms)
    fidelity_metric: str = "output_cosine"  # what cut_loss measures (the profile's calibration.metric)
    calibration_hash: Optional[str] = None  # the calibration set the profiles' fidelity was measured on
    excluded: tuple[str, ...] = ()  # 'codec@cut' removed after measuring below the floor (plan/verify.py)
    speculate: int = 0  # draft length of self-speculation priced in 'generate' (0: off; -1: auto), plan/speculation.py
    exit_acceptance: Optional[np.ndarray] = None  # (S,) acceptance of an early exit after each stage (nan: unknown)

    @property
    def n_tiers(self) -> int:
        return len(self.tiers)

    @property
    def n_stages(self) -> int:
        return len(self.stage_names)

    @property
    def n_codecs(self) -> int:
        return len(self.codecs)

    @property
    def cut_decodes(self) -> np.ndarray:
        """(S,) bool: every decode step crosses boundary b (the stage before it runs per step; never the raw
        input, which is sent once)."""
        return np.concatenate([[False], self.decode_stage[:-1]])

    def runs_model_stage(self, start: int, end: int) -> bool:
        """Whether stages ``[start, end)`` include one of the model itself (not only ``input.prepare``)."""
        return end > max(start, 1 if self.input_stage else 0)

    @property
    def input_bytes(self) -> float:
        """What uploading the raw input (boundary 0) costs in bytes: it always goes ``raw``."""
        return float(self.cut_bytes[0, 0])

    @property
    def link_names(self) -> list[str]:
        return [f"{a}-{b}" for a, b in zip(self.tiers, self.tiers[1:])]

    @property
    def fidelity_budget(self) -> float:
        """Allowed sum of (1 - fidelity) over the used cuts; inf without a floor."""
        return np.inf if self.limits.min_fidelity is None else 1.0 - self.limits.min_fidelity

    def with_link(self, index: int, link: LinkProfile) -> "Problem":
        """A copy with one link replaced (bandwidth sweeps); arrays are shared, they are never mutated."""
        links = list(self.links)
        links[index] = link
        return _replace(self, links=links)

    def without(self, boundary: int, codec: int) -> "Problem":
        """A copy where codec index ``codec`` may not be chosen at ``boundary`` (it measured below the floor);
        recorded as ``codec@after_stage``."""
        available = self.available.copy()
        available[boundary, codec] = False
        excluded = self.excluded + (f"{self.codecs[codec]}@{boundary - 1}",)
        return _replace(self, available=available, excluded=excluded)

    def with_codecs(self, names: list[str]) -> "Problem":
        """A copy where only ``names`` may be chosen (``raw`` is always measured)."""
        keep = np.array([c in names for c in self.codecs])
        available = self.available & keep[None, :]
        available[0] = self.available[0]  # the raw input goes raw whatever the cuts may use
        return _replace(self, available=available)


def _replace(p: Problem, **kw) -> Problem:
    import dataclasses

    return dataclasses.replace(p, **kw)


def order_tiers(names: list[str]) -> list[str]:
    """Puts tier names in flow order; refuses unknown names and a set without ``device``."""
    unknown = [n for n in names if n not in TIER_ORDER]
    if unknown:
        raise InputError(f"unknown tier {unknown[0]!r}: tiers are {', '.join(TIER_ORDER)}")
    if "device" not in names:
        raise InputError(
            "no 'device' tier: the request starts on the device; give profiles[device]=... or speeds[device]=...",
            param="profiles,speeds",
        )
    return [t for t in TIER_ORDER if t in names]


def _check_same_model(profiles: dict[str, ModelProfile]) -> None:
    ref_tier, ref = next(iter(profiles.items()))
    for tier, p in profiles.items():
        if p.model_hash != ref.model_hash:
            raise PlanError(
                f"the {tier} profile is of model {p.model!r} (hash {p.model_hash[:12]}), the {ref_tier} profile of "
                f"{ref.model!r} (hash {ref.model_hash[:12]}): profile the same model on every tier"
            )
        if [s.name for s in p.stages] != [s.name for s in ref.stages]:
            raise PlanError(
                f"the {tier} and {ref_tier} profiles cut the model into different stages: re-profile both with the same aiflow"
            )
        for key in ("batch", "seq_len", "image_size"):
            a, b = getattr(p.settings, key), getattr(ref.settings, key)
            if a != b:
                raise PlanError(
                    f"the {tier} profile has {key}={a}, the {ref_tier} profile {key}={b}: profile every tier with the same input shape"
                )
        if p.calibration.metric != ref.calibration.metric:
            raise PlanError(
                f"the {tier} profile measures fidelity as {p.calibration.metric}, the {ref_tier} profile as "
                f"{ref.calibration.metric}: re-profile both with the same aiflow"
            )


def build_problem(
    profiles: dict[str, ModelProfile],
    links: dict[str, LinkProfile],
    *,
    objective: str = "latency",
    tokens: int = 0,
    limits: Optional[Limits] = None,
    speeds: Optional[dict[str, float]] = None,
    input_bytes: Optional[int] = None,
    overheads: Optional[Overheads] = None,
    speculate: "int | str | None" = None,
) -> Problem:
    """Checks and flattens the inputs.

    ``speculate``: the draft length K of self-speculative decoding to price in the ``generate`` objective
    (``"auto"``: the best K per split; None/0: off), with the profile's per-stage exit acceptance
    (:mod:`aiflow_cli.plan.speculation`).

    ``overheads``: fixed costs per message round trip and per connection (see :class:`Overheads`; default none).

    ``input_bytes``: the size of this request's raw input (boundary 0, e.g. the JPEG file a user sends) when it
    is known and differs from the profiled one; default: the profile's measured ``input`` boundary.

    ``profiles``: tier -> profile. A single entry under the key ``"*"`` is one profile used for every tier named
    in ``speeds``. ``speeds``: tier -> relative speed (stage and codec times are divided by it).
    ``links``: ``"device-edge"`` -> link, one per adjacent pair of tiers. ``tokens``: decode steps (generate).
    """
    if input_bytes is not None and input_bytes < 0:
        raise InputError(f"input_bytes={input_bytes}: must be >= 0", param="input_bytes")
    limits = limits or Limits()
    speeds = dict(speeds or {})
    if objective not in OBJECTIVES:
        raise InputError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    from aiflow_cli.plan.speculation import parse_speculate, stage_acceptance

    draft = parse_speculate(speculate)
    if draft and objective != "generate":
        raise InputError(
            f"speculate={speculate}: speculation prices token generation; use objective 'generate'", param="speculate"
        )
    if objective == "generate" and tokens < 1:
        raise InputError("objective 'generate' needs tokens=N (N >= 1 decode steps)", param="tokens")
    if not profiles:
        raise InputError(
            "no profile: give profiles[device]=dev.json ... (one per tier), or one profile with speeds[device]=1 ...",
            param="profiles,speeds",
        )
    for tier, s in speeds.items():
        if not (s > 0 and np.isfinite(s)):
            raise InputError(f"speeds[{tier}]={s}: a speed must be a positive number", param="speeds")
    if "*" in profiles:
        if len(profiles) > 1:
            raise InputError(
                "give either one profile for all tiers (with `speeds`) or one profiles[TIER]=FILE per tier, not both",
                param="profiles,speeds",
            )
        if not speeds:
            raise InputError(
                "one profile for every tier needs a speed per tier, e.g. speeds[device]=0.25 speeds[edge]=1 speeds[cloud]=20",
                param="speeds",
            )
        tiers = order_tiers(list(speeds))
        per_tier = {t: profiles["*"] for t in tiers}
    else:
        tiers = order_tiers(list(profiles))
        extra = set(speeds) - set(tiers)
        if extra:
            raise InputError(
                f"speeds[{sorted(extra)[0]}] is given, but that tier has no profile: add profiles[{sorted(extra)[0]}]=FILE",
                param="profiles,speeds",
            )
        per_tier = {t: profiles[t] for t in tiers}
    for t in set(limits.skip) | set(limits.require) | set(limits.memory_bytes):
        if t not in tiers:
            raise InputError(f"a limit names tier {t!r}, which is not in the problem (tiers: {', '.join(tiers)})")
    both = set(limits.skip) & set(limits.require)
    if both:
        raise InputError(f"tier {sorted(both)[0]!r} is both skipped and required")
    _check_same_model(per_tier)

    link_list = []
    for a, b in zip(tiers, tiers[1:]):
        name = f"{a}-{b}"
        if name not in links:
            raise InputError(
                f"no link between {a} and {b}: give links[{name}]=lte (a name in profiles/links/ or a .toml path)",
                param="links",
            )
        link_list.append(links[name])
    extra_links = set(links) - {f"{a}-{b}" for a, b in zip(tiers, tiers[1:])}
    if extra_links:
        raise InputError(f"link {sorted(extra_links)[0]!r} does not join adjacent tiers of {' -> '.join(tiers)}")

    ref = per_tier[tiers[0]]
    T, S = len(tiers), len(ref.stages)
    codec_names = sorted({c for cut in ref.cuts for c in cut.codecs}, key=lambda c: (c != "raw", c))
    if not codec_names:
        codec_names = ["raw"]
    if limits.codecs is not None:
        unknown = [c for c in limits.codecs if c not in codec_names]
        if unknown:
            raise InputError(
                f"codecs={unknown[0]!r} was not profiled; profiled codecs: {', '.join(codec_names)}", param="codecs"
            )
    C = len(codec_names)
    speed = np.array([speeds.get(t, 1.0) for t in tiers])

    prefill = np.array([[s.prefill_ms for s in per_tier[t].stages] for t in tiers]) / speed[:, None]
    has_decode = np.array([s.decode_ms is not None for s in ref.stages])
    if objective == "generate" and not has_decode.any():
        raise PlanError(
            "objective 'generate' needs decode-step timings; this profile has none: re-run aiflow profile with decode tokens"
        )
    decode = np.array([[s.decode_ms or 0.0 for s in per_tier[t].stages] for t in tiers]) / speed[:, None]
    # A stage runs per decode step from the first stage that has decode timings on (an encoder before it runs once).
    first_decode = int(np.argmax(has_decode)) if has_decode.any() else S
    decode_stage = np.arange(S) >= first_decode
    params = np.array([s.param_bytes for s in ref.stages], dtype=np.int64)
    peak = np.array([[s.peak_activation_bytes for s in per_tier[t].stages] for t in tiers], dtype=np.int64)

    cut_bytes = np.full((S, C), np.inf)
    step_bytes = np.zeros((S, C))
    enc = np.full((T, S, C), np.inf)
    dec = np.full((T, S, C), np.inf)
    loss = np.ones((S, C))
    avail = np.zeros((S, C), dtype=bool)
    step_frac = np.zeros(S)
    allowed = set(limits.codecs) if limits.codecs is not None else None
    crosses_per_step = np.concatenate([[False], decode_stage[:-1]])
    boundaries = [per_tier[t].boundaries() for t in tiers]
    for k in range(S):
        cuts = [bs[k] for bs in boundaries]
        raw = cuts[0].codecs["raw"]
        raw_step = raw.decode_step_bytes
        if raw_step is None:
            hidden = [x.decode_step_bytes for x in cuts[0].tensors if x.role == "hidden"]
            raw_step = sum(h for h in hidden if h is not None) if any(h is not None for h in hidden) else None
        if crosses_per_step[k] and objective == "generate" and raw_step is None:
            raise PlanError(
                f"cut after stage {k - 1} has no decode_step_bytes: re-run aiflow profile with decode tokens"
            )
        step_frac[k] = (raw_step or 0) / raw.bytes if raw.bytes > 0 else 0.0
        for ci, name in enumerate(codec_names):
            if allowed is not None and name not in allowed and not (k == 0 and name == "raw"):
                continue  # the raw input always goes raw, whatever codecs the cuts may use
            if not all(name in c.codecs for c in cuts):
                continue
            r0 = cuts[0].codecs[name]
            avail[k, ci] = True
            cut_bytes[k, ci] = r0.bytes if k or input_bytes is None else input_bytes
            if r0.decode_step_bytes is not None:
                step_bytes[k, ci] = r0.decode_step_bytes
            else:  # scale the raw step by this codec's ratio on the whole boundary
                step_bytes[k, ci] = (raw_step or 0) * (r0.bytes / raw.bytes if raw.bytes else 1.0)
            for ti, c in enumerate(cuts):
                enc[ti, k, ci] = c.codecs[name].encode_ms / speed[ti]
                dec[ti, k, ci] = c.codecs[name].decode_ms / speed[ti]
            # The most pessimistic measurement across tiers (and, within one, its worst calibration item).
            loss[k, ci] = max(0.0, 1.0 - min(c.codecs[name].fidelity.min for c in cuts))

    mem = [limits.memory_bytes.get(t) for t in tiers]
    profile_ids = {
        t: {
            "model_hash": per_tier[t].model_hash,
            "hardware": per_tier[t].hardware.label or f"{per_tier[t].hardware.device}:{per_tier[t].hardware.cpu}",
            "speed": float(speed[i]),
        }
        for i, t in enumerate(tiers)
    }
    return Problem(
        model=ref.model,
        model_hash=ref.model_hash,
        family=ref.family,
        task=ref.task,
        tiers=tiers,
        stage_names=[s.name for s in ref.stages],
        codecs=codec_names,
        links=link_list,
        objective=objective,
        tokens=int(tokens) if objective == "generate" else 0,
        prefill_ms=prefill,
        decode_ms=decode,
        decode_stage=decode_stage,
        param_bytes=params,
        peak_bytes=peak,
        cut_bytes=cut_bytes,
        cut_step_bytes=step_bytes,
        step_fraction=step_frac,
        enc_ms=enc,
        dec_ms=dec,
        cut_loss=loss,
        available=avail,
        output_bytes=float(ref.output.bytes),
        token_bytes=float(
            ref.output.decode_step_bytes if ref.output.decode_step_bytes is not None else DEFAULT_TOKEN_BYTES
        ),
        limits=limits,
        memory_bytes=mem,
        skip=np.array([t in limits.skip for t in tiers]),
        require=np.array([t in limits.require for t in tiers]),
        input_stage=ref.stages[0].kind == "input",
        profile_ids=profile_ids,
        input_description=ref.input.description if input_bytes is None else "as given: the encoded input file",
        overheads=overheads or Overheads(),
        fidelity_metric=ref.calibration.metric,
        calibration_hash=ref.calibration.hash,
        speculate=draft if objective == "generate" else 0,
        exit_acceptance=np.array([np.nan if (acc := stage_acceptance(s)) is None else acc for s in ref.stages]),
    )
