"""Synthetic model profiles for tests and the solver benchmark (random but schema-valid).

Nothing here is a measurement: times and sizes are drawn from ranges shaped like a transformer cut into stages
(activation size flat along the chain, codecs shrinking bytes and costing fidelity in order of aggressiveness).
"""

from __future__ import annotations

import random
from typing import Any, Optional

from aiflow_cli.profile.schema import ModelProfile

#: Codec specs in order of compression, with the byte ratio against raw fp32 and a typical fidelity loss.
CODEC_SHAPES = [
    ("raw", 1.0, 0.0),
    ("raw+zstd3", 0.93, 0.0),
    ("fp16", 0.5, 1e-7),
    ("bf16", 0.5, 4e-6),
    ("fp16+zstd3", 0.45, 1e-7),
    ("int8", 0.25, 3e-5),
    ("int8+zstd3", 0.2, 3e-5),
    ("int4", 0.13, 6e-4),
]


def synthetic_profile(
    n_stages: int,
    *,
    n_codecs: int = 4,
    seed: int = 0,
    speed: float = 1.0,
    model_hash: str = "synthetic-0",
    side_from: Optional[int] = None,
    decode: bool = True,
    input_bytes: Optional[int] = None,
    rng: Optional[random.Random] = None,
    input_stage: bool = False,
) -> ModelProfile:
    """A random valid profile. ``speed`` divides every time (another tier's hardware). ``side_from``: cuts at or
    after this stage also carry a 'side' tensor (like the captioner's encoder output) and stages before it have
    no decode timings (they run once per request, like an encoder). ``input_stage``: stage 0 is ``input.prepare``
    (kind ``input``, no weights, once per request), as in every real model's profile."""
    r = rng or random.Random(seed)
    codecs = CODEC_SHAPES[: max(1, min(n_codecs, len(CODEC_SHAPES)))]
    width = r.choice([256, 768, 1024])
    seq = r.choice([16, 64, 197])
    hidden_bytes = 4 * width * seq
    stages = []
    for i in range(n_stages):
        ms = r.uniform(0.5, 20.0) / speed
        prepare = input_stage and i == 0
        runs_per_step = decode and (side_from is None or i >= side_from) and not prepare
        stages.append(
            {
                "index": i,
                "name": "input.prepare" if prepare else f"s{i}",
                "kind": "input" if prepare else "block",
                "param_bytes": 0 if prepare else r.randint(1, 50) * 2**20,
                "prefill_ms": ms,
                "prefill_p90_ms": ms * 1.1,
                "decode_ms": ms / seq if runs_per_step else None,
                "decode_p90_ms": ms / seq if runs_per_step else None,
                "peak_activation_bytes": r.randint(1, 20) * 2**20,
            }
        )
    cuts = []
    for k in range(n_stages - 1):
        scale = 10 ** r.uniform(-1.5, 0.5)  # some boundaries much smaller than others, as in real models
        tensors: list[dict[str, Any]] = [
            {
                "name": "hidden",
                "role": "hidden",
                "dtype": "float32",
                "shape": [1, seq, width],
                "bytes": int(hidden_bytes * scale),
                "decode_step_bytes": int(4 * width * scale),
            }
        ]
        if side_from is not None and k >= side_from:
            tensors.append(
                {
                    "name": "encoder_out",
                    "role": "side",
                    "dtype": "float32",
                    "shape": [1, 197, width],
                    "bytes": 4 * 197 * width,
                }
            )
        raw_bytes = sum(t["bytes"] for t in tensors)
        step_raw = int(4 * width * scale) if (side_from is None or k >= side_from) else None
        results = {}
        for name, ratio, loss in codecs:
            jitter = r.uniform(0.8, 1.25)
            results[name] = {
                "bytes": int(raw_bytes * ratio * jitter) + 64,
                "decode_step_bytes": None if step_raw is None else int(step_raw * ratio) + 64,
                "encode_ms": raw_bytes / 1e6 * r.uniform(0.05, 1.0) / speed,
                "decode_ms": raw_bytes / 1e6 * r.uniform(0.05, 1.0) / speed,
                "fidelity": {"mean": 1.0 - loss * 0.5, "min": 1.0 - loss * r.uniform(0.5, 2.0)},
            }
        cuts.append({"after_stage": k, "tensors": tensors, "activation_bytes": raw_bytes, "codecs": results})
    data = {
        "schema_version": 3,
        "model": "synthetic",
        "model_hash": model_hash,
        "family": "fx",
        "task": "generate",
        "hardware": {
            "device": "cpu",
            "cpu": "synthetic",
            "cores": 2,
            "torch_threads": 2,
            "torch_version": "0",
            "label": f"synthetic-x{speed:g}",
        },
        "settings": {"dtype": "float32", "batch": 1, "seq_len": seq, "decode_tokens": 8, "repeats": 1, "warmup": 0},
        "input": _input_boundary(input_bytes if input_bytes is not None else r.choice([8 * seq, 150_528, 602_112])),
        "output": {"bytes": r.choice([8, 4 * 50257, 64]), "decode_step_bytes": 8},
        "stages": stages,
        "cuts": cuts,
        "profile_wall_s": 0.0,
        "calibration": {
            "metric": "token_agreement",
            "source": "synthetic",
            "items": 1,
            "reference": "synthetic",
            "measured_cuts": list(range(n_stages - 1)),
            "wall_s": 0.0,
        },
    }
    return ModelProfile.model_validate(data)


def _input_boundary(n_bytes: int) -> dict[str, Any]:
    """The raw input (boundary before stage 0) of ``n_bytes`` bytes, uploaded ``raw`` at no codec cost."""
    exact = {"mean": 1.0, "min": 1.0}
    raw = {"bytes": n_bytes, "encode_ms": 0.0, "decode_ms": 0.0, "fidelity": exact}
    tensor = {"name": "image_file", "role": "control", "dtype": "uint8", "shape": [n_bytes], "bytes": n_bytes}
    return {
        "after_stage": -1,
        "description": "synthetic",
        "tensors": [tensor],
        "activation_bytes": n_bytes,
        "codecs": {"raw": raw},
    }
