"""ViT image classifiers (``ViTForImageClassification``) as stages: ``embed`` (patches + CLS + positions) ->
``block{i}`` -> ``head`` (final layernorm + classifier on the CLS token).

Boundary state: ``pixel_values`` [B, 3, H, W] at the input, then ``hidden_states`` [B, 1 + patches, H]. The
captioner's encoder reuses :func:`vit_embed` and :func:`vit_block`.
"""

from __future__ import annotations

import torch
from transformers import ViTForImageClassification
from transformers.masking_utils import create_bidirectional_mask

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import Adapter, StageSpec

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def check_image_size(config, image_size: int | None) -> int:
    size = config.image_size if image_size is None else image_size
    if size != config.image_size:
        raise InputError(
            f"image_size={size}: this ViT takes {config.image_size}x{config.image_size} images "
            "(its position embeddings are fixed)",
            param="image_size",
        )
    return size


def random_pixels(config, batch: int, image_size: int | None, generator, device, dtype) -> torch.Tensor:
    size = check_image_size(config, image_size)
    return torch.randn(batch, config.num_channels, size, size, generator=generator).to(device=device, dtype=dtype)


def vit_embed(vit, config, pixels: torch.Tensor) -> torch.Tensor:
    if (
        pixels.ndim != 4
        or pixels.shape[1] != config.num_channels
        or tuple(pixels.shape[2:]) != (config.image_size,) * 2
    ):
        raise InputError(
            f"pixel_values must be [B, {config.num_channels}, {config.image_size}, {config.image_size}], "
            f"got {list(pixels.shape)}"
        )
    expected = vit.embeddings.patch_embeddings.projection.weight.dtype
    return vit.embeddings(pixels.to(expected))


def vit_block(vit, config, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=None)
    return vit.layers[layer](hidden, mask)


class ViTAdapter(Adapter):
    family = "vit"
    task = "classify"
    model_class = ViTForImageClassification

    def model_stages(self):
        n = self.config.num_hidden_layers
        return (
            [StageSpec("embed", "embed", ("vit.embeddings",))]
            + [StageSpec(f"block{i}", "block", (f"vit.layers.{i}",), layer=i) for i in range(n)]
            + [StageSpec("head", "head", ("vit.layernorm", "classifier"))]
        )

    def run_stage(self, spec, state, cache):
        vit = self.model.vit
        if spec.kind == "embed":
            return {"hidden_states": vit_embed(vit, self.config, state["pixel_values"])}
        if spec.kind == "head":
            seq = vit.layernorm(state["hidden_states"])
            return {"logits": self.model.classifier(seq[:, 0, :])}
        return {"hidden_states": vit_block(vit, self.config, spec.layer, state["hidden_states"])}

    def default_seq_len(self):
        return None

    def default_image_size(self):
        return self.config.image_size

    def make_inputs(self, *, batch, seq_len, image_size, generator, device, dtype):
        if seq_len is not None:
            raise InputError("vit models take images; `seq_len` does not apply", param="seq_len")
        return {"pixel_values": random_pixels(self.config, batch, image_size, generator, device, dtype)}

    def prepare(self, *, text=None, image=None, device, dtype):
        from aiflow_cli.models.inputs import pixel_values

        if image is None or text is not None:
            raise InputError("vit models take an image only")
        return {"pixel_values": pixel_values(image, self.config.image_size, IMAGE_MEAN, IMAGE_STD, device, dtype)}

    def monolithic(self, inputs):
        return self.model(pixel_values=inputs["pixel_values"]).logits

    def output_description(self) -> str:
        return "class logits"
