"""BERT family encoders (``BertModel``; MiniLM is one) as stages: ``embed`` -> ``block{i}`` -> ``head`` (pooling).

Boundary state: ``hidden_states`` [B, S, H] (hidden), ``attention_mask`` [B, S] (control). Each block builds its
bidirectional mask with ``create_bidirectional_mask`` as ``BertModel.forward`` does (once per run of stages:
:mod:`~aiflow_cli.models.stage_setup`). The head pools token states
into one embedding per sequence: mean over unmasked tokens (or the CLS token), then L2-normalised when the model
is a sentence-transformers model with a ``Normalize`` module (MiniLM) - exactly what ``encode()`` returns.
"""

from __future__ import annotations

import torch
from transformers import BertModel
from transformers.masking_utils import create_bidirectional_mask

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import Adapter, StageSpec, text_positions
from aiflow_cli.models.stage_setup import setup, tensor_key


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Sentence embedding [B, H] from token states [B, S, H] (sentence-transformers' Pooling + Normalize)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        emb = hidden[:, 0]
    elif mode == "max":
        emb = hidden.masked_fill(m == 0, -1e9).max(1).values
    else:
        emb = (hidden * m).sum(1)
        n = m.sum(1).clamp(min=1e-9)
        emb = emb / (n.sqrt() if mode == "mean_sqrt_len" else n)
    if normalize:
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    return emb


class BertAdapter(Adapter):
    family = "bert"
    task = "encode"
    model_class = BertModel

    @staticmethod
    def prune(model):
        model.pooler = None  # the CLS pooler is not part of sentence embeddings

    def model_stages(self):
        n = self.config.num_hidden_layers
        return (
            [StageSpec("embed", "embed", ("embeddings",))]
            + [StageSpec(f"block{i}", "block", (f"encoder.layer.{i}",), layer=i) for i in range(n)]
            + [StageSpec("head", "head", ())]
        )

    def run_stage(self, spec, state, cache):
        m = self.model
        if spec.kind == "embed":
            self.check_ids(state["input_ids"], self.config.vocab_size)
            if state["input_ids"].shape[1] > self.config.max_position_embeddings:
                raise InputError(f"sequence longer than the model's {self.config.max_position_embeddings} positions")
            hidden = m.embeddings(
                input_ids=state["input_ids"],
                position_ids=state["position_ids"],
                token_type_ids=state.get("token_type_ids"),
            )
            return {"hidden_states": hidden, "attention_mask": state["attention_mask"]}
        if spec.kind == "head":
            emb = pool(
                state["hidden_states"],
                state["attention_mask"],
                self.options.get("pooling", "mean"),
                self.options.get("normalize", False),
            )
            return {"embeddings": emb}
        hidden = state["hidden_states"]
        attention_mask = state["attention_mask"]
        mask = setup(
            "bert.mask",
            (self.config, attention_mask),
            (tensor_key(hidden),),
            lambda: create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask),
        )
        hidden = m.encoder.layer[spec.layer](hidden, mask, None, encoder_attention_mask=None)
        return {"hidden_states": hidden, "attention_mask": state["attention_mask"]}

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        if image_size is not None:
            raise InputError("bert models take text; `image_size` does not apply", param="image_size")
        seq_len = seq_len or 32
        if seq_len > self.config.max_position_embeddings:
            raise InputError(
                f"seq_len={seq_len} exceeds the model's {self.config.max_position_embeddings} positions",
                param="seq_len",
            )
        ids = torch.randint(0, self.config.vocab_size, (batch, seq_len), generator=generator).to(device)
        mask, pos = text_positions(batch, seq_len, device)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}

    def prepare(self, *, text=None, image=None, device, dtype):
        from aiflow_cli.models.inputs import tokenize

        if text is None or image is not None:
            raise InputError("bert models take text only")
        if self.options.get("do_lower_case"):
            text = text.lower() if isinstance(text, str) else [t.lower() for t in text]
        # sentence-transformers models truncate at their max_seq_length (256 for MiniLM), as encode() does
        max_len = self.options.get("max_seq_length") or self.config.max_position_embeddings
        return tokenize(self.options, text, self.config.vocab_size, device, max_len=max_len)

    def monolithic(self, inputs):
        hidden = self.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"],
            token_type_ids=inputs.get("token_type_ids"),
        ).last_hidden_state
        return pool(
            hidden, inputs["attention_mask"], self.options.get("pooling", "mean"), self.options.get("normalize", False)
        )

    def output_description(self) -> str:
        return "sentence embeddings"
