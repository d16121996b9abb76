"""Real inputs for :meth:`StagedModel.prepare`: text through the model's tokenizer, images through ViT preprocessing.

Models with a tokenizer in their directory (``minilm``, HF checkpoints) use it. Built-ins have random weights and no
vocabulary, so they use a byte tokenizer: each UTF-8 byte ``b`` becomes token ``b % vocab_size`` (deterministic,
enough to drive the model with real text). Images are resized to the model's size, scaled to [0, 1] and
normalised with the processor's mean/std (ViT: 0.5/0.5), as ``ViTImageProcessor`` does.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from aiflow_cli.errors import InputError
from aiflow_cli.models.adapter import text_positions
from aiflow_cli.models.state import BoundaryState


def _texts(text: str | Sequence[str]) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InputError("text must be a non-empty string or a list of them")
    return texts


def tokenize(options: dict[str, Any], text: str | Sequence[str], vocab_size: int, device: torch.device,
             max_len: int | None = None) -> BoundaryState:
    """``input_ids``, ``attention_mask`` (0 on right padding) and ``position_ids`` for one or more texts."""
    texts = _texts(text)
    tok_dir = options.get("tokenizer_dir")
    if tok_dir:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        enc = tok(texts, padding=True, truncation=True, max_length=max_len or tok.model_max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
    else:
        rows = [[b % vocab_size for b in t.encode("utf-8")][: max_len or None] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    _, pos = text_positions(ids.shape[0], ids.shape[1], device)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos}


def pixel_values(image: Any, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """[B, 3, size, size] pixel values from a PIL image (or a list of them)."""
    from PIL import Image

    images = image if isinstance(image, (list, tuple)) else [image]
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise InputError(f"image must be a PIL.Image, got {type(im).__name__}")
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out).to(device=device, dtype=dtype)


def sample_image():
    """The bundled sample photo-like image (``aiflow_cli/assets/sample.jpg``)."""
    from importlib.resources import files

    from PIL import Image

    with files("aiflow_cli.assets").joinpath("sample.jpg").open("rb") as f:
        im = Image.open(f)
        im.load()
    return im


#: Largest image (pixels) accepted from encoded bytes: a bound on what a small file may expand to.
MAX_IMAGE_PIXELS = 40_000_000
#: Boundary-state name of an image shipped as its encoded file (JPEG/PNG bytes, uint8 [n]).
IMAGE_FILE = "image_file"


def image_file_tensor(image: Any) -> torch.Tensor:
    """An image as its encoded file bytes in a uint8 tensor: a path or bytes as they are (JPEG stays JPEG), a PIL
    image as lossless PNG. This is what a device that computes nothing uploads."""
    import io
    from pathlib import Path

    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read image {str(image)!r}: {e.strerror or e}") from None
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    else:
        raise InputError(f"image must be a path, bytes or a PIL.Image, got {type(image).__name__}")
    decode_image_file(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # refuse a bad file here, not remotely
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_image_file(data: torch.Tensor) -> Any:
    """The RGB PIL image in an ``image_file`` tensor; :class:`InputError` for anything that is not a readable image
    of at most :data:`MAX_IMAGE_PIXELS` pixels (checked from the header, before decoding)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if data.dtype != torch.uint8 or data.dim() != 1:
        raise InputError(f"{IMAGE_FILE} must be a 1-d uint8 tensor of file bytes, got {data.dtype} {list(data.shape)}")
    try:
        im = Image.open(io.BytesIO(data.numpy().tobytes()))
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise InputError(f"image of {im.width}x{im.height} pixels is above the limit of {MAX_IMAGE_PIXELS:,}")
        return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"not a readable image file: {e}") from None
