"""Binary message headers (aiflow_cli/runtime/headers.py): infer and result round-trip without JSON, every field is
checked, and a truncated, oversized, mutated or foreign-version header is refused with a TransportError or
PeerRejected (never another exception), before anything is allocated for what it declares."""

from __future__ import annotations

import dataclasses
import random
import re
import struct
from dataclasses import dataclass
from typing import Optional

import pytest

from aiflow_cli.errors import PeerRejected, TransportError
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.headers import HeaderCodec
from aiflow_cli.runtime.protocol import Infer, Result, TensorSpec
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.transport import Message

INFER = protocol.BINARY[protocol.INFER]
RESULT = protocol.BINARY[protocol.RESULT]


def _timings() -> Timings:
    t = Timings()
    t.tier("edge").compute_ms, t.tier("edge").steps = 1.5, 3
    t.tier("clöud").handle_ms = 1e-9
    t.link("edge-cloud").bytes_up, t.link("edge-cloud").wire_ms = 1 << 40, 0.25
    return t


def _infer(**change) -> Infer:
    base = Infer(
        "a" * 64,
        "device",
        "decode",
        3,
        (TensorSpec("hidden_states", "hidden", "int8"), TensorSpec("attention_mask", "control", "raw")),
        8,
        False,
        900.5,
    )
    return dataclasses.replace(base, **change)


ROUND_TRIP = [
    _infer(),
    _infer(tensors=(), last=True, deadline_ms=0.0, max_new_tokens=0, phase="prefill"),
    _infer(sender="édge ☁", plan_hash=""),
    Result(_timings(), tokens=[[1, 2, 3], [4, 5, 6]]),
    Result(_timings(), tokens=[[]]),
    Result(Timings(), tokens=[[(1 << 63) - 1, -(1 << 63)]]),
    Result(_timings(), tensors=(TensorSpec("output", "hidden", "raw"),)),
    Result(Timings()),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_round_trip(msg) -> None:
    codec = protocol.BINARY[msg.KIND]
    b = codec.encode(msg)
    back = codec.decode(b)
    assert back == msg and type(back.tensors) is tuple
    assert all(type(getattr(back, f.name)) is type(getattr(msg, f.name)) for f in dataclasses.fields(msg))
    # and through the protocol's envelope, as the transport delivers it
    env = protocol.encode(msg, [b"f"] * len(msg.tensors), session_id=3)
    assert type(env.meta) is bytes and protocol.decode(env) == msg


@pytest.mark.parametrize("msg", [ROUND_TRIP[0], ROUND_TRIP[3], ROUND_TRIP[6]], ids=["infer", "tokens", "tensors"])
def test_every_truncation_is_refused_naming_the_field(msg) -> None:
    codec = protocol.BINARY[msg.KIND]
    b = codec.encode(msg)
    named = set()
    for n in range(len(b)):
        with pytest.raises(TransportError, match=f"malformed {msg.KIND} message") as e:
            codec.decode(b[:n])
        named.update(re.findall(r"field '(\w+)'", str(e.value)))
    # every field that is not in the fixed block was reached and named by some truncation
    fixed = {f.name for f in dataclasses.fields(msg) if type(getattr(msg, f.name)) in (int, float, bool)}
    assert {f.name for f in dataclasses.fields(msg)} - fixed <= named | {"the fixed fields"}


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(TransportError, match="1 bytes after the last field"):
        INFER.decode(INFER.encode(_infer()) + b"\0")


def test_other_versions_and_layouts_are_refused_naming_both() -> None:
    b = bytearray(INFER.encode(_infer()))
    b[0] = protocol.PROTOCOL_VERSION + 1
    want = f"speaks version {protocol.PROTOCOL_VERSION}, the peer sent version {protocol.PROTOCOL_VERSION + 1}"
    with pytest.raises(PeerRejected, match=want):
        INFER.decode(bytes(b))
    b = bytearray(INFER.encode(_infer()))
    b[1] ^= 0xFF  # the layout checksum: a peer whose Infer has other fields
    with pytest.raises(PeerRejected, match="other fields than this tier's"):
        INFER.decode(bytes(b))
    with pytest.raises(TransportError, match="the header is 2 bytes"):
        INFER.decode(b"\3\0")


def _corrupt(msg, field: str, value) -> bytes:
    """The header of ``msg`` with ``field``'s length/count prefix replaced by ``value`` (u32)."""
    codec = protocol.BINARY[msg.KIND]
    marker = "\x00marker\x00"
    b = codec.encode(dataclasses.replace(msg, **{field: marker}))
    at = b.index(marker.encode()) - 4
    return b[:at] + struct.pack("<I", value) + b[at + 4 :]


def test_oversized_lengths_and_counts_are_refused_before_allocating() -> None:
    b = _corrupt(_infer(), "sender", 0xFFFFFFFF)
    with pytest.raises(TransportError, match="field 'sender': a string of 4294967295 bytes runs past the end"):
        INFER.decode(b)
    # a tensor count of 2^32-1 in a header of a few hundred bytes: refused from the count alone
    b = INFER.encode(_infer(tensors=()))
    one = INFER.encode(_infer(tensors=(TensorSpec("x", "hidden", "raw"),)))
    at = next(i for i, (x, y) in enumerate(zip(b, one)) if x != y)  # the count: 0 here, 1 there (little-endian)
    with pytest.raises(TransportError, match="field 'tensors': declares 4294967295 items"):
        INFER.decode(b[:at] + struct.pack("<I", 0xFFFFFFFF) + b[at + 4 :])
    # token rows likewise
    b = RESULT.encode(Result(Timings(), tokens=[[]]))
    at = len(b) - 4 - 4  # [row count][row 0's count][tensor count]
    with pytest.raises(TransportError, match="field 'tokens': declares 4294967295 items"):
        RESULT.decode(b[:at] + struct.pack("<I", 0xFFFFFFFF) + b[at + 4 :])


def test_bad_values_are_refused_naming_the_field() -> None:
    with pytest.raises(TransportError, match="field 'sender': a string is not UTF-8"):
        INFER.decode(INFER.encode(_infer(sender="ab")).replace(b"ab", b"\xff\xfe"))
    # the bool of `last` sits right after the two i64 of the fixed block (stage, max_new_tokens)
    b = bytearray(INFER.encode(_infer()))
    b[5 + 16] = 7
    with pytest.raises(TransportError, match="field 'last'.* 7, not 0 or 1"):
        INFER.decode(bytes(b))
    b = bytearray(RESULT.encode(Result(Timings())))
    b[5 + 8] = 2  # the presence byte of `tokens`, after the two empty timing maps
    with pytest.raises(TransportError, match="field 'tokens'.*presence byte is 2"):
        RESULT.decode(bytes(b))


@pytest.mark.parametrize(
    "change,why",
    [
        ({"phase": "sideways"}, "unknown phase 'sideways'"),
        ({"stage": -1}, "must be >= 0"),
        ({"max_new_tokens": -5}, "must be >= 0"),
        ({"deadline_ms": float("nan")}, "field 'deadline_ms' must be a number"),
    ],
)
def test_values_a_type_cannot_rule_out_are_checked(change, why) -> None:
    env = protocol.encode(_infer(**change), [b"a", b"b"])
    with pytest.raises(TransportError, match=why):
        protocol.decode(env)


def test_frames_must_match_the_tensor_table() -> None:
    env = protocol.encode(_infer(), [b"only one"])
    with pytest.raises(TransportError, match="lists 2 tensors but carries 1 frames"):
        protocol.decode(env)


def test_a_binary_header_for_a_json_only_kind_is_refused() -> None:
    with pytest.raises(TransportError, match="hello message has no binary form"):
        protocol.decode(Message(protocol.HELLO, INFER.encode(_infer())))
    with pytest.raises(PeerRejected, match="result message has other fields"):
        protocol.decode(Message(protocol.RESULT, INFER.encode(_infer())))  # an infer header sent as a result


def test_random_mutations_never_raise_anything_else() -> None:
    rng = random.Random(14)
    for msg in ROUND_TRIP:
        codec = protocol.BINARY[msg.KIND]
        good = codec.encode(msg)
        for _ in range(300):
            b = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            b = b[: rng.randint(0, len(b))] if rng.random() < 0.3 else b
            try:
                back = codec.decode(bytes(b))
            except (TransportError, PeerRejected):
                continue
            assert codec.encode(back) == bytes(b)  # whatever decodes is exactly what was sent


# -- the layout follows the dataclass ---------------------------------------------------------------------------------
_STEP_FIELDS = [("phase", str), ("stage", int), ("tensors", tuple[TensorSpec, ...], ()), ("last", bool, True)]
_NEW_FIELDS = [
    ("traceparent", str, ""),
    ("draft", Optional[list[int]], None),
    ("stages", tuple[int, int], (0, 0)),
    ("scores", dict[str, float], dataclasses.field(default_factory=dict)),
]
# the same message before and after fields were added to it (the same class name: only the fields differ)
_Step = dataclasses.make_dataclass("Step", _STEP_FIELDS, slots=True)
_StepWithTrace = dataclasses.make_dataclass("Step", _STEP_FIELDS + _NEW_FIELDS, slots=True)


def test_a_new_field_needs_no_codec_change_and_changes_the_layout_id() -> None:
    old, new = HeaderCodec(_Step, 9), HeaderCodec(_StepWithTrace, 9)
    msg = _StepWithTrace(
        "verify", 2, (TensorSpec("h", "hidden", "raw"),), False, "00-ab-cd-01", [5, 6], (2, 5), {"p": 0.5}
    )
    assert new.decode(new.encode(msg)) == msg
    assert old.layout_id != new.layout_id
    with pytest.raises(PeerRejected, match="other fields"):
        old.decode(new.encode(msg))


def test_a_field_of_an_unsupported_type_fails_when_the_codec_is_built() -> None:
    @dataclass
    class Bad:
        blob: object

    with pytest.raises(TypeError, match="no binary encoding for type"):
        HeaderCodec(Bad, 1)
