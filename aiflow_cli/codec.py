"""Tensor frames: encode a tensor with a codec spec (``int8+zstd3``, ``fp16``, ...) and decode it back.

The work is done in Rust (``aiflow_cli._core``) with the GIL released; this module only converts between torch
tensors / numpy arrays and (dtype, shape, buffer) without copying the data.

Codec specs: ``raw``, ``fp16``, ``bf16``, ``int8`` (absmax per row), ``int4`` (absmax per group of 32 along the
last dimension; ``int4g64`` for groups of 64), each optionally followed by ``+zstdN`` (zstd level N, default 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from aiflow_cli import _core
from aiflow_cli.errors import CodecError

TensorLike = Union[torch.Tensor, np.ndarray]

DEFAULT_MAX_DECODED_BYTES: int = _core.DEFAULT_MAX_DECODED_BYTES
"""Default cap on the decoded size of one frame (bytes); frames declaring more are refused before decoding."""

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NUMPY_STORAGE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # numpy has no bfloat16: carry the bits
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class FrameInfo:
    """What a frame's validated header says. Sizes in bytes."""

    dtype: str
    shape: tuple[int, ...]
    codec: str
    raw_len: int
    stored_len: int
    decoded_len: int
    header_len: int

    @property
    def frame_bytes(self) -> int:
        return self.header_len + self.stored_len


def canonical(codec: str) -> str:
    """Parses a codec spec and returns its canonical spelling (``INT8+zstd`` -> ``int8+zstd3``).

    Raises :class:`CodecError` for a spec that does not parse.
    """
    return _core.canonical_codec(codec)


def default_codecs() -> list[str]:
    """Every base codec with and without ``+zstd3``."""
    return list(_core.default_codecs())


#: dtype -> its name in frames, for the tensors `encode` takes (a dict lookup instead of str(dtype) per call).
_TORCH_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}


def _as_numpy(tensor: TensorLike) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(dtype name, shape, C-contiguous numpy view of the bytes); copies only if the input is not contiguous."""
    if isinstance(tensor, torch.Tensor):
        # per frame on the hot path: each step below is skipped when it has nothing to do (cheap property checks)
        t = tensor.detach() if tensor.requires_grad else tensor
        if not t.is_cpu:
            t = t.cpu()
        dtype = _TORCH_NAMES.get(t.dtype)
        if dtype is None:
            raise CodecError(f"unsupported tensor dtype {t.dtype}; frames carry {', '.join(_TORCH_DTYPES)}")
        if not t.is_contiguous():
            t = t.contiguous()
        shape = tuple(t.shape)
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy()
        else:
            arr = t.numpy()
        return dtype, shape, arr
    if isinstance(tensor, np.ndarray):
        dtype = str(tensor.dtype)
        if dtype not in _NUMPY_STORAGE or dtype == "uint16":
            raise CodecError(f"unsupported array dtype {tensor.dtype}")
        return dtype, tuple(tensor.shape), np.ascontiguousarray(tensor)
    raise CodecError(f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__name__}")


def _byte_view(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1).view(np.uint8)


def encode(tensor: TensorLike, codec: str = "int8+zstd3", *, zstd_threads: int = 0) -> bytes:
    """Encodes one tensor as a self-describing frame.

    ``zstd_threads``: worker threads for zstd on payloads >= 8 MiB (0 = one per core, 1 = single-threaded).
    Raises :class:`CodecError` for a bad spec, an unsupported dtype, or non-finite values under int8/int4.
    """
    dtype, shape, arr = _as_numpy(tensor)
    return _core.encode(_byte_view(arr), dtype, list(shape), codec, zstd_threads)


def _info(d: dict) -> FrameInfo:
    return FrameInfo(
        dtype=d["dtype"],
        shape=tuple(d["shape"]),
        codec=d["codec"],
        raw_len=d["raw_len"],
        stored_len=d["stored_len"],
        decoded_len=d["decoded_len"],
        header_len=d["header_len"],
    )


def inspect(data: bytes | bytearray | memoryview, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> FrameInfo:
    """Validates a frame's header (sizes, checksum) and returns what it declares, without decoding."""
    return _info(_core.inspect(data, max_decoded_bytes))


def decode_numpy(
    data: bytes | bytearray | memoryview, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> tuple[FrameInfo, np.ndarray]:
    """Decodes a frame into a new numpy array (bfloat16 comes back as its uint16 bits) and its header."""
    header, buf = _core.decode(data, max_decoded_bytes)
    info = _info(header)
    return info, np.frombuffer(buf, dtype=_NUMPY_STORAGE[info.dtype]).reshape(info.shape)


def _decode_array(data: bytes | bytearray | memoryview, max_decoded_bytes: int) -> tuple[str, np.ndarray]:
    """(dtype name, array): :func:`decode_numpy` without building a :class:`FrameInfo` (the per-step path)."""
    header, buf = _core.decode(data, max_decoded_bytes)
    dtype = header["dtype"]
    return dtype, np.frombuffer(buf, dtype=_NUMPY_STORAGE[dtype]).reshape(header["shape"])


def decode(data: bytes | bytearray | memoryview, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> torch.Tensor:
    """Validates and decodes a frame into a new CPU tensor of its original dtype and shape.

    Raises :class:`aiflow_cli.errors.FrameError` for anything malformed: truncation, bad magic/version/dtype/codec,
    shapes that overflow or disagree with the payload, checksum mismatch, a declared size above
    ``max_decoded_bytes``, or a zstd payload that inflates beyond what the header declares.
    """
    dtype, arr = _decode_array(data, max_decoded_bytes)
    t = torch.from_numpy(arr)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


__all__ = [
    "FrameInfo",
    "canonical",
    "default_codecs",
    "encode",
    "decode",
    "decode_numpy",
    "inspect",
    "DEFAULT_MAX_DECODED_BYTES",
]
