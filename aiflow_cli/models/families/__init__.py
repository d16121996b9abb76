"""One adapter per model family; :func:`adapter_for` picks it from a transformers config."""

from __future__ import annotations

from aiflow_cli.errors import ModelError
from aiflow_cli.models.adapter import Adapter


def adapter_for(config) -> type[Adapter]:
    """The adapter class for a config; :class:`ModelError` naming the supported families otherwise."""
    mt = getattr(config, "model_type", None)
    if mt == "gpt2":
        from aiflow_cli.models.families.gpt2 import GPT2Adapter

        return GPT2Adapter
    from aiflow_cli.models.families.decoder import DECODER_FAMILIES, unsupported_message

    if mt in DECODER_FAMILIES:
        from aiflow_cli.models.families.decoder import DecoderAdapter

        return DecoderAdapter
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
    raise ModelError(unsupported_message(mt))
