"""The tensor codec through its Python API: round trips, exactness against torch's casts, error bounds, and
refusal of malformed frames with the right exception."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard

from aiflow_cli import codec
from aiflow_cli.errors import AiflowError, CodecError, FrameError

ALL_CODECS = codec.default_codecs() + ["int4g64", "int8+zstd19"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _activation(shape=(1, 37, 96), dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("spec", ALL_CODECS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_keeps_dtype_shape_and_closeness(spec: str, dtype: torch.dtype) -> None:
    x = _activation(dtype=dtype)
    y = codec.decode(codec.encode(x, spec))
    assert y.dtype == dtype and y.shape == x.shape
    cos = torch.nn.functional.cosine_similarity(x.float().flatten(), y.float().flatten(), dim=0).item()
    base = spec.split("+")[0].removesuffix("g64")
    floor = {"raw": 1.0, "fp16": 0.9999, "bf16": 0.9999, "int8": 0.9998, "int4": 0.99}[base]
    assert cos >= floor - 1e-6, (spec, dtype, cos)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_raw_is_bit_exact_for_every_dtype(dtype: torch.dtype) -> None:
    x = (
        (torch.arange(-50, 70).reshape(4, 30) % 7).to(dtype)
        if not dtype.is_floating_point
        else _activation(dtype=dtype)
    )
    for spec in ["raw", "raw+zstd3"]:
        y = codec.decode(codec.encode(x, spec))
        assert y.dtype == dtype and torch.equal(y, x)


def test_fp16_and_bf16_equal_torch_casts() -> None:
    x = _activation(shape=(8, 1000)) * 1000
    x[0, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 65519.0, -70000.0])  # ties and fp16 overflow
    assert torch.equal(codec.decode(codec.encode(x, "fp16")), x.half().float())
    assert torch.equal(codec.decode(codec.encode(x, "bf16")), x.bfloat16().float())


def test_int8_error_within_half_a_step_per_row() -> None:
    x = _activation(shape=(16, 384))
    y = codec.decode(codec.encode(x, "int8+zstd3"))
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((x - y).abs() <= scale / 2 * (1 + 1e-5)).all())


def test_int8_is_four_times_smaller_than_fp32() -> None:
    x = _activation(shape=(1, 512, 768))
    assert len(codec.encode(x, "int8")) <= x.numel() * 4 / 3.9
    assert len(codec.encode(x, "int4")) < len(codec.encode(x, "int8"))


def test_numpy_input_and_non_contiguous_tensors() -> None:
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    assert np.array_equal(codec.decode(codec.encode(a, "raw")).numpy(), a)
    t = torch.from_numpy(a).t()  # non-contiguous view
    assert torch.equal(codec.decode(codec.encode(t, "raw")), t)


@pytest.mark.parametrize("spec", ["raw", "int8+zstd3", "int4", "bf16"])
@pytest.mark.parametrize("shape", [(), (0,), (0, 768), (3, 0), (1,), (1, 1, 1, 1, 1, 1, 1, 1)])
def test_empty_and_zero_dim_tensors(spec: str, shape: tuple[int, ...]) -> None:
    x = torch.full(shape, 1.5)
    y = codec.decode(codec.encode(x, spec))
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=0.2)


def test_inspect_reports_header() -> None:
    x = _activation()
    frame = codec.encode(x, "INT8+ZSTD")
    info = codec.inspect(frame)
    assert info.codec == "int8+zstd3" and info.shape == tuple(x.shape) and info.dtype == "float32"
    assert info.frame_bytes == len(frame) and info.decoded_len == x.numel() * 4


@pytest.mark.parametrize("bad", ["", "int9", "int8+lz4", "int8+zstd0", "int8+zstd99", "raw+zstd3+zstd3", "int4g3"])
def test_bad_codec_specs_raise_codec_error(bad: str) -> None:
    with pytest.raises(CodecError, match="codec spec"):
        codec.encode(_activation(), bad)


def test_quantized_codecs_refuse_integers_and_non_finite() -> None:
    with pytest.raises(CodecError, match="floating"):
        codec.encode(torch.arange(10), "int8")
    x = _activation()
    x[0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="finite"):
        codec.encode(x, "int8")
    with pytest.raises(CodecError):
        codec.encode(torch.zeros(3, dtype=torch.complex64), "raw")
    with pytest.raises(CodecError):
        codec.encode([1.0, 2.0], "raw")  # type: ignore[arg-type]


# --- malformed frames -------------------------------------------------------------------------------------------


def _frame(spec: str = "int8+zstd3") -> bytes:
    return codec.encode(_activation(), spec)


def _reseal(frame: bytearray) -> bytes:
    """Recomputes the CRC so that a test reaches the check after the checksum."""
    import zlib

    header_len = 32 + 8 * frame[9]
    frame[12:16] = b"\0\0\0\0"
    crc = zlib.crc32(bytes(frame[:header_len]) + bytes(frame[header_len:]))
    frame[12:16] = struct.pack("<I", crc)
    return bytes(frame)


@pytest.mark.parametrize("cut", [0, 1, 16, 31, 40, -1])
def test_truncated_frames(cut: int) -> None:
    f = _frame()
    with pytest.raises(FrameError):
        codec.decode(f[:cut])


def test_every_single_flipped_byte_is_refused() -> None:
    f = _frame("int4+zstd3")
    for i in range(0, len(f), max(1, len(f) // 300)):
        bad = bytearray(f)
        bad[i] ^= 0x40
        with pytest.raises(FrameError):
            codec.decode(bytes(bad))


def test_unknown_version_dtype_codec_and_magic() -> None:
    for offset, value, message in [
        (0, ord("X"), "magic"),
        (4, 9, "version"),
        (5, 99, "dtype"),
        (6, 42, "codec"),
        (7, 0x80, "flags"),
    ]:
        bad = bytearray(_frame("int8"))
        bad[offset] = value
        with pytest.raises(FrameError, match=message):
            codec.decode(_reseal(bad))


def test_huge_shape_header_is_refused_before_allocation() -> None:
    bad = bytearray(_frame("raw"))
    bad[32:40] = struct.pack("<Q", 1 << 60)  # first dimension
    with pytest.raises(FrameError, match="overflow|limit"):
        codec.decode(_reseal(bad))


def test_declared_size_above_configurable_limit() -> None:
    f = codec.encode(torch.zeros(1024), "raw")
    codec.decode(f, max_decoded_bytes=4096)
    with pytest.raises(FrameError, match="limit"):
        codec.decode(f, max_decoded_bytes=4095)


def test_shape_disagreeing_with_payload() -> None:
    bad = bytearray(_frame("raw"))
    bad[40:48] = struct.pack("<Q", 36)  # 37 -> 36 rows: payload no longer matches
    with pytest.raises(FrameError, match="disagrees"):
        codec.decode(_reseal(bad))


def test_zstd_bomb_is_refused() -> None:
    small = codec.encode(torch.zeros(256), "raw+zstd3")
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (32 << 20))
    header_len = 32 + 8 * small[9]
    frame = bytearray(small[:header_len]) + bomb
    frame[24:32] = struct.pack("<Q", len(bomb))
    with pytest.raises(FrameError, match="zstd"):
        codec.decode(_reseal(frame))


def test_errors_are_one_tree() -> None:
    assert issubclass(FrameError, CodecError) and issubclass(CodecError, AiflowError)
    with pytest.raises(AiflowError):
        codec.decode(b"garbage")
