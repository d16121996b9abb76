"""The three-tier runtime end to end: cloud and edge are real `aiflow serve` processes on loopback, the device
runs in the test. Outputs must equal the monolithic model with the ``raw`` codec, and stay close when quantized."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from runtime_support import three_tier_plan

from aiflow_cli.models import load_model
from aiflow_cli.runtime.cluster import LocalCluster
from aiflow_cli.runtime.demo import SAMPLE_IMAGE

FAMILIES = {
    "builtin:gpt2-tiny": {"text": "the quick brown fox"},
    "builtin:llama-tiny": {"text": "split me in three"},
    "builtin:captioner-tiny": {"image": "sample"},
    "builtin:bert-tiny": {"text": "a sentence to embed"},
    "minilm": {"text": "real sentence-transformers weights, split in three"},
    "builtin:vit-tiny": {"image": "sample"},
}


def _inputs(spec: dict) -> dict:
    if spec.get("image") == "sample":
        return {"image": Image.open(SAMPLE_IMAGE).convert("RGB")}
    return dict(spec)


def _reference(model_name: str, inputs: dict, tokens: int):
    m = load_model(model_name)
    prepared = m.prepare(**inputs)
    if m.generates:
        return m.generate(prepared, tokens)
    return m.output(m.run(prepared))


@pytest.mark.parametrize("model_name", list(FAMILIES))
def test_three_processes_equal_the_monolithic_model_with_raw_codec(model_name, tmp_path):
    plan = three_tier_plan(model_name, tmp_path / "plan.json", codec="raw")
    assert len(plan.computing_tiers()) == 3, plan.summary()
    inputs = _inputs(FAMILIES[model_name])
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c, c.pipeline(timeout_s=60) as p:
        chain = p.hello()
        assert [d["tier"] for d in chain] == ["device", "edge", "cloud"]
        # each role loads only its own stages' weights (tied weights count on each stage that uses them)
        full = load_model(model_name)
        for d in chain:
            lo, hi = d["stages"]
            own = sum(full.stage_param_bytes(i) for i in range(lo, hi))
            assert d["loaded_param_bytes"] <= own and (own == 0 or d["loaded_param_bytes"] > 0), (d, own)
            assert d["loaded_param_bytes"] < full.loaded_param_bytes()
        r = p.run(**inputs, max_new_tokens=6)
    ref = _reference(model_name, inputs, 6)
    if r.tokens is not None:
        assert torch.equal(r.tokens, ref), (r.tokens, ref)
        assert r.text is not None and len(r.text) == 1
    else:
        assert r.output.shape == ref.shape
        torch.testing.assert_close(r.output, ref, rtol=1e-5, atol=1e-6)
    t = r.timings
    assert set(t.tiers) >= {"device", "edge", "cloud"}
    assert all(t.tiers[x].compute_ms > 0 for x in ("device", "edge", "cloud"))
    assert t.links["device-edge"].bytes_up > 0 and t.links["edge-cloud"].bytes_up > 0
    assert t.links["device-edge"].bytes_down > 0
    if r.tokens is not None and FAMILIES[model_name].get("text"):
        # LMs: the device drives generation; each decode step crosses each cut once
        assert t.links["device-edge"].messages == 6 and t.links["edge-cloud"].messages == 6


def test_quantized_cuts_stay_close_and_report_agreement(tmp_path):
    plan = three_tier_plan("builtin:bert-tiny", tmp_path / "plan.json", codec="int8")
    assert all(c.codec == "int8" for c in plan.cuts)
    inputs = {"text": "int8 activations on the wire"}
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c, c.pipeline() as p:
        r = p.run(**inputs)
        raw_bytes = sum(x.numel() * 4 for x in [r.output])
    ref = _reference("builtin:bert-tiny", inputs, 0)
    cos = torch.nn.functional.cosine_similarity(r.output.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, cos
    assert not torch.equal(r.output, ref)  # the codec really ran
    assert raw_bytes > 0


def test_cli_run_json_reports_timings_and_prediction(tmp_path):
    three_tier_plan("builtin:gpt2-tiny", tmp_path / "plan.json", codec="raw")
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c:
        cmd = [
            sys.executable,
            "-m",
            "aiflow_cli",
            "run",
            "hello there",
            "--plan",
            str(tmp_path / "plan.json"),
            "--edge",
            c.addresses["edge"],
            "--identity",
            str(tmp_path / "keys" / "device"),
            "--max-new-tokens",
            "4",
            "--json",
        ]
        for fp in c.fingerprints():
            cmd += ["--trust", fp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["tokens"][0]) == 4
    assert data["predicted"]["total_ms"] > 0
    assert set(data["timings"]["links"]) == {"device-edge", "edge-cloud"}
    assert [t["tier"] for t in data["tiers"]] == ["device", "edge", "cloud"]
    ref = _reference("builtin:gpt2-tiny", {"text": "hello there"}, 4)
    assert data["tokens"] == ref.tolist()
