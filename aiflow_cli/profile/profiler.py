"""``profile_model``: measure every stage of a model on this hardware, and every cut under every codec.

What it does, in order (each step reuses what the previous one computed):

1. one exact pass through the stages, keeping every boundary state and each stage's peak activation memory;
2. ``warmup`` + ``repeats`` timed passes (prefill latency per stage: median and p90);
3. for generating models, a prefill with ``decode_tokens`` tokens into a KV cache, then ``repeats`` timed decode
   steps of one token each (the cache is cropped back after each, so every step sees ``decode_tokens`` positions);
   the boundary states of one decode step are kept to size what crosses each cut per token;
4. per cut: every codec encodes the real boundary state with the Rust codec (bytes, encode/decode ms), and the
   rest of the model runs on the decoded state. Codecs whose decoded tensors are bit-identical to another's
   (``raw``, ``X`` vs ``X+zstd3``) share its result; the distinct ones run the rest of the model together, stacked
   on the batch dimension next to the exact state, which is the reference they are compared with.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from aiflow_cli import codec as codec_mod
from aiflow_cli.timing import median_ms
from aiflow_cli.errors import InputError
from aiflow_cli.models import StagedModel, load_model
from aiflow_cli.models.state import BoundaryState, is_codec_tensor, role_of, state_bytes, tile_batch
from aiflow_cli.profile.fidelity import compare
from aiflow_cli.profile.hardware import detect
from aiflow_cli.profile.memory import peak_activation_bytes
from aiflow_cli.profile.schema import (
    CodecResult,
    CutProfile,
    CutTensor,
    Endpoint,
    Fidelity,
    ModelProfile,
    Settings,
    StageProfile,
)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: called as the work advances (for a progress bar)."""

DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
DEFAULT_DECODE_TOKENS = 32
_CODEC_TIMING_REPEATS = 3
_FIDELITY_CHUNK_BYTES = 256 << 20  # output bytes per stacked rest-of-model run


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


class _Profiler:
    def __init__(self, m: StagedModel, *, batch: int, seq_len: Optional[int], image_size: Optional[int],
                 decode_tokens: int, codecs: list[str], repeats: int, warmup: int, progress: Progress):
        self.m, self.batch, self.repeats, self.warmup = m, batch, repeats, warmup
        self.codecs, self.decode_tokens, self.progress = codecs, decode_tokens, progress
        self.seq_len = seq_len if seq_len is not None else m.adapter.default_seq_len()
        self.image_size = image_size if image_size is not None else m.adapter.default_image_size()
        self.inputs = m.make_inputs(batch=batch, seq_len=seq_len, image_size=image_size, seed=0)
        self.device = m.device
        self._output_bytes = 0  # bytes of the end output per batch row group, set after the exact pass

    # 1 + 2: exact pass, memory, prefill timing
    def prefill(self) -> tuple[list[BoundaryState], list[int], list[list[float]]]:
        m, n = self.m, self.m.num_stages
        states, peaks = [], []
        state = self.inputs
        for i in range(n):
            peaks.append(peak_activation_bytes(lambda: m.run_stage(i, state), self.device))
            state = m.run_stage(i, state)
            states.append(state)
        times: list[list[float]] = [[] for _ in range(n)]
        total = self.warmup + self.repeats
        for r in range(total):
            state = self.inputs
            for i in range(n):
                _sync(self.device)
                t0 = time.perf_counter()
                state = m.run_stage(i, state)
                _sync(self.device)
                if r >= self.warmup:
                    times[i].append((time.perf_counter() - t0) * 1e3)
            self.progress("prefill timing", r + 1, total)
        return states, peaks, times

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
        for r in range(total):
            state = step_in
            if r == self.warmup:
                step_states[m.decode_start - 1] = state
            for i in range(m.decode_start, n):
                _sync(self.device)
                t0 = time.perf_counter()
                state = m.run_stage(i, state, cache)
                _sync(self.device)
                if r >= self.warmup:
                    times[i].append((time.perf_counter() - t0) * 1e3)
                    if r == self.warmup:
                        step_states[i] = state
            cache.crop(self.decode_tokens)
            self.progress("decode timing", r + 1, total)
        return times, step_states

    # 4: codecs and fidelity per cut
    def cut(self, k: int, state: BoundaryState, step_state: Optional[BoundaryState]) -> CutProfile:
        m = self.m
        tensors = []
        for name, t in state.items():
            role = role_of(name)
            step_bytes = None
            if role == "hidden" and step_state is not None and name in step_state:
                st = step_state[name]
                step_bytes = st.numel() * st.element_size()
            tensors.append(CutTensor(name=name, role=role, dtype=_dtype_name(t), shape=list(t.shape),
                                     bytes=t.numel() * t.element_size(), decode_step_bytes=step_bytes))
        # the part of a decode step's state that crosses: everything but side tensors (kept by the receiver)
        step_cross = None if step_state is None else {n: t for n, t in step_state.items() if role_of(n) != "side"}

        encoded: dict[str, list[tuple[str, bytes]]] = {}
        decoded: dict[str, BoundaryState] = {}
        timing: dict[str, tuple[float, float]] = {}
        for spec in self.codecs:
            frames = _frames(state, spec)
            encoded[spec] = frames
            decoded[spec] = _decode_state(frames, self.device)
            enc_ms = median_ms(lambda: _frames(state, spec), _CODEC_TIMING_REPEATS)
            dec_ms = median_ms(lambda: _decode_state(frames, self.device), _CODEC_TIMING_REPEATS)
            timing[spec] = (enc_ms, dec_ms)

        # group codecs by decoded content: identical decodings share one rest-of-model run
        exact_fid = Fidelity(cosine=1.0, max_abs_error=0.0, top1_agreement=1.0 if m.generates else None)
        fidelity: dict[str, Fidelity] = {}
        representatives: list[str] = []
        alias: dict[str, str] = {}
        for spec in self.codecs:
            if _same_state(decoded[spec], state):
                fidelity[spec] = exact_fid
                continue
            match = next((r for r in representatives if _same_state(decoded[r], decoded[spec])), None)
            if match is None:
                representatives.append(spec)
            else:
                alias[spec] = match
        fidelity.update(self._rest_of_model(k, state, [decoded[r] for r in representatives], representatives))
        for spec, r in alias.items():
            fidelity[spec] = fidelity[r]

        results = {}
        for spec in self.codecs:
            step_bytes = None
            if step_cross is not None:
                step_bytes = sum(len(f) for _, f in _frames(step_cross, spec))
            results[spec] = CodecResult(
                bytes=sum(len(f) for _, f in encoded[spec]), decode_step_bytes=step_bytes,
                encode_ms=timing[spec][0], decode_ms=timing[spec][1], fidelity=fidelity[spec],
            )
        return CutProfile(after_stage=k, tensors=tensors, activation_bytes=state_bytes(state), codecs=results)

    def _rest_of_model(self, k: int, exact: BoundaryState, variants: list[BoundaryState],
                       names: list[str]) -> dict[str, Fidelity]:
        """Runs stages k+1.. on [exact] + variants stacked on the batch dim; compares each with the exact row."""
        if not variants:
            return {}
        m = self.m
        out_bytes = max(1, self._output_bytes)
        per_run = max(1, _FIDELITY_CHUNK_BYTES // out_bytes - 1)
        result: dict[str, Fidelity] = {}
        for start in range(0, len(variants), per_run):
            chunk = variants[start:start + per_run]
            stacked = tile_batch([exact] + chunk)
            out = m.output(m.run(stacked, range(k + 1, m.num_stages)))
            rows = out.split(self.batch, dim=0)
            for name, approx in zip(names[start:start + per_run], rows[1:]):
                result[name] = compare(rows[0], approx, token_outputs=m.generates)
        return result


def _endpoints(m: StagedModel, inputs: BoundaryState, final: BoundaryState, batch: int) -> tuple[Endpoint, Endpoint]:
    names = ", ".join(f"{k} {list(t.shape)} {_dtype_name(t)}" for k, t in inputs.items())
    inp = Endpoint(bytes=state_bytes(inputs), description=f"stage-0 input: {names}")
    if m.generates:
        token_bytes = batch * torch.empty((), dtype=torch.int64).element_size()
        out = Endpoint(bytes=token_bytes, decode_step_bytes=token_bytes, description=m.adapter.output_description())
    else:
        t = m.output(final)
        out = Endpoint(bytes=t.numel() * t.element_size(),
                       description=f"{m.adapter.output_description()} {list(t.shape)} {_dtype_name(t)}")
    return inp, out


def profile_model(
    model: str | StagedModel,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 1,
    seq_len: Optional[int] = None,
    image_size: Optional[int] = None,
    decode_tokens: Optional[int] = None,
    codecs: Optional[list[str]] = None,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    label: str = "",
    progress: Optional[Progress] = None,
) -> ModelProfile:
    """Profiles a model (a name for :func:`aiflow_cli.models.load_model`, or a loaded :class:`StagedModel`).

    ``seq_len``/``image_size`` default to the model's (32 tokens for LMs and encoders, 1 decoder token + the
    encoder's image size for captioners). ``decode_tokens``: KV-cache length of the profiled decode step (default 32
    for generating models; 0 skips it). ``codecs`` default to :func:`aiflow_cli.codec.default_codecs`; ``raw`` is
    always included. Times are ms, sizes bytes. Raises :class:`InputError` for bad settings, :class:`ModelError`
    for a model that cannot be loaded or cut.
    """
    t_start = time.perf_counter()
    progress = progress or (lambda phase, done, total: None)
    if repeats < 1:
        raise InputError(f"repeats={repeats}: must be >= 1", param="repeats")
    if warmup < 0:
        raise InputError(f"warmup={warmup}: must be >= 0", param="warmup")
    specs = [codec_mod.canonical(c) for c in (codecs or codec_mod.default_codecs())]
    specs = list(dict.fromkeys(["raw"] + specs))
    progress("loading model", 0, 1)
    m = model if isinstance(model, StagedModel) else load_model(model, dtype=dtype, device=device)
    if len(m.loaded) != m.num_stages:
        raise InputError("profiling needs every stage loaded (use load_model, not load_stages)")
    if m.num_stages < 2:
        raise InputError(f"{m.name} has a single stage: there is nothing to cut")
    if decode_tokens is None:
        decode_tokens = DEFAULT_DECODE_TOKENS if m.generates else 0
    if decode_tokens < 0:
        raise InputError(f"decode_tokens={decode_tokens}: must be >= 0", param="decode_tokens")
    if decode_tokens and not m.generates:
        raise InputError(f"`decode_tokens` applies to generating models; {m.name} is a {m.task} model", param="decode_tokens")
    progress("loading model", 1, 1)

    p = _Profiler(m, batch=batch, seq_len=seq_len, image_size=image_size, decode_tokens=decode_tokens,
                  codecs=specs, repeats=repeats, warmup=warmup, progress=progress)
    states, peaks, prefill_times = p.prefill()
    final_out = m.output(states[-1])
    p._output_bytes = final_out.numel() * final_out.element_size() // batch
    decode_times, step_states = p.decode()

    stages = []
    for i, spec in enumerate(m.stages):
        dt = decode_times[i]
        stages.append(StageProfile(
            index=i, name=spec.name, kind=spec.kind, param_bytes=m.stage_param_bytes(i),
            prefill_ms=statistics.median(prefill_times[i]), prefill_p90_ms=_p(prefill_times[i], 0.9),
            decode_ms=statistics.median(dt) if dt else None, decode_p90_ms=_p(dt, 0.9) if dt else None,
            peak_activation_bytes=peaks[i],
        ))
    cuts = []
    for k in range(m.num_stages - 1):
        cuts.append(p.cut(k, states[k], step_states.get(k)))
        progress("codecs and fidelity per cut", k + 1, m.num_stages - 1)

    inp, out = _endpoints(m, p.inputs, states[-1], batch)
    settings = Settings(
        dtype=str(m.dtype).removeprefix("torch."), batch=batch, seq_len=p.seq_len, image_size=p.image_size,
        decode_tokens=decode_tokens, repeats=repeats, warmup=warmup,
    )
    return ModelProfile(
        model=m.name, model_hash=m.model_hash, family=m.family, task=m.task, hardware=detect(m.device, label),
        settings=settings, input=inp, output=out, stages=stages, cuts=cuts,
        profile_wall_s=time.perf_counter() - t_start,
    )
