"""Decoder-only language models as stages, one generic path for every layout of the Llama pattern.

A causal LM of these families is ``<prefix>.embed_tokens`` (or ``embed_in``) -> ``<prefix>.layers[i]`` -> a final
norm (``norm``, ``final_layernorm`` or ``final_layer_norm``) -> ``lm_head``, with a weightless rotary module beside
the layers. The stages are ``embed`` -> ``block{i}`` -> ``head``; each stage calls the library's own modules the way the model's ``forward``
does (transformers 5.x, read per family), so that split == monolithic bitwise on CPU fp32:

- embed: ``embed_tokens`` (Gemma's embedding scales itself by sqrt(hidden); older Gemma code scaled in the
  forward, done here then), Granite's ``embedding_multiplier``, Phi's / GPT-NeoX's embedding dropout (identity
  in eval);
- block i: the layer's mask (``config.layer_types[i]``: full or sliding-window causal; without layer types, sliding
  when ``config.sliding_window`` is set, as Mistral / Phi-3 / Starcoder2 choose), sized against this layer's own KV
  cache; the rotary embedding of this layer's type where it has one (Gemma 3: local and global rotary); within
  one run of stages the blocks share both (:mod:`~aiflow_cli.models.stage_setup`);
- head: final norm, ``lm_head``, then what the CausalLM's forward applies to the logits (Gemma 2/3 final
  soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``).

Boundary state: ``hidden_states`` (hidden), ``attention_mask`` and ``position_ids`` (control). Families are listed
in :data:`DECODER_FAMILIES`, each one tested on a random-weight config; anything else is refused in one line.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from aiflow_cli.errors import InputError, ModelError
from aiflow_cli.models.adapter import (
    MASK_CACHE_KWARG,
    StageCache,
    StageSpec,
    TextLMAdapter,
    accepts,
    cache_kwarg,
)
from aiflow_cli.models.families.gpt2 import random_text
from aiflow_cli.models.stage_setup import kv_sizes, setup, tensor_key

#: model_type -> what it is; every entry is covered by tests/test_models_decoders.py (split == monolithic, KV cache
#: decode == the library's generate) on a random-weight config.
DECODER_FAMILIES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM, TinyLlama",
    "mistral": "Mistral (sliding window)",
    "ministral": "Ministral (alternating sliding window)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (q/k norm)",
    "phi": "Phi-1.5 / Phi-2 (LayerNorm, partial rotary, biased head)",
    "phi3": "Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv)",
    "gemma": "Gemma (scaled embedding)",
    "gemma2": "Gemma 2 (local/global, logit soft-capping)",
    "gemma3_text": "Gemma 3 text (local/global rotary)",
    "stablelm": "StableLM 2",
    "olmo": "OLMo",
    "olmo2": "OLMo 2",
    "granite": "Granite 3 (embedding/residual/logit multipliers)",
    "cohere": "Cohere Command-R layout (parallel block, logit scale)",
    "cohere2": "Cohere2 (sliding layers)",
    "smollm3": "SmolLM3 (no-rope layers)",
    "starcoder2": "StarCoder2",
    "glm": "GLM",
    "helium": "Helium",
    "gpt_neox": "GPT-NeoX / Pythia (parallel residual, partial rotary)",
}

#: Conventional names of the base model's parts, in the order tried (GPT-NeoX: ``embed_in``, ``emb_dropout``,
#: ``final_layer_norm``).
_EMBED_NAMES = ("embed_tokens", "embed_in")
_DROPOUT_NAMES = ("embed_dropout", "emb_dropout")
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm")


def check_decoder_config(config) -> None:
    """:class:`ModelError` for a decoder config this path does not cut (one line naming what it does)."""
    mt = getattr(config, "model_type", None)
    if mt not in DECODER_FAMILIES:
        raise ModelError(unsupported_message(mt))
    types = set(getattr(config, "layer_types", None) or [])
    if types - {"full_attention", "sliding_attention"}:
        raise ModelError(f"{mt}: layer types {sorted(types)}: aiflow cuts full and sliding-window attention only")
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError(f"{mt} with bidirectional attention is an encoder; aiflow cuts it as a causal decoder only")


def unsupported_message(mt) -> str:
    return (
        f"no stage adapter for model_type {mt!r}; supported: decoders {', '.join(DECODER_FAMILIES)}; gpt2, bert, "
        "vit, vision-encoder-decoder (vit -> gpt2); other torch modules: fx:package.module:factory"
    )


class DecoderAdapter(TextLMAdapter):
    family = "decoder"

    def __init__(self, model, config, options=None):
        super().__init__(model, config, options)
        check_decoder_config(config)
        self.family = config.model_type
        self.prefix = model.base_model_prefix
        self.base = getattr(model, self.prefix)
        self.embed_name = next((n for n in _EMBED_NAMES if hasattr(self.base, n)), None)
        self.dropout_name = next((n for n in _DROPOUT_NAMES if hasattr(self.base, n)), None)
        self.norm_name = next((n for n in _NORM_NAMES if hasattr(self.base, n)), None)
        if self.embed_name is None or self.norm_name is None or not hasattr(self.base, "rotary_emb"):
            raise ModelError(f"{config.model_type}: no embedding / final norm / rotary module where decoders have them")
        self.layer_types = list(getattr(config, "layer_types", None) or [])
        self.rotary_takes_type = accepts(type(self.base.rotary_emb).forward, "layer_type")

    @classmethod
    def model_class_for(cls, config):
        check_decoder_config(config)
        return AutoModelForCausalLM._model_mapping[type(config)]

    def model_stages(self):
        p, n = self.prefix, self.config.num_hidden_layers
        rotary = tuple(f"{p}.{r}" for r in ("rotary_emb", "rotary_emb_local") if hasattr(self.base, r))
        embed = (f"{p}.{self.embed_name}",) + ((f"{p}.{self.dropout_name}",) if self.dropout_name else ())
        return (
            [StageSpec("embed", "embed", embed, decodes=True)]
            + [StageSpec(f"block{i}", "block", (f"{p}.layers.{i}",) + rotary, decodes=True, layer=i) for i in range(n)]
            + [StageSpec("head", "head", (f"{p}.{self.norm_name}", "lm_head"), decodes=True)]
        )

    def _layer_type(self, layer: int) -> str:
        if self.layer_types:
            return self.layer_types[layer]
        return "full_attention" if getattr(self.config, "sliding_window", None) is None else "sliding_attention"

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        b, c = self.base, self.config
        emb = getattr(b, self.embed_name)
        h = emb(ids)
        if c.model_type.startswith("gemma") and not hasattr(emb, "embed_scale"):
            h = h * torch.tensor(c.hidden_size**0.5, dtype=h.dtype)  # transformers 4.x scaled in the forward
        if getattr(b, "embedding_multiplier", None) is not None:
            h = h * b.embedding_multiplier
        if self.dropout_name:
            h = getattr(b, self.dropout_name)(h)
        return h

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        logits = self.model.lm_head(getattr(self.base, self.norm_name)(hidden))
        cap = getattr(c, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if getattr(self.model, "logit_scale", None) is not None:
            logits = logits * self.model.logit_scale
        if c.model_type == "granite":
            logits = logits / c.logits_scaling
        return logits

    def run_stage(self, spec, state, cache):
        if spec.kind == "embed":
            self.check_ids(state["input_ids"], self.config.vocab_size)
            out = {k: v for k, v in state.items() if k != "input_ids"}
            out["hidden_states"] = self._embed(state["input_ids"])
            return out
        if spec.kind == "head":
            return {"logits": self._logits(state["hidden_states"])}
        hidden, pos, i = state["hidden_states"], state["position_ids"], spec.layer
        kv = cache.kv if cache is not None else None
        ltype = self._layer_type(i)
        mask_fn = create_sliding_window_causal_mask if ltype == "sliding_attention" else create_causal_mask
        attention_mask = state["attention_mask"]
        mask = setup(
            f"decoder.mask.{ltype}",
            (self.config, attention_mask, pos),
            (tensor_key(hidden), kv_sizes(kv, hidden.shape[1], i if kv is not None else None)),
            lambda: mask_fn(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=pos,
                **{MASK_CACHE_KWARG: kv},
                **({"layer_idx": i} if kv is not None else {}),
            ),
        )
        # the rotary module reads only the dtype and device of ``hidden``
        pe = setup(
            f"decoder.rotary.{ltype}", (self.base, pos), (tensor_key(hidden),), lambda: self._rotary(hidden, pos, ltype)
        )
        layer = self.base.layers[i]
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=pe,
            position_ids=pos,
            use_cache=kv is not None,
            **{cache_kwarg(type(layer)): kv},
        )
        if isinstance(hidden, tuple):  # transformers 4.x layers return (hidden, ...)
            hidden = hidden[0]
        out = dict(state)
        out["hidden_states"] = hidden
        return out

    def _rotary(self, hidden: torch.Tensor, pos: torch.Tensor, ltype: str):
        if self.rotary_takes_type:
            return self.base.rotary_emb(hidden, pos, ltype)
        if ltype == "sliding_attention" and hasattr(self.base, "rotary_emb_local"):
            return self.base.rotary_emb_local(hidden, position_ids=pos)
        return self.base.rotary_emb(hidden, position_ids=pos)

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        if image_size is not None:
            raise InputError(f"{self.family} models take text; `image_size` does not apply", param="image_size")
        return random_text(
            batch, seq_len or 32, self.config.vocab_size, self.config.max_position_embeddings, generator, device
        )

    def prepare(self, *, text=None, image=None, device, dtype):
        from aiflow_cli.models.inputs import tokenize

        if text is None or image is not None:
            raise InputError(f"{self.family} models take text only")
        return tokenize(
            self.options,
            text,
            self.config.vocab_size,
            device,
            max_positions=self.config.max_position_embeddings,
            chat=True,
        )

    def new_cache(self) -> StageCache:
        return StageCache(DynamicCache(config=self.config))
