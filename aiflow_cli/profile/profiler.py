"""``profile_model``: measure every stage of a model on this hardware, and every cut under every codec.

What it does, in order (each step reuses what the previous one computed):

1. one exact pass through the stages, keeping every boundary state and each stage's peak activation memory.
   Stage 0 (``input.prepare``) runs on the raw input as a device holds it: the bundled sample image's JPEG file
   for image models, the token ids (or the example tensor) otherwise; the later stages run on random inputs of
   the profiled shape. The raw input is the boundary before stage 0 (``input``: codec ``raw`` only);
2. ``warmup`` + ``repeats`` timed passes (prefill latency per stage: median and p90);
3. for generating models, a prefill with ``decode_tokens`` tokens into a KV cache, then ``repeats`` timed decode
   steps of one token each (the cache is cropped back after each, so every step sees ``decode_tokens`` positions);
   the boundary states of one decode step are kept to size what crosses each cut per token;
4. one exact pass over the calibration batch (:mod:`aiflow_cli.profile.calibration`: real prompts, sentences or
   images, one row each; for generation each prompt is followed by the exact model's greedy continuation,
   teacher-forced), keeping every boundary state;
5. per cut: every codec encodes the boundary state of step 1 with the Rust codec (bytes, encode/decode ms), and
   the calibration boundary state of step 4; the rest of the model runs on each distinct decoded calibration
   state and is scored in the task's metric (:mod:`aiflow_cli.profile.fidelity`). Codecs whose decoded tensors
   are bit-identical to the exact state (``raw``, ``raw+zstd3``) get the exact model's score without a run, and
   codecs identical to another (``X`` vs ``X+zstd3``) share its result. With ``fidelity_cuts`` only those cuts
   measure lossy codecs; the other cuts list lossless codecs only (the planner cannot choose what was not
   measured).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch

from aiflow_cli import codec as codec_mod
from aiflow_cli.errors import InputError
from aiflow_cli.models import StagedModel, load_model
from aiflow_cli.models.state import BoundaryState, is_codec_tensor, role_of, state_bytes
from aiflow_cli.profile.calibration import load_calibration
from aiflow_cli.profile.fidelity import Reference, build_reference
from aiflow_cli.profile.hardware import detect
from aiflow_cli.profile.memory import peak_activation_bytes
from aiflow_cli.profile.schema import (
    Calibration,
    CodecResult,
    CutProfile,
    CutTensor,
    Endpoint,
    Fidelity,
    ModelProfile,
    Settings,
    StageProfile,
)
from aiflow_cli.profile.settings import DEFAULT_DECODE_TOKENS, ProfileSettings
from aiflow_cli.timing import median_ms, work_clock

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: called as the work advances (for a progress bar)."""

_CODEC_TIMING_REPEATS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _frames(state: BoundaryState, spec: str) -> list[tuple[str, bytes]]:
    """Each tensor as a frame: floating hidden/side tensors with ``spec``, control tensors ``raw``."""
    return [(k, codec_mod.encode(t, spec if is_codec_tensor(k, t) else "raw")) for k, t in state.items()]


def _decode_state(frames: list[tuple[str, bytes]], device: torch.device) -> BoundaryState:
    return {k: codec_mod.decode(f).to(device) for k, f in frames}


def _same_state(a: BoundaryState, b: BoundaryState) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def trained_exit_acceptance(m: StagedModel, ref: Reference, cal_states: list[BoundaryState]) -> dict[int, float]:
    """Stage -> exit acceptance through the trained exit adapter of that stage's block (``aiflow draft train``),
    for the blocks that have one."""
    from aiflow_cli.models.exit_adapter import find_exit

    out: dict[int, float] = {}
    for i, state in enumerate(cal_states):
        layer = m.stages[i].layer if m.stages[i].kind == "block" else None
        adapter = find_exit(m.model_hash, layer) if m.task == "generate" and "hidden_states" in state else None
        if adapter is not None:
            with torch.inference_mode():
                h = state["hidden_states"]
                got = ref.exit_agreement(m, dict(state, hidden_states=adapter.to(h.device)(h)))
            if got is not None:
                out[i] = got
    return out


class _Profiler:
    def __init__(
        self,
        m: StagedModel,
        *,
        batch: int,
        seq_len: Optional[int],
        image_size: Optional[int],
        decode_tokens: int,
        codecs: list[str],
        repeats: int,
        warmup: int,
        progress: Progress,
        fidelity_cuts: set[int],
    ):
        self.m, self.batch, self.repeats, self.warmup = m, batch, repeats, warmup
        self.codecs, self.decode_tokens, self.progress = codecs, decode_tokens, progress
        self.seq_len = seq_len if seq_len is not None else m.adapter.default_seq_len()
        self.image_size = image_size if image_size is not None else m.adapter.default_image_size()
        self.inputs = m.make_inputs(batch=batch, seq_len=seq_len, image_size=image_size, seed=0)
        self.raw = _raw_input(m, self.inputs, batch)
        self.device = m.device
        self.fidelity_cuts = fidelity_cuts
        self.ref: Optional[Reference] = None
        self.cal_states: list[BoundaryState] = []
        self.exit_acceptance: list[Optional[float]] = []  # per stage but the last: an early exit's acceptance
        self.trained_exit_acceptance: dict[int, float] = {}  # stage -> the same with its trained exit (if any)

    # 1 + 2: exact pass, memory, prefill timing
    def prefill(self) -> tuple[list[BoundaryState], list[int], list[list[float]]]:
        m, n = self.m, self.m.num_stages
        states, peaks = [], []
        state = self.raw
        for i in range(n):
            peaks.append(peak_activation_bytes(lambda: m.run_stage(i, state), self.device))
            state = self._after(i, m.run_stage(i, state))
            states.append(state)
        times: list[list[float]] = [[] for _ in range(n)]
        total = self.warmup + self.repeats
        clock = work_clock(self.device.type)
        for r in range(total):
            state = self.raw
            for i in range(n):
                _sync(self.device)
                t0 = clock()
                out = m.run_stage(i, state)
                _sync(self.device)
                if r >= self.warmup:
                    times[i].append((clock() - t0) * 1e3)
                state = self._after(i, out)
            self.progress("prefill timing", r + 1, total)
        return states, peaks, times

    def _after(self, i: int, state: BoundaryState) -> BoundaryState:
        """The state after stage ``i``: after stage 0, the random inputs of the profiled shape (stage 0 prepared
        the sample, whose values the later stages' cost does not depend on)."""
        return self.inputs if i == 0 else state

    # 3: decode steps with a KV cache of decode_tokens positions
    def decode(self) -> tuple[list[list[float]], dict[int, BoundaryState]]:
        m, n = self.m, self.m.num_stages
        times: list[list[float]] = [[] for _ in range(n)]
        step_states: dict[int, BoundaryState] = {}
        if not m.generates or self.decode_tokens == 0:
            return times, step_states
        prompt = m.make_inputs(batch=self.batch, seq_len=self.decode_tokens, image_size=self.image_size, seed=1)
        cache = m.new_cache()
        out = m.run(prompt, cache=cache)
        tokens = m.output(out)[:, -1].argmax(-1)
        step_in = m.next_inputs(m.decode_inputs_of(prompt), tokens)
        total = self.warmup + self.repeats
        clock = work_clock(self.device.type)
        for r in range(total):
            state = step_in
            if r == self.warmup:
                step_states[m.decode_start - 1] = state
            for i in range(m.decode_start, n):
                _sync(self.device)
                t0 = clock()
                state = m.run_stage(i, state, cache)
                _sync(self.device)
                if r >= self.warmup:
                    times[i].append((clock() - t0) * 1e3)
                    if r == self.warmup:
                        step_states[i] = state
            cache.crop(self.decode_tokens)
            self.progress("decode timing", r + 1, total)
        return times, step_states

    # 4: the exact model on the calibration batch
    def calibrate(self, ref: Reference) -> None:
        m, state = self.m, ref.inputs
        self.cal_states = []
        for i in range(m.num_stages - 1):
            state = m.run_stage(i, state)
            self.cal_states.append(state)
        ref.finish(ref.run_from(m, state, m.num_stages - 1))
        self.exit_acceptance = [ref.exit_agreement(m, s) for s in self.cal_states]
        self.trained_exit_acceptance = trained_exit_acceptance(m, ref, self.cal_states)
        self.ref = ref

    # 5: codecs and fidelity per cut
    def cut(self, k: int, state: BoundaryState, step_state: Optional[BoundaryState]) -> CutProfile:
        return self._boundary(k, state, step_state, self._fidelity(k))

    def input_boundary(self) -> CutProfile:
        """The boundary before stage 0: the raw input, ``raw`` only (token ids and file bytes are not coded)."""
        names = ", ".join(f"{k} {list(t.shape)} {_dtype_name(t)}" for k, t in self.raw.items())
        exact = self.ref.exact_fidelity if self.ref is not None else None
        assert exact is not None, "calibrate() runs first"
        cut = self._boundary(-1, self.raw, None, {"raw": exact})
        return cut.model_copy(update={"description": f"raw input: {names}"})

    def _boundary(
        self, k: int, state: BoundaryState, step_state: Optional[BoundaryState], fidelity: dict[str, Fidelity]
    ) -> CutProfile:
        """Boundary ``k`` (after stage ``k``; -1: the raw input) under every codec with a ``fidelity`` score."""
        tensors = []
        for name, t in state.items():
            role = role_of(name)
            step_bytes = None
            if role == "hidden" and step_state is not None and name in step_state:
                st = step_state[name]
                step_bytes = st.numel() * st.element_size()
            tensors.append(
                CutTensor(
                    name=name,
                    role=role,
                    dtype=_dtype_name(t),
                    shape=list(t.shape),
                    bytes=t.numel() * t.element_size(),
                    decode_step_bytes=step_bytes,
                )
            )
        # the part of a decode step's state that crosses: everything but side tensors (kept by the receiver)
        step_cross = None if step_state is None else {n: t for n, t in step_state.items() if role_of(n) != "side"}
        results = {}
        for spec in self.codecs:
            if spec not in fidelity:
                continue  # lossy, at a cut where lossy codecs are not measured
            frames = _frames(state, spec)
            enc_ms = median_ms(lambda: _frames(state, spec), _CODEC_TIMING_REPEATS)
            dec_ms = median_ms(lambda: _decode_state(frames, self.device), _CODEC_TIMING_REPEATS)
            step_bytes = None
            if step_cross is not None:
                step_bytes = sum(len(f) for _, f in _frames(step_cross, spec))
            results[spec] = CodecResult(
                bytes=sum(len(f) for _, f in frames),
                decode_step_bytes=step_bytes,
                encode_ms=enc_ms,
                decode_ms=dec_ms,
                fidelity=fidelity[spec],
            )
        return CutProfile(after_stage=k, tensors=tensors, activation_bytes=state_bytes(state), codecs=results)

    def _fidelity(self, k: int) -> dict[str, Fidelity]:
        """Each codec's score at cut ``k``: the rest of the model runs once per distinct decoded calibration
        state (one run per codec, at the exact pass's batch shape, so that a lossless codec scores exactly as the
        exact model does)."""
        m, ref, exact = self.m, self.ref, self.cal_states[k]
        fidelity: dict[str, Fidelity] = {}
        decoded: dict[str, BoundaryState] = {}
        alias: dict[str, str] = {}
        for spec in self.codecs:
            dec = _decode_state(_frames(exact, spec), self.device)
            if _same_state(dec, exact):
                fidelity[spec] = ref.exact_fidelity
                continue
            if k not in self.fidelity_cuts:
                continue
            match = next((r for r in decoded if _same_state(decoded[r], dec)), None)
            if match is None:
                decoded[spec] = dec
            else:
                alias[spec] = match
        for spec, dec in decoded.items():
            fidelity[spec] = ref.score(ref.run_from(m, dec, k + 1))
        for spec, r in alias.items():
            fidelity[spec] = fidelity[r]
        return fidelity


def _raw_input(m: StagedModel, inputs: BoundaryState, batch: int) -> BoundaryState:
    """What stage 0 reads when profiling: the sample image's JPEG file (``batch`` copies) for image models, the
    random inputs themselves otherwise (token ids, an fx model's example tensor)."""
    from aiflow_cli.models.inputs import image_file_state, sample_image_file

    if m.adapter.default_image_size() is None:
        return inputs
    data = sample_image_file()
    return image_file_state(data if batch == 1 else [data] * batch)


def _output(m: StagedModel, final: BoundaryState, batch: int) -> Endpoint:
    if m.generates:
        token_bytes = batch * torch.empty((), dtype=torch.int64).element_size()
        return Endpoint(bytes=token_bytes, decode_step_bytes=token_bytes, description=m.adapter.output_description())
    t = m.output(final)
    return Endpoint(
        bytes=t.numel() * t.element_size(),
        description=f"{m.adapter.output_description()} {list(t.shape)} {_dtype_name(t)}",
    )


def _measured_cuts(settings: ProfileSettings, n_cuts: int) -> set[int]:
    step = settings.fidelity_step()
    if step is not None:
        return set(range(0, n_cuts, step)) | {n_cuts - 1}
    return set(range(n_cuts)) if settings.fidelity_cuts is None else set(settings.fidelity_cuts)


def profile_model(
    model: str | StagedModel,
    settings: Optional[ProfileSettings] = None,
    *,
    label: str = "",
    progress: Optional[Progress] = None,
    **changes: Any,
) -> ModelProfile:
    """Profiles a model (a name for :func:`aiflow_cli.models.load_model`, or a loaded :class:`StagedModel`) with
    ``settings`` (:class:`ProfileSettings`; default: its defaults) changed by ``changes`` (its field names:
    ``profile_model(m, repeats=1, codecs=["raw"])``). ``label`` names this machine in the profile; ``progress``
    is told (phase, done, total) as the work goes.

    Raises :class:`InputError` for bad settings, :class:`ModelError` for a model that cannot be loaded or cut.
    """
    t_start = time.perf_counter()
    progress = progress or (lambda phase, done, total: None)
    s = ProfileSettings.of(settings, **changes)
    specs = [codec_mod.canonical(c) for c in (s.codecs or codec_mod.default_codecs())]
    specs = list(dict.fromkeys(["raw"] + specs))
    progress("loading model", 0, 1)
    m = model if isinstance(model, StagedModel) else load_model(model, dtype=s.dtype, device=s.device)
    if len(m.loaded) != m.num_stages:
        raise InputError("profiling needs every stage loaded (use load_model, not load_stages)")
    if m.num_stages < 2:
        raise InputError(f"{m.name} has a single stage: there is nothing to cut")
    decode_tokens = s.decode_tokens
    if decode_tokens is None:
        decode_tokens = DEFAULT_DECODE_TOKENS if m.generates else 0
    if decode_tokens and not m.generates:
        raise InputError(
            f"decode_tokens={decode_tokens}: applies to generating models; {m.name} is a {m.task} model",
            param="decode_tokens",
        )
    n_cuts = m.num_stages - 1
    measured = _measured_cuts(s, n_cuts)
    bad = sorted(k for k in measured if not 0 <= k < n_cuts)
    if bad:
        raise InputError(f"fidelity_cuts={bad[0]}: {m.name} has cuts 0..{n_cuts - 1}", param="fidelity_cuts")
    progress("loading model", 1, 1)

    p = _Profiler(
        m,
        batch=s.batch,
        seq_len=s.seq_len,
        image_size=s.image_size,
        decode_tokens=decode_tokens,
        codecs=specs,
        repeats=s.repeats,
        warmup=s.warmup,
        progress=progress,
        fidelity_cuts=measured,
    )
    states, peaks, prefill_times = p.prefill()
    decode_times, step_states = p.decode()
    t_fid = time.perf_counter()
    ref = build_reference(m, items=s.calibration_items, tokens=s.calibration_tokens, progress=progress)
    p.calibrate(ref)

    stages = []
    for i, spec in enumerate(m.stages):
        dt = decode_times[i]
        stages.append(
            StageProfile(
                index=i,
                name=spec.name,
                kind=spec.kind,
                param_bytes=m.stage_param_bytes(i),
                prefill_ms=statistics.median(prefill_times[i]),
                prefill_p90_ms=_p(prefill_times[i], 0.9),
                decode_ms=statistics.median(dt) if dt else None,
                decode_p90_ms=_p(dt, 0.9) if dt else None,
                peak_activation_bytes=peaks[i],
                exit_acceptance=p.exit_acceptance[i] if i < len(p.exit_acceptance) else None,
                trained_exit_acceptance=p.trained_exit_acceptance.get(i),
            )
        )
    cuts = []
    for k in range(n_cuts):
        cuts.append(p.cut(k, states[k], step_states.get(k)))
        progress("codecs and fidelity per cut", k + 1, n_cuts)
    calibrated = ref.metric != "output_cosine"
    calibration = Calibration(
        metric=ref.metric,
        source="calibration set" if calibrated else "random inputs",
        hash=load_calibration().hash if calibrated else None,
        items=ref.items,
        tokens=ref.tokens,
        reference=ref.reference,
        reference_min=ref.reference_min,
        measured_cuts=sorted(measured),
        wall_s=time.perf_counter() - t_fid,
    )

    settings = Settings(
        dtype=str(m.dtype).removeprefix("torch."),
        batch=s.batch,
        seq_len=p.seq_len,
        image_size=p.image_size,
        decode_tokens=decode_tokens,
        repeats=s.repeats,
        warmup=s.warmup,
    )
    return ModelProfile(
        model=m.name,
        model_hash=m.model_hash,
        family=m.family,
        task=m.task,
        hardware=detect(m.device, label),
        settings=settings,
        input=p.input_boundary(),
        output=_output(m, states[-1], s.batch),
        stages=stages,
        cuts=cuts,
        calibration=calibration,
        profile_wall_s=time.perf_counter() - t_start,
    )
