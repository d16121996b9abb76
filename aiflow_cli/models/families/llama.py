"""Decoder-only LMs of the Llama layout (Llama, Qwen2, Mistral: ``model.embed_tokens``, ``model.layers``,
``model.norm``, ``lm_head``) as stages: ``embed`` -> ``block{i}`` -> ``head`` (norm + lm_head).

Boundary state as GPT-2: ``hidden_states`` (hidden), ``attention_mask`` and ``position_ids`` (control). Each block
stage recomputes what the monolithic forward computes once and shares: the causal mask (sliding-window for
Mistral/Qwen2 sliding layers, as those models choose it) and the rotary ``position_embeddings`` from
``position_ids`` (the rotary module has no weights, only a buffer, so every stage has its own).
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import Adapter, StageCache, StageSpec, extend_for_token
from aiflow_cli.models.families.gpt2 import random_text


class LlamaAdapter(Adapter):
    family = "llama"
    task = "generate"

    @classmethod
    def model_class_for(cls, config):
        return AutoModelForCausalLM._model_mapping[type(config)]

    def stage_specs(self):
        n = self.config.num_hidden_layers
        return (
            [StageSpec("embed", "embed", ("model.embed_tokens",), decodes=True)]
            + [StageSpec(f"block{i}", "block", (f"model.layers.{i}", "model.rotary_emb"), decodes=True, layer=i)
               for i in range(n)]
            + [StageSpec("head", "head", ("model.norm", "lm_head"), decodes=True)]
        )

    def _mask_fn(self, layer: int):
        c = self.config
        if c.model_type == "mistral":
            return create_causal_mask if getattr(c, "sliding_window", None) is None else create_sliding_window_causal_mask
        layer_types = getattr(c, "layer_types", None)
        if layer_types and layer_types[layer] == "sliding_attention":
            return create_sliding_window_causal_mask
        return create_causal_mask

    def run_stage(self, spec, state, cache):
        m = self.model.model
        if spec.kind == "embed":
            self.check_ids(state["input_ids"], self.config.vocab_size)
            out = {k: v for k, v in state.items() if k != "input_ids"}
            out["hidden_states"] = m.embed_tokens(state["input_ids"])
            return out
        if spec.kind == "head":
            return {"logits": self.model.lm_head(m.norm(state["hidden_states"]))}
        hidden, pos = state["hidden_states"], state["position_ids"]
        kv = cache.kv if cache is not None else None
        mask = self._mask_fn(spec.layer)(
            config=self.config, inputs_embeds=hidden, attention_mask=state["attention_mask"], past_key_values=kv,
            position_ids=pos, **({"layer_idx": spec.layer} if kv is not None else {}),
        )
        pe = m.rotary_emb(hidden, position_ids=pos)
        hidden = m.layers[spec.layer](hidden, attention_mask=mask, position_embeddings=pe, position_ids=pos,
                                      past_key_values=kv, use_cache=kv is not None)
        out = dict(state)
        out["hidden_states"] = hidden
        return out

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        if image_size is not None:
            raise InputError("llama models take text; `image_size` does not apply", param="image_size")
        return random_text(batch, seq_len or 32, self.config.vocab_size, self.config.max_position_embeddings,
                           generator, device)

    def prepare(self, *, text=None, image=None, device, dtype):
        from aiflow_cli.models.inputs import tokenize

        if text is None or image is not None:
            raise InputError("llama models take text only")
        return tokenize(self.options, text, self.config.vocab_size, device)

    def monolithic(self, inputs):
        return self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          position_ids=inputs["position_ids"], use_cache=False).logits

    def output_description(self) -> str:
        return "next-token ids (int64), one per sequence per step"

    def new_cache(self) -> StageCache:
        return StageCache(DynamicCache(config=self.config))

    def next_inputs(self, prev_inputs, tokens):
        return extend_for_token(prev_inputs, tokens)
