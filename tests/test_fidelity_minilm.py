"""MiniLM (real all-MiniLM-L6-v2 weights) against the implementation users would otherwise call:
sentence-transformers' ``encode()``, with the pooling, normalisation and truncation it reads from the model's
files, on inputs of every length it accepts (including one it truncates at max_seq_length = 256 tokens)."""

from __future__ import annotations

import pytest
import torch

from aiflow_cli.links import load_link
from aiflow_cli.models import load_model, resolve
from aiflow_cli.plan.problem import Limits, build_problem
from aiflow_cli.plan.verify import measure, solve_verified
from aiflow_cli.profile import profile_model
from aiflow_cli.profile.calibration import load_calibration

st_module = pytest.importorskip("sentence_transformers")
FLOOR = 0.999


pytestmark = pytest.mark.usefixtures("own_cache")  # (conftest.py) a fresh AIFLOW_CACHE_DIR for this module


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture(scope="module")
def encoder():
    return st_module.SentenceTransformer(str(resolve("minilm").directory), device="cpu")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_settings_are_read_from_the_model_files(minilm, encoder):
    opts = minilm.adapter.options
    assert opts["max_seq_length"] == encoder.max_seq_length == 256
    assert opts["pooling"] == "mean" and opts["normalize"] is True


def test_minilm_equals_encode_on_short_and_long_inputs(minilm, encoder):
    sentences = list(load_calibration().sentences)
    lengths = [len(encoder.tokenizer(s)["input_ids"]) for s in sentences]
    assert min(lengths) <= 4 and max(lengths) > 256  # a one-word input and one that encode() truncates
    reference = encoder.encode(sentences, convert_to_tensor=True)
    for s, n, ref in zip(sentences, lengths, reference):
        x = minilm.prepare(text=s)
        assert x["input_ids"].shape[1] == min(n, 256)  # truncated exactly where encode() truncates
        out = minilm.output(minilm.run(x))
        assert _cos(out, ref) >= 0.9999, (n, _cos(out, ref))
        assert abs(float(out.norm()) - 1.0) < 1e-5  # the Normalize module
    # a batch (right-padded to the longest) gives the same embeddings
    batch = minilm.output(minilm.run(minilm.prepare(text=sentences)))
    for out, ref in zip(batch, reference):
        assert _cos(out, ref) >= 0.9999


def test_int8_plan_meets_its_embedding_floor_end_to_end(minilm):
    """Profile with int8, plan a device/cloud split under a 0.999 floor on embedding cosine vs encode(), and
    check the measured fidelity (every calibration sentence, the long one included) holds the floor."""
    prof = profile_model(minilm, repeats=1, warmup=0, codecs=["raw", "int8"])
    assert prof.calibration.metric == "embedding_cosine"
    assert prof.calibration.reference == "sentence-transformers encode()" and prof.calibration.reference_min >= 0.9999
    problem = build_problem(
        {"*": prof},
        {"device-cloud": load_link("thin-uplink")},
        speeds={"device": 1, "cloud": 1},
        limits=Limits(min_fidelity=FLOOR, require=frozenset({"device", "cloud"}), codecs=("int8",)),
    )
    v = solve_verified(problem, model=minilm)
    f = v.fidelity
    assert f.status == "verified" and f.metric == "embedding_cosine" and f.items == len(load_calibration().sentences)
    assert f.measured_min >= FLOOR
    # placement codecs are keyed by boundary (the first stage the receiver runs); measure() by after_stage
    cuts = {b - 1: v.problem.codecs[c] for b, c in v.placement.codecs.items()}
    assert list(cuts.values()) == ["int8"]
    again = measure(minilm, cuts, use_cache=False)
    assert again.min >= FLOOR and again.min < 1.0  # the codec ran, and still holds the floor
