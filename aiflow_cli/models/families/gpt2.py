"""GPT-2 (``GPT2LMHeadModel``) as stages: ``embed`` (wte + wpe) -> ``block{i}`` -> ``head`` (ln_f + lm_head).

Boundary state: ``hidden_states`` [B, S, H] (hidden) plus ``attention_mask`` [B, past+S] and ``position_ids``
[B, S] (control). Each block stage builds its 4-D causal mask from the 2-D one exactly as ``GPT2Model.forward``
does (``create_causal_mask``), sized against its own layer of the KV cache; within one run of stages the blocks
share it (:mod:`~aiflow_cli.models.stage_setup`). The decoder half of the captioner
reuses these functions with ``encoder_hidden_states`` (side) for cross-attention.
"""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import MASK_CACHE_KWARG, Adapter, StageCache, StageSpec, TextLMAdapter, text_positions
from aiflow_cli.models.stage_setup import kv_sizes, setup, tensor_key
from aiflow_cli.models.state import BoundaryState


def gpt2_specs(
    prefix: str, head_prefix: str, n_layer: int, *, kind: str = "block", name_prefix: str = ""
) -> list[StageSpec]:
    """Stage specs of a GPT-2 stack whose ``GPT2Model`` lives at ``prefix`` and ``lm_head`` at ``head_prefix``."""
    specs = [StageSpec(f"{name_prefix}embed", "embed", (f"{prefix}.wte", f"{prefix}.wpe"), decodes=True)]
    specs += [
        StageSpec(f"{name_prefix}block{i}", kind, (f"{prefix}.h.{i}",), decodes=True, layer=i) for i in range(n_layer)
    ]
    specs.append(StageSpec(f"{name_prefix}head", "head", (f"{prefix}.ln_f", f"{head_prefix}"), decodes=True))
    return specs


def gpt2_embed(transformer, state: BoundaryState, vocab_size: int) -> BoundaryState:
    ids = state["input_ids"]
    Adapter.check_ids(ids, vocab_size)
    pos = state["position_ids"]
    if int(pos.max()) >= transformer.wpe.num_embeddings:
        raise InputError(f"sequence longer than the model's {transformer.wpe.num_embeddings} positions")
    inputs_embeds = transformer.wte(ids)
    hidden = transformer.drop(inputs_embeds + transformer.wpe(pos))
    out = {k: v for k, v in state.items() if k != "input_ids"}
    out["hidden_states"] = hidden
    return out


def gpt2_block(transformer, config, layer: int, state: BoundaryState, cache: StageCache | None) -> BoundaryState:
    hidden = state["hidden_states"]
    kv = cache.kv if cache is not None else None
    layer_idx = layer if kv is not None else None
    attention_mask, pos = state["attention_mask"], state["position_ids"]
    mask = setup(
        "gpt2.mask",
        (config, attention_mask, pos),
        (tensor_key(hidden), kv_sizes(kv, hidden.shape[1], layer_idx)),
        lambda: create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            **{MASK_CACHE_KWARG: kv},
            position_ids=pos,
            layer_idx=layer_idx,
        ),
    )
    enc = state.get("encoder_hidden_states")
    if enc is None and cache is not None:
        enc = cache.side.get("encoder_hidden_states")
    elif enc is not None and cache is not None:
        cache.side["encoder_hidden_states"] = enc
    enc_mask = None
    if enc is not None:
        enc_mask = setup(
            "gpt2.cross_mask",
            (config, enc),
            (tensor_key(hidden), tensor_key(enc)),
            lambda: create_bidirectional_mask(
                config=config, inputs_embeds=hidden, attention_mask=None, encoder_hidden_states=enc
            ),
        )
    hidden = transformer.h[layer](
        hidden,
        kv,
        mask,
        enc,
        encoder_attention_mask=enc_mask,
        use_cache=kv is not None,
        position_ids=pos,
    )
    out = dict(state)
    out["hidden_states"] = hidden
    return out


def gpt2_head(transformer, lm_head, state: BoundaryState) -> BoundaryState:
    return {"logits": lm_head(transformer.ln_f(state["hidden_states"]))}


def gpt2_cache(config, cross: bool) -> StageCache:
    self_cache = DynamicCache(config=config)
    return StageCache(EncoderDecoderCache(self_cache, DynamicCache(config=config)) if cross else self_cache)


def random_text(batch: int, seq_len: int, vocab_size: int, max_positions: int, generator, device) -> BoundaryState:
    if seq_len > max_positions:
        raise InputError(f"seq_len={seq_len} exceeds the model's {max_positions} positions", param="seq_len")
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator).to(device)
    mask, pos = text_positions(batch, seq_len, device)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


class GPT2Adapter(TextLMAdapter):
    family = "gpt2"
    model_class = GPT2LMHeadModel

    def model_stages(self) -> list[StageSpec]:
        return gpt2_specs("transformer", "lm_head", self.config.n_layer)

    def run_stage(self, spec, state, cache):
        t = self.model.transformer
        if spec.kind == "embed":
            return gpt2_embed(t, state, self.config.vocab_size)
        if spec.kind == "head":
            return gpt2_head(t, self.model.lm_head, state)
        return gpt2_block(t, self.config, spec.layer, state, cache)

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        if image_size is not None:
            raise InputError("gpt2 models take text; `image_size` does not apply", param="image_size")
        return random_text(batch, seq_len or 32, self.config.vocab_size, self.config.n_positions, generator, device)

    def prepare(self, *, text=None, image=None, device, dtype):
        from aiflow_cli.models.inputs import tokenize

        if text is None or image is not None:
            raise InputError("gpt2 models take text only")
        return tokenize(self.options, text, self.config.vocab_size, device, max_positions=self.config.n_positions)

    def new_cache(self) -> StageCache:
        return gpt2_cache(self.config, cross=False)
