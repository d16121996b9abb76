"""What a user would write without aiflow: the same quantization math in torch plus python ``zstandard``.

The benchmark runs these beside the Rust codec, on the same tensors, so that its ratios compare equal work:
the same formats (per-row int8 absmax with f32 scales, int4 absmax per group with two values per byte,
round-to-nearest-even casts) and the same zstd level.
"""

from __future__ import annotations

import numpy as np
import torch

from aiflow_cli.bench import require_extra

zstandard = require_extra("zstandard", "zstandard")


def _split(spec: str) -> tuple[str, int | None]:
    base, _, z = spec.partition("+")
    level = int(z[4:] or 3) if z else None
    return base, level


def _int4_group(base: str) -> int:
    return int(base[5:]) if base.startswith("int4g") else 32


def encode(x: torch.Tensor, spec: str) -> bytes:
    """Encodes an fp32 tensor's payload (no header) the way a torch user would."""
    base, level = _split(spec)
    if base == "raw":
        payload = x.numpy().tobytes()
    elif base == "fp16":
        payload = x.half().numpy().tobytes()
    elif base == "bf16":
        payload = x.bfloat16().view(torch.int16).numpy().tobytes()
    elif base == "int8":
        scale = x.abs().amax(dim=-1, keepdim=True) / 127
        q = torch.round(x / scale.clamp_min(1e-30)).to(torch.int8)
        payload = scale.numpy().tobytes() + q.numpy().tobytes()
    elif base.startswith("int4"):
        g = _int4_group(base)
        cols = x.shape[-1]
        pad = (-cols) % g
        xs = torch.nn.functional.pad(x, (0, pad)).reshape(-1, g)
        scale = xs.abs().amax(dim=-1, keepdim=True) / 7
        q = (torch.round(xs / scale.clamp_min(1e-30)) + 8).to(torch.uint8).reshape(-1, cols + pad)[:, :cols].reshape(-1)
        if q.numel() % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        packed = (q[0::2] | (q[1::2] << 4)).numpy()
        payload = scale.numpy().tobytes() + packed.tobytes()
    else:
        raise ValueError(spec)
    if level is not None:
        payload = zstandard.ZstdCompressor(level=level).compress(payload)
    return payload


def decode(data: bytes, spec: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`encode` back to fp32."""
    base, level = _split(spec)
    if level is not None:
        data = zstandard.ZstdDecompressor().decompress(data)
    numel = int(np.prod(shape))
    if base == "raw":
        return torch.from_numpy(np.frombuffer(data, dtype=np.float32).reshape(shape).copy())
    if base == "fp16":
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).reshape(shape)).float()
    if base == "bf16":
        return torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy()).view(torch.bfloat16).float().reshape(shape)
    rows = numel // shape[-1]
    if base == "int8":
        scale = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=rows).copy()).reshape(rows, 1)
        q = torch.from_numpy(np.frombuffer(data, dtype=np.int8, offset=4 * rows).copy()).reshape(rows, -1)
        return (q.float() * scale).reshape(shape)
    g = _int4_group(base)
    cols = shape[-1]
    groups = rows * ((cols + g - 1) // g)
    scale = torch.from_numpy(np.frombuffer(data, dtype=np.float32, count=groups).copy()).reshape(groups, 1)
    packed = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 * groups).copy())
    q = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel].reshape(rows, cols)
    pad = (-cols) % g
    q = torch.nn.functional.pad(q.to(torch.int16) - 8, (0, pad)).reshape(-1, g)
    return (q.float() * scale).reshape(rows, cols + pad)[:, :cols].reshape(shape)
