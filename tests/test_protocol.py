"""The tier protocol without a network: every message survives encode -> JSON (or its binary header) -> decode,
and a malformed or foreign-version envelope is refused naming the field or both versions. The binary headers
themselves: tests/test_headers.py."""

from __future__ import annotations

import json

import pytest

from aiflow_cli.errors import LimitExceeded, PeerRejected, RemoteError, TransportError
from aiflow_cli.models.sampling import DraftDist
from aiflow_cli.runtime import protocol
from aiflow_cli.runtime.protocol import Error, Hello, HelloReply, Infer, Result, TensorSpec, TierInfo, Verify
from aiflow_cli.runtime.timings import Timings
from aiflow_cli.transport import Message


def _timings() -> Timings:
    t = Timings()
    t.tier("edge").compute_ms, t.tier("edge").steps = 1.5, 3
    t.link("edge-cloud").bytes_up, t.link("edge-cloud").wire_ms = 4096, 0.25
    return t


def _through_json(env: Message) -> Message:
    """What the receiver gets: the meta goes through JSON as the transport sends it (a binary one as it is)."""
    meta = env.meta if type(env.meta) is bytes else json.loads(json.dumps(env.meta))
    return Message(env.kind, meta, list(env.frames), env.session_id)


MESSAGES = [
    (Hello("a" * 64, "b" * 64, "device", 1234.5), []),
    (HelloReply((TierInfo("edge", "a" * 64, "b" * 64, (2, 5), 1 << 20, 1 << 27, 12.5, 0.5, 42),)), []),
    (
        Infer(
            "a" * 64,
            "device",
            "decode",
            3,
            (TensorSpec("hidden_states", "hidden", "int8"), TensorSpec("attention_mask", "control", "raw")),
            8,
            False,
            900.0,
        ),
        [b"f1", b"f2"],
    ),
    (Verify("a" * 64, "device", 5, (TensorSpec("hidden_states", "hidden", "raw"),), 17, (4, 9, 2), 6, 800.0), [b"h"]),
    (Infer("a" * 64, "device", "decode", 3, (), 8, False, 900.0, "", 0.7, 40, 0.9, 2**63 - 1, 5), []),
    (
        Verify(
            "a" * 64,
            "device",
            5,
            (TensorSpec("hidden_states", "hidden", "raw"),),
            17,
            (4, 9),
            6,
            800.0,
            "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
            1.0,
            0,
            1.0,
            3,
            11,
            (DraftDist((4, 7), (0.75, 0.25)), DraftDist((9,), (1.0,))),
        ),
        [b"h"],
    ),  # fmt: skip
    (Result(_timings(), tokens=[[1, 2, 3]]), []),
    (Result(_timings(), tensors=(TensorSpec("output", "hidden", "raw"),)), [b"out"]),
    (Error("LimitExceeded", "edge: too big", "edge"), []),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("msg,frames", MESSAGES, ids=[type(m).__name__ for m, _ in MESSAGES])
def test_every_message_round_trips(msg, frames, binary) -> None:
    env = protocol.encode(msg, frames, session_id=7, binary=binary)
    assert env.kind == msg.KIND and env.session_id == 7
    if binary and msg.KIND in protocol.BINARY:  # the hot-path messages: a binary header, no JSON
        assert type(env.meta) is bytes and env.meta[0] == protocol.PROTOCOL_VERSION
    else:
        assert env.meta["v"] == protocol.PROTOCOL_VERSION
    assert protocol.decode(_through_json(env)) == msg


def test_infer_and_result_travel_binary() -> None:
    assert set(protocol.BINARY) == {protocol.INFER, protocol.RESULT}


def test_other_versions_are_refused_naming_both() -> None:
    env = _through_json(protocol.encode(*MESSAGES[2], binary=False))
    for v in (1, 2, protocol.PROTOCOL_VERSION + 1):
        shown = str(v)
        env.meta["v"] = v
        want = f"speaks version {protocol.PROTOCOL_VERSION}, the peer sent version {shown}"
        with pytest.raises(PeerRejected, match=want):
            protocol.decode(env)
    del env.meta["v"]  # the untyped protocol had no version field
    with pytest.raises(PeerRejected, match="sent version 1"):
        protocol.decode(env)


@pytest.mark.parametrize(
    "change,names",
    [
        ({"draft": [1, "2"]}, "'draft'"),
        ({"draft": 3}, "'draft'"),
        ({"cache_len": -1}, "cache_len -1"),
        ({"remaining": 0}, "remaining 0"),
        ({"stage": True}, "'stage'"),
    ],
)
def test_a_malformed_verify_is_refused_naming_the_field(change, names) -> None:
    msg, frames = next(m for m in MESSAGES if isinstance(m[0], Verify))
    env = _through_json(protocol.encode(msg, frames))
    env.meta.update(change)
    with pytest.raises(TransportError, match=names):
        protocol.decode(env)


@pytest.mark.parametrize(
    "change,names",
    [
        ({"dists": [[[4, 7], [0.75, 0.25]]]}, "one distribution per draft"),
        ({"dists": [[[4, 4], [0.5, 0.5]], [[9], [1.0]]]}, "distinct"),
        ({"dists": [[[4, 7], [0.75, 0.75]], [[9], [1.0]]]}, "sum to 1"),
        ({"dists": [[[4, -7], [0.75, 0.25]], [[9], [1.0]]]}, "distinct token ids"),
        ({"dists": [[[4], [1.0], 3], [[9], [1.0]]]}, "'dists'"),
        ({"dists": [[[4, 7], ["x", 0.25]], [[9], [1.0]]]}, "'dists'"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"index": -1}, "'index'"),
    ],
)
def test_a_malformed_sampled_verify_is_refused_naming_the_field(change, names) -> None:
    msg, frames = [m for m in MESSAGES if isinstance(m[0], Verify)][1]
    env = _through_json(protocol.encode(msg, frames))
    env.meta.update(change)
    with pytest.raises(TransportError, match=names):
        protocol.decode(env)


def test_an_error_of_another_version_still_reaches_the_user() -> None:
    env = Message(protocol.ERROR, {"v": 1, "error_kind": "LimitExceeded", "message": "too big", "tier": "cloud"})
    with pytest.raises(LimitExceeded, match="^cloud: too big$") as e:
        protocol.expect_reply(env, Result)
    assert e.value.tier == "cloud"
    env = Message(protocol.ERROR, {"error_kind": "NotAnAiflowClass", "message": "boom", "tier": "edge"})
    with pytest.raises(RemoteError, match="edge: boom"):
        protocol.expect_reply(env, Result)


@pytest.mark.parametrize(
    "change,why",
    [
        ({"stage": "3"}, "field 'stage' must be an integer, got str"),
        ({"stage": True}, "field 'stage' must be an integer"),
        ({"stage": -1}, "must be >= 0"),
        ({"phase": "sideways"}, "unknown phase 'sideways'"),
        ({"last": 1}, "field 'last' must be true or false"),
        ({"plan_hash": None}, "field 'plan_hash' .* is missing"),
        ({"tensors": [{"name": "x"}, ["y", "hidden", "raw"]]}, "field 'tensors' must be a list of .*triples"),
        ({"tensors": [["x", "hidden", "raw"]]}, "lists 1 tensors but carries 2 frames"),
        ({"deadline_ms": "soon"}, "field 'deadline_ms' must be a number"),
    ],
)
def test_malformed_fields_are_named(change, why) -> None:
    env = _through_json(protocol.encode(*MESSAGES[2], binary=False))
    env.meta.update(change)
    env.meta = {k: v for k, v in env.meta.items() if v is not None}
    with pytest.raises(TransportError, match=why):
        protocol.decode(env)


def test_malformed_replies_are_refused() -> None:
    v = protocol.PROTOCOL_VERSION
    with pytest.raises(TransportError, match="field 'timings'"):
        protocol.decode(Message(protocol.RESULT, {"v": v, "timings": {"tiers": {"edge": [1.0]}}}))
    with pytest.raises(TransportError, match="field 'tokens'"):
        protocol.decode(Message(protocol.RESULT, {"v": v, "timings": {}, "tokens": [["a"]]}))
    with pytest.raises(TransportError, match="expected a result reply, got 'hello_reply'"):
        protocol.expect_reply(protocol.encode(MESSAGES[1][0]), Result)
    with pytest.raises(TransportError, match="unknown message kind 'bogus'"):
        protocol.decode(Message("bogus", {"v": v}))


def test_timings_keep_their_figures_on_the_wire() -> None:
    t = _timings()
    back = Timings.from_wire(json.loads(json.dumps(t.to_wire())))
    assert back == t and back.to_json() == t.to_json()
    assert isinstance(back.tier("edge").steps, int) and isinstance(back.link("edge-cloud").bytes_up, int)
