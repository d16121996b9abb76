"""One adapter per model family; :func:`adapter_for` picks it from a transformers config."""

from __future__ import annotations

from aiflow_cli.errors import ModelError
from aiflow_cli.models.adapter import Adapter

LLAMA_LAYOUT = ("llama", "qwen2", "mistral")


def adapter_for(config) -> type[Adapter]:
    """The adapter class for a config; :class:`ModelError` naming the supported families otherwise."""
    mt = getattr(config, "model_type", None)
    if mt == "gpt2":
        from aiflow_cli.models.families.gpt2 import GPT2Adapter

        return GPT2Adapter
    if mt in LLAMA_LAYOUT:
        from aiflow_cli.models.families.llama import LlamaAdapter

        return LlamaAdapter
    if mt == "bert":
        from aiflow_cli.models.families.bert import BertAdapter

        return BertAdapter
    if mt == "vit":
        from aiflow_cli.models.families.vit import ViTAdapter

        return ViTAdapter
    if mt == "vision-encoder-decoder":
        enc, dec = config.encoder.model_type, config.decoder.model_type
        if (enc, dec) != ("vit", "gpt2"):
            raise ModelError(f"vision-encoder-decoder with {enc} -> {dec}: aiflow cuts ViT -> GPT-2 captioners only")
        from aiflow_cli.models.families.captioner import CaptionerAdapter

        return CaptionerAdapter
    raise ModelError(
        f"no stage adapter for model_type {mt!r}; supported: gpt2, {', '.join(LLAMA_LAYOUT)}, bert, vit, "
        "vision-encoder-decoder (vit -> gpt2); other torch modules: aiflow_cli.models.fx.stage_module"
    )
