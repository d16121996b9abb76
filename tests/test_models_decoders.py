"""The generic decoder path on every family it lists: a tiny random-weight config per family (built from the
installed transformers' config classes), saved as a safetensors checkpoint, loaded by aiflow stage by stage.

- split == monolithic: the stages run one by one give the same logits as the transformers model's own forward,
  bitwise (torch.equal) on CPU fp32, with sequences longer than the sliding window and right padding;
- generation through per-stage KV caches (prefill + decode steps) == the library's ``generate`` (greedy);
- three separately loaded parts (each reading only its stages' tensors) chained == the monolithic logits;
- unsupported layouts are refused in one line naming what is supported.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from aiflow_cli.errors import ModelError
from aiflow_cli.models import load_model, load_stages
from aiflow_cli.models.families.decoder import DECODER_FAMILIES

COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]

#: model_type -> (config class name, extra config arguments): each differs from Llama somewhere.
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),
    "ministral": ("MinistralConfig", {"head_dim": 16, "sliding_window": 4, "layer_types": ALTERNATING}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5, "num_key_value_heads": 4}),
    "phi3": ("Phi3Config", {"sliding_window": 4}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 16,
            "sliding_window": 4,
            "final_logit_softcapping": 5.0,
            "attn_logit_softcapping": 10.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "head_dim": 16,
            "sliding_window": 4,
            "layer_types": ALTERNATING,
            "final_logit_softcapping": 5.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25}),
    "olmo": ("OlmoConfig", {"clip_qkv": 0.5}),
    "olmo2": ("Olmo2Config", {}),
    "granite": (
        "GraniteConfig",
        {"embedding_multiplier": 4.0, "residual_multiplier": 0.5, "logits_scaling": 2.0, "attention_multiplier": 0.3},
    ),
    "cohere": ("CohereConfig", {"logit_scale": 0.5, "use_qk_norm": False}),
    "cohere2": ("Cohere2Config", {"sliding_window": 4, "layer_types": ALTERNATING, "logit_scale": 0.5}),
    "smollm3": (
        "SmolLM3Config",
        {"no_rope_layers": [1, 0, 1], "sliding_window": 4, "layer_types": ["full_attention"] * 3},
    ),
    "starcoder2": ("Starcoder2Config", {"sliding_window": 4}),
    "glm": ("GlmConfig", {"head_dim": 16, "partial_rotary_factor": 0.5}),
    "helium": ("HeliumConfig", {"head_dim": 16}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.5, "use_parallel_residual": True, "tie_word_embeddings": False}),
}


def test_every_listed_family_is_tested():
    assert set(CONFIGS) == set(DECODER_FAMILIES)


def make_config(family: str):
    cls_name, extra = CONFIGS[family]
    return getattr(transformers, cls_name)(**{**COMMON, **extra})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory of its random-weight safetensors checkpoint, the transformers model itself)."""
    out = {}
    for family in CONFIGS:
        cfg = make_config(family)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.generation_config.eos_token_id = None  # generate every token asked, as aiflow does without tokenizer
        d = tmp_path_factory.mktemp(family)
        model.save_pretrained(d)
        out[family] = (str(d), model)
    return out


def inputs(batch: int, seq: int, pad: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, COMMON["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[-1, seq - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": torch.arange(seq).expand(batch, -1).contiguous()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_split_equals_monolithic_bitwise(checkpoints, family):
    d, ref = checkpoints[family]
    m = load_model(d)
    # stages: input.prepare, embed, the blocks, head
    assert m.family == family and m.task == "generate" and m.num_stages == COMMON["num_hidden_layers"] + 3
    assert m.load_stats.tensors_read > 0  # read stage by stage (-1: loaded whole through from_pretrained)
    x = inputs(2, 12, pad=3)  # longer than the sliding window (4), one row right-padded
    state = x
    for i in range(m.num_stages):
        state = m.run_stage(i, state)
    with torch.inference_mode():
        expected = ref(**x, use_cache=False).logits
    assert torch.equal(m.output(state), expected)
    assert torch.equal(m.output(m.run(x)), expected)  # the blocks sharing one mask / rotary per run (stage_setup)
    assert torch.equal(m.monolithic(x), expected)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_kv_cache_generation_equals_library_generate(checkpoints, family):
    d, ref = checkpoints[family]
    m = load_model(d)
    x = inputs(1, 6, seed=1)
    ours = m.generate(x, 6)
    with torch.inference_mode():
        theirs = ref.generate(
            input_ids=x["input_ids"],
            attention_mask=x["attention_mask"],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )[:, 6:]
    assert torch.equal(ours, theirs), (ours.tolist(), theirs.tolist())


@pytest.mark.parametrize("family", ["gemma3_text", "phi", "granite"])
def test_separately_loaded_parts_chain_to_the_monolithic_logits(checkpoints, family):
    d, ref = checkpoints[family]
    parts = [load_stages(d, r) for r in (range(3), range(3, 5), range(5, 6))]
    assert parts[0].load_stats.tensors_read > 0
    assert len(set(parts[0].load_stats.keys) & set(parts[2].load_stats.keys)) <= 1  # at most a tied embedding
    x = inputs(1, 9, seed=2)
    caches = [p.new_cache() for p in parts]
    state = x
    for p, c in zip(parts, caches):
        state = p.run(state, sorted(p.loaded), c)
    with torch.inference_mode():
        assert torch.equal(parts[2].output(state), ref(**x, use_cache=False).logits)


def test_unsupported_layouts_are_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    cfg = transformers.Qwen3MoeConfig(**COMMON, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
    cfg.save_pretrained(tmp_path)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "qwen3_moe" in msg and "supported:" in msg and "gemma3_text" in msg
    cfg = transformers.Gemma3TextConfig(**COMMON, head_dim=16, use_bidirectional_attention=True)
    d = tmp_path / "bidi"
    cfg.save_pretrained(d)
    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    with pytest.raises(ModelError, match="bidirectional"):
        load_model(str(d))


def test_legacy_head_name_is_read_per_stage(checkpoints):
    """GPT-NeoX checkpoints (Pythia, and what transformers itself saves) name the head ``embed_out``: the head stage
    reads that tensor alone, no fallback to loading the whole model."""
    from safetensors import safe_open

    d, ref = checkpoints["gpt_neox"]
    with safe_open(f"{d}/model.safetensors", "pt") as f:
        assert "embed_out.weight" in f.keys() and "lm_head.weight" not in f.keys()
    head = load_stages(d, [5])
    assert head.load_stats.tensors_read == 3 and "embed_out.weight" in head.load_stats.keys
    m = load_model(d)
    assert m.load_stats.tensors_read > 0  # -1 would mean: loaded whole through from_pretrained
    x = inputs(1, 7)
    with torch.inference_mode():
        assert torch.equal(m.output(m.run(x)), ref(**x, use_cache=False).logits)
