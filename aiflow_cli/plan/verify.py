"""Measures a plan's fidelity end to end before it is accepted (``--min-fidelity`` is a promise about the answer).

The profile scores each (cut, codec) alone, and for generation teacher-forced; neither bounds what several coded
cuts do to free-running generation, where one changed token changes every later one. So after the DP picks a
placement, :func:`solve_verified` runs the model with exactly those codecs at exactly those cuts on the
calibration set, as the runtime would (batch 1, each tier's stages with their own KV cache, every boundary state
packed and unpacked with the cut's codec at prefill and at every decode step) and compares with the exact model:
greedy token agreement for generation and captioning, cosine with the reference implementation's output for
embeddings. Below the floor, the used (cut, codec) with the worst profiled fidelity is excluded and the problem
is solved again, at most :data:`MAX_TRIES` times; then :class:`PlanError`. Measurements are cached on disk per
(model, calibration set, tokens, cuts and codecs), so the demo and the bench do not redo them.

    measure(model, {5: "int8"}, tokens=16) -> Measurement          # any combination, e.g. for a benchmark
    solve_verified(problem, model=None) -> Verified                   # what the planner entry points call
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Optional

from aiflow_cli import _core
from aiflow_cli.errors import AiflowError, PlanError
from aiflow_cli.plan.cost import Evaluation, Placement
from aiflow_cli.plan.problem import Problem
from aiflow_cli.plan.schema import PlanFidelity
from aiflow_cli.profile.calibration import DEFAULT_TOKENS, calibration_items, load_calibration, metric_for, raw_items

# torch, the models and the fidelity helpers are imported where a plan is measured: planning without a
# measurement (no floor, or only lossless codecs; `aiflow plan`) starts without torch
if TYPE_CHECKING:
    import torch

    from aiflow_cli.models import BoundaryState, StagedModel

#: Solves (each followed by a measurement) before giving up on a floor.
MAX_TRIES = 8
#: Slack on the floor for float rounding of a mean of 0/1 agreements.
FLOOR_EPS = 1e-9


def lossless(spec: str) -> bool:
    """Whether a codec returns its input bit for bit (``raw``, ``raw+zstdN``)."""
    return _core.canonical_codec(spec).split("+")[0] == "raw"  # (aiflow_cli.codec.canonical, without torch)


@dataclass
class Measurement:
    """The model run with ``cuts`` (after_stage -> codec) on the calibration set, against the exact model."""

    metric: str
    mean: float
    min: float
    per_item: list[float]
    tokens: int
    cuts: dict[int, str]
    wall_s: float
    cached: bool = False

    @property
    def items(self) -> int:
        return len(self.per_item)


# -- running a model with coded cuts, as the runtime does ------------------------------------------------------
def _roundtrip(state: BoundaryState, spec: str, device: torch.device) -> BoundaryState:
    """What the next tier receives: the state packed with the cut's codec (control tensors raw) and unpacked."""
    from aiflow_cli.models.state import roles
    from aiflow_cli.runtime.wire import pack_state, unpack_state

    packed = pack_state(state, roles(state), spec)
    got, _, _ = unpack_state(packed.tensors, packed.frames)
    return {k: v.to(device) for k, v in got.items()}


class CodedRun:
    """``m`` split at the keys of ``cuts``: each segment (a tier's stages) keeps its own cache, and the boundary
    state after stage ``k`` crosses as ``cuts[k]`` encodes and decodes it. With no cuts it is ``m`` itself."""

    def __init__(self, m: StagedModel, cuts: dict[int, str]):
        self.m, self.cuts = m, dict(cuts)
        bounds = [0] + [k + 1 for k in sorted(cuts)] + [m.num_stages]
        self.segments = [range(a, b) for a, b in zip(bounds, bounds[1:])]

    def _forward(self, state: BoundaryState, start: int, caches: Optional[list]) -> BoundaryState:
        m = self.m
        for si, seg in enumerate(self.segments):
            if seg.stop <= start:
                continue
            for i in range(max(seg.start, start), seg.stop):
                state = m.run_stage(i, state, caches[si] if caches else None)
            if seg.stop - 1 in self.cuts:
                state = _roundtrip(state, self.cuts[seg.stop - 1], m.device)
        return state

    def output(self, inputs: BoundaryState) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.m.output(self._forward(inputs, 0, None))

    def generate(self, inputs: BoundaryState, max_new_tokens: int) -> torch.Tensor:
        """Greedy tokens [B, N], step for step as :meth:`StagedModel.generate` (and the runtime): N =
        ``max_new_tokens``, or fewer when every row has ended with an end-of-sequence token."""
        import torch

        m = self.m
        with torch.inference_mode():
            caches = [m.new_cache() for _ in self.segments]
            tokens = m.output(self._forward(inputs, 0, caches))[:, -1].argmax(-1)
            out = [tokens]
            step_in = m.decode_inputs_of(inputs)
            for _ in range(max_new_tokens - 1):
                if bool(m.finished(torch.stack(out, dim=1)).all()):
                    break
                step_in = m.next_inputs(step_in, tokens)
                tokens = m.output(self._forward(step_in, m.decode_start, caches))[:, -1].argmax(-1)
                out.append(tokens)
            return torch.stack(out, dim=1)


def _key(m: StagedModel, cuts: dict[int, str], tokens: int, items: Optional[int]) -> str:
    doc = {
        "model": m.model_hash,
        "dtype": str(m.dtype),
        "calibration": load_calibration().hash,
        "tokens": tokens,
        "items": items,
        "metric": metric_for(m),
        "cuts": sorted((k, _core.canonical_codec(c)) for k, c in cuts.items()),
    }
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:24]


def measure(
    m: StagedModel,
    cuts: dict[int, str],
    *,
    tokens: int = DEFAULT_TOKENS,
    items: Optional[int] = None,
    use_cache: bool = True,
) -> Measurement:
    """Fidelity of ``m`` with codec ``cuts[k]`` after each stage ``k``, end to end on the calibration set (first
    ``items`` items; all by default), in the model's metric. Generation: ``tokens`` greedy tokens per item."""
    import torch

    from aiflow_cli.profile.fidelity import (
        RANDOM_ITEMS,
        _cached_json,
        _sentence_transformers_reference,
        cache_root,
        greedy_references,
        output_fidelity,
        token_agreement,
    )

    for k in cuts:
        if not 0 <= k < m.num_stages - 1:
            raise PlanError(f"cut {k} is out of range: {m.name} has cuts 0..{m.num_stages - 2}")
    metric = metric_for(m)
    tokens = tokens if m.generates else 0
    path = cache_root() / "verify" / f"{_key(m, cuts, tokens, items)}.json"
    t0 = time.perf_counter()
    if use_cache and path.is_file():
        try:
            doc = json.loads(path.read_text())
            doc["cuts"] = {int(k): v for k, v in doc["cuts"].items()}
            return Measurement(**{**doc, "cached": True})
        except (OSError, ValueError, TypeError):
            pass  # a damaged entry is measured again
    run = CodedRun(m, cuts)
    if metric == "output_cosine":
        inputs = [m.make_inputs(batch=1, seed=i) for i in range(items or RANDOM_ITEMS)]
    else:
        inputs = calibration_items(m, items)
    if metric == "token_agreement":
        refs = greedy_references(m, inputs, tokens)
        per_item = [token_agreement(run.generate(x, tokens)[0], torch.tensor(r)) for x, r in zip(inputs, refs)]
    else:
        reference = None
        if metric == "embedding_cosine":
            reference = _sentence_transformers_reference(m, list(raw_items(m, items)))
        per_item = []
        for i, x in enumerate(inputs):
            want = reference[i : i + 1] if reference is not None else m.output(m.run(x))
            per_item.append(output_fidelity(metric, run.output(x), want))
    result = Measurement(
        metric,
        float(sum(per_item) / len(per_item)),
        float(min(per_item)),
        per_item,
        tokens,
        dict(cuts),
        time.perf_counter() - t0,
    )
    if use_cache:
        _cached_json(path, lambda: {k: v for k, v in asdict(result).items() if k != "cached"})
    return result


# -- the planner's side ----------------------------------------------------------------------------------------
@dataclass
class Verified:
    """What :func:`solve_verified` returns: the accepted placement, its evaluation on the final problem (with
    the exclusions), and the plan's fidelity record."""

    placement: Placement
    evaluation: Evaluation
    problem: Problem
    fidelity: PlanFidelity


def _used(problem: Problem, placement: Placement) -> dict[int, str]:
    """``{after_stage: codec}`` of the used cuts; the raw input (boundary 0) is left out: it always goes raw."""
    return {b - 1: problem.codecs[placement.codecs[b]] for b, _, _ in placement.used_cuts() if b > 0}


def _bound(problem: Problem, placement: Placement) -> float:
    return 1.0 - sum(float(problem.cut_loss[k, placement.codecs[k]]) for k, _, _ in placement.used_cuts())


def tokens_for(problem: Problem) -> int:
    """Generated tokens a plan is verified for: the plan's own when solved for generation, else the default."""
    return problem.tokens if problem.tokens > 0 else DEFAULT_TOKENS


def unmeasured(problem: Problem, placement: Placement, note: str, tries: int = 1) -> PlanFidelity:
    """The fidelity record of a plan that was not measured: the profile's bound (exact if every codec is)."""
    used = _used(problem, placement)
    exact = all(lossless(c) for c in used.values())
    return PlanFidelity(
        metric=problem.fidelity_metric,
        floor=problem.limits.min_fidelity,
        bound=_bound(problem, placement),
        status="exact" if exact else "not measured",
        calibration_hash=problem.calibration_hash,
        tries=tries,
        excluded=list(problem.excluded),
        note="only lossless codecs: identical to the model" if exact else note,
    )


_MODELS: dict[str, StagedModel] = {}


def model_for(problem: Problem) -> tuple[Optional[StagedModel], str]:
    """The model of ``problem`` loaded here (kept for later calls), or None and why not. Planning never
    downloads: a hub id counts only when it is in the local cache."""
    import os

    from aiflow_cli.models import load_model

    m = _MODELS.get(problem.model)
    if m is None:
        before = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            m = load_model(problem.model)
        except AiflowError as e:
            return None, f"model {problem.model!r} is not available here ({e})"
        finally:
            if before is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = before
        _MODELS.clear()  # keep one model: they are large
        _MODELS[problem.model] = m
    if m.model_hash != problem.model_hash:
        return None, f"model {problem.model!r} here has hash {m.model_hash[:12]}, the profile {problem.model_hash[:12]}"
    return m, ""


def _worst(problem: Problem, placement: Placement) -> tuple[int, int]:
    """The used lossy (boundary, codec) with the lowest profiled fidelity (ties: the one with fewer bytes)."""
    lossy = [
        (k, placement.codecs[k])
        for k, _, _ in placement.used_cuts()
        if not lossless(problem.codecs[placement.codecs[k]])
    ]
    return max(lossy, key=lambda kc: (problem.cut_loss[kc], -problem.cut_bytes[kc]))


def solve_verified(
    problem: Problem,
    *,
    model: Optional[StagedModel] = None,
    verify: Optional[bool] = None,
    max_tries: int = MAX_TRIES,
    items: Optional[int] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Verified:
    """Solves ``problem`` and, when it has a fidelity floor (or ``verify`` is True), measures the chosen codecs
    end to end (:func:`measure`) and re-solves without the worst (cut, codec) until the measurement meets the
    floor. ``model``: the loaded model (default: loaded by the profile's name when available here; otherwise
    the plan says it was not measured). ``verify=False`` skips the measurement. ``items``: measure on the first
    calibration items only (tests; default all)."""
    from aiflow_cli.plan.solver import solve_problem

    log = log or (lambda _msg: None)
    floor = problem.limits.min_fidelity
    spent = 0.0
    want = verify if verify is not None else floor is not None
    for attempt in range(1, max_tries + 1):
        placement, ev = solve_problem(problem)
        used = _used(problem, placement)
        if not want or all(lossless(c) for c in used.values()):
            note = "no --min-fidelity: not measured" if not want else ""
            return Verified(placement, ev, problem, unmeasured(problem, placement, note, attempt))
        m = model
        if m is None:
            m, why = model_for(problem)
            if m is None:
                return Verified(placement, ev, problem, unmeasured(problem, placement, f"not verified: {why}", attempt))
        elif m.model_hash != problem.model_hash:
            raise PlanError(
                f"the model given to verify the plan has hash {m.model_hash[:12]}, the profile {problem.model_hash[:12]}"
            )
        tokens = tokens_for(problem)
        log(f"measuring {', '.join(f'{c}@{k}' for k, c in sorted(used.items()))} on the calibration set")
        got = measure(m, used, tokens=tokens, items=items)
        spent += 0.0 if got.cached else got.wall_s
        record = PlanFidelity(
            metric=got.metric,
            floor=floor,
            bound=_bound(problem, placement),
            status="verified",
            measured_min=got.min,
            measured_mean=got.mean,
            items=got.items,
            tokens=got.tokens,
            calibration_hash=load_calibration().hash,
            tries=attempt,
            excluded=list(problem.excluded),
            measure_s=spent,
        )
        if floor is None or got.min >= floor - FLOOR_EPS:
            if floor is None:
                record.note = "measured without a floor"
            return Verified(placement, ev, problem, record)
        k, c = _worst(problem, placement)
        log(
            f"{problem.codecs[c]}@{k - 1}: measured {got.metric} {got.min:.4f} < floor {floor}; excluded, solving again"
        )
        problem = problem.without(k, c)
    raise PlanError(
        f"no codec choice measured min_fidelity={floor} end to end within {max_tries} tries (excluded: "
        f"{', '.join(problem.excluded)}); lower `min_fidelity` or allow only lossless codecs (codecs=raw)",
        param="min_fidelity,codecs",
    )
