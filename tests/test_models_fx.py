"""The torch.fx fallback: cuts only where a single tensor crosses, equals the module, refuses what it cannot cut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aiflow_cli.errors import ModelError
from aiflow_cli.models.families.fx import single_tensor_cuts, stage_module


class Residual(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.Sequential(Residual(16), Residual(16), Residual(16))
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


class TwoStreams(nn.Module):
    """Both branches stay live until the end: no point where a single tensor crosses."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) * self.b(x) + x


class Dynamic(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_fx_split_equals_module_and_cuts_only_single_tensor_points():
    torch.manual_seed(0)
    mod = ResNetish()
    m = stage_module(mod, torch.randn(1, 8), name="resnetish")
    assert m.num_stages >= 4  # at least between the input layer, each residual block and the output layer
    x = m.make_inputs(batch=3, seed=0)
    state = m.run_stage(0, x)  # input.prepare: the input passes through
    assert state.keys() == x.keys()
    for i in range(1, m.num_stages - 1):
        state = m.run_stage(i, state)
        assert list(state) == ["fx:hidden"] and m.roles(state) == {"fx:hidden": "hidden"}
    state = m.run_stage(m.num_stages - 1, state)
    assert torch.equal(m.output(state), mod(x["fx:input"]))


def test_fx_cut_points_exclude_residual_interiors():
    graph = torch.fx.symbolic_trace(Residual(4)).graph
    # inside a residual block the input x stays live until the add: the only single-tensor point is none
    assert single_tensor_cuts(graph) == []


def test_fx_refuses_what_it_cannot_cut():
    with pytest.raises(ModelError, match="single tensor"):
        stage_module(TwoStreams(), torch.randn(1, 4))
    with pytest.raises(ModelError, match="cannot trace"):
        stage_module(Dynamic(), torch.randn(1, 4))


def test_fx_profile_runs():
    from aiflow_cli.profile import profile_model

    m = stage_module(ResNetish(), torch.randn(1, 8), name="resnetish")
    p = profile_model(m, codecs=["int8"], repeats=1, warmup=0)
    assert p.family == "fx" and len(p.cuts) == m.num_stages - 1
    assert all(c.codecs["int8"].bytes < c.codecs["raw"].bytes or c.activation_bytes < 256 for c in p.cuts)
