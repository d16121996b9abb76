"""Boundary states through the wire format: names, roles and dtypes survive; integer tensors stay exact."""

import pytest
import torch

from aiflow_cli.errors import FrameError
from aiflow_cli.runtime.wire import pack_state, unpack_state


def test_state_round_trip_keeps_names_roles_and_integers() -> None:
    state = {
        "hidden_states": torch.randn(1, 9, 32),
        "attention_mask": torch.ones(1, 9, dtype=torch.int64),
        "encoder_hidden_states": torch.randn(1, 5, 32),
    }
    roles = {"hidden_states": "hidden", "attention_mask": "control", "encoder_hidden_states": "side"}
    packed = pack_state(state, roles, "int8+zstd3")
    assert [t.codec for t in packed.tensors] == ["int8+zstd3", "raw", "int8+zstd3"]
    back, back_roles, _ = unpack_state(packed.tensors, packed.frames)
    assert back_roles == roles and list(back) == list(state)
    assert torch.equal(back["attention_mask"], state["attention_mask"])
    assert torch.allclose(back["hidden_states"], state["hidden_states"], atol=0.05)


def test_frame_count_mismatch_is_a_frame_error() -> None:
    packed = pack_state({"h": torch.zeros(2)}, {}, "raw")
    with pytest.raises(FrameError):
        unpack_state(packed.tensors + packed.tensors, packed.frames)
    with pytest.raises(FrameError):
        unpack_state(packed.tensors, [b"not a frame"])
