"""Image captioners (``VisionEncoderDecoderModel``: ViT encoder -> GPT-2 decoder with cross-attention) as stages:

    enc.embed -> enc.block0 .. enc.block{N-1} (+ final layernorm) -> dec.embed -> dec.block0 .. -> head

The graph is a DAG, not a chain: the encoder output feeds every decoder block's cross-attention. It crosses each
decoder cut as ``encoder_hidden_states`` with role ``side``: sent once per request; a stage holding a cache keeps
it (and its cross-attention keys/values) for every decode step. Before the decoder, the decoder's prompt
(``input_ids``, ``attention_mask``, ``position_ids``; control) rides along with the encoder stream
(``hidden_states``). Decode steps start at ``dec.embed``.
"""

from __future__ import annotations

import torch
from transformers import VisionEncoderDecoderModel

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import Adapter, StageCache, StageSpec, extend_for_token, text_positions
from aiflow_cli.models.families.gpt2 import gpt2_block, gpt2_cache, gpt2_embed, gpt2_head, gpt2_specs
from aiflow_cli.models.families.vit import IMAGE_MEAN, IMAGE_STD, random_pixels, vit_block, vit_embed

_PROMPT = ("input_ids", "attention_mask", "position_ids")


class CaptionerAdapter(Adapter):
    family = "captioner"
    task = "caption"
    model_class = VisionEncoderDecoderModel

    @staticmethod
    def prune(model):
        model.encoder.pooler = None  # VisionEncoderDecoder reads last_hidden_state only

    @property
    def enc_config(self):
        return self.model.encoder.config

    @property
    def dec_config(self):
        return self.model.decoder.config

    def _needs_proj(self) -> bool:
        return (
            self.enc_config.hidden_size != self.dec_config.hidden_size
            and getattr(self.dec_config, "cross_attention_hidden_size", None) is None
        )

    def model_stages(self):
        n = self.enc_config.num_hidden_layers
        last_extra = ("encoder.layernorm",) + (("enc_to_dec_proj",) if self._needs_proj() else ())
        specs = [StageSpec("enc.embed", "encoder_embed", ("encoder.embeddings",))]
        specs += [
            StageSpec(
                f"enc.block{i}", "encoder_block", (f"encoder.layers.{i}",) + (last_extra if i == n - 1 else ()), layer=i
            )
            for i in range(n)
        ]
        dec = gpt2_specs(
            "decoder.transformer", "decoder.lm_head", self.dec_config.n_layer, kind="decoder_block", name_prefix="dec."
        )
        dec[0] = StageSpec("dec.embed", "decoder_embed", dec[0].modules, decodes=True)
        dec[-1] = StageSpec("head", "head", dec[-1].modules, decodes=True)
        return specs + dec

    def run_stage(self, spec, state, cache):
        enc, dec = self.model.encoder, self.model.decoder
        prompt = {k: state[k] for k in _PROMPT if k in state}
        if spec.kind == "encoder_embed":
            return {"hidden_states": vit_embed(enc, self.enc_config, state["pixel_values"]), **prompt}
        if spec.kind == "encoder_block":
            hidden = vit_block(enc, self.enc_config, spec.layer, state["hidden_states"])
            if spec.layer < self.enc_config.num_hidden_layers - 1:
                return {"hidden_states": hidden, **prompt}
            hidden = enc.layernorm(hidden)
            if self._needs_proj():
                hidden = self.model.enc_to_dec_proj(hidden)
            return {"encoder_hidden_states": hidden, **prompt}
        if spec.kind == "decoder_embed":
            return gpt2_embed(dec.transformer, state, self.dec_config.vocab_size)
        if spec.kind == "head":
            return gpt2_head(dec.transformer, dec.lm_head, state)
        return gpt2_block(dec.transformer, self.dec_config, spec.layer, state, cache)

    def default_seq_len(self):
        return 1

    def default_image_size(self):
        return self.enc_config.image_size

    def _prompt(self, batch: int, seq_len: int, generator, device) -> dict[str, torch.Tensor]:
        if seq_len > self.dec_config.n_positions:
            raise InputError(
                f"seq_len={seq_len} exceeds the decoder's {self.dec_config.n_positions} positions", param="seq_len"
            )
        ids = torch.randint(0, self.dec_config.vocab_size, (batch, seq_len), generator=generator)
        ids[:, 0] = self.model.config.decoder_start_token_id
        mask, pos = text_positions(batch, seq_len, device)
        return {"input_ids": ids.to(device), "attention_mask": mask, "position_ids": pos}

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        pixels = random_pixels(self.enc_config, batch, image_size, generator, device, dtype)
        return {"pixel_values": pixels, **self._prompt(batch, seq_len or 1, generator, device)}

    def prepare(self, *, text=None, image=None, device, dtype):
        from aiflow_cli.models.inputs import pixel_values

        if image is None:
            raise InputError("captioners take an image")
        pixels = pixel_values(image, self.enc_config.image_size, IMAGE_MEAN, IMAGE_STD, device, dtype)
        if text is not None:
            raise InputError("captioners take an image only (the caption starts from the decoder start token)")
        return {"pixel_values": pixels, **self._prompt(pixels.shape[0], 1, torch.Generator(), device)}

    def monolithic(self, inputs):
        return self.model(
            pixel_values=inputs["pixel_values"],
            decoder_input_ids=inputs["input_ids"],
            decoder_attention_mask=inputs["attention_mask"],
            decoder_position_ids=inputs["position_ids"],
            use_cache=False,
        ).logits

    def output_description(self) -> str:
        return "caption token ids (int64), one per image per step"

    def new_cache(self) -> StageCache:
        return gpt2_cache(self.dec_config, cross=True)

    def next_inputs(self, prev_inputs, tokens):
        return extend_for_token(prev_inputs, tokens)
