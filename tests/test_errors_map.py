"""Every error variant of the Rust core reaches Python as its class of the one exception tree (aiflow_cli.errors),
with its message and the CLI exit code of that class; and the transport's Limits, defined once in Rust, keep the
Python API they had as a dataclass."""

from __future__ import annotations

import pytest

from aiflow_cli import _core, errors
from aiflow_cli.transport import Limits

# The class and exit code each variant of `aiflow_proto::Error` must map to. A variant added in Rust without a
# row here (or mapped to another class) fails the tests below.
EXPECTED = {
    "Codec": ("CodecError", 4),
    "Frame": ("FrameError", 4),
    "Input": ("InputError", 3),
    "Transport": ("TransportError", 7),
    "PeerRejected": ("PeerRejected", 8),
    "Timeout": ("Timeout", 9),
    "LimitExceeded": ("LimitExceeded", 10),
    "Remote": ("RemoteError", 11),
}


def test_every_variant_is_listed_once() -> None:
    pairs = _core.error_classes()
    variants = [v for v, _ in pairs]
    assert len(variants) == len(set(variants))
    assert set(variants) == set(EXPECTED)
    assert dict(pairs) == {v: cls for v, (cls, _) in EXPECTED.items()}


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_variant_raises_its_class_with_message_and_exit_code(variant: str) -> None:
    cls_name, exit_code = EXPECTED[variant]
    cls = getattr(errors, cls_name)
    assert issubclass(cls, errors.AiflowError)
    with pytest.raises(errors.AiflowError) as info:
        _core.raise_core_error(variant, f"boom from {variant}")
    assert type(info.value) is cls
    assert str(info.value) == f"boom from {variant}"
    assert info.value.exit_code == exit_code


def test_unknown_variant_is_an_input_error() -> None:
    with pytest.raises(errors.InputError, match="unknown core error variant"):
        _core.raise_core_error("NoSuchVariant", "x")


def test_limits_keep_the_dataclass_api() -> None:
    d = Limits()
    assert (d.max_message_bytes, d.max_frames, d.max_meta_bytes) == (1 << 30, 4096, 1 << 20)
    assert (d.max_concurrent_streams, d.max_connections) == (256, 1024)
    assert (d.idle_timeout_ms, d.request_timeout_ms) == (1_500, 120_000)
    assert (d.stream_window_bytes, d.connection_window_bytes, d.congestion) == (32 << 20, 64 << 20, "rate")
    custom = Limits(max_frames=4, congestion="cubic")
    assert (custom.max_frames, custom.congestion, custom.max_meta_bytes) == (4, "cubic", 1 << 20)
    assert custom != d and Limits() == d
    custom.max_frames = 8
    assert custom.max_frames == 8
    assert repr(Limits(max_frames=2)).startswith("Limits(max_message_bytes=1073741824, max_frames=2,")
    assert "congestion='rate'" in repr(d)
    with pytest.raises(TypeError):
        Limits(max_franes=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Limits(max_frames="many")  # type: ignore[arg-type]
