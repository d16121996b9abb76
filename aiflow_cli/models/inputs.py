"""Real inputs for :meth:`StagedModel.prepare`: text through the model's tokenizer, images through ViT preprocessing.

Models with a tokenizer in their directory (``minilm``, HF checkpoints) use it. Built-ins have random weights and no
vocabulary, so they use a byte tokenizer: each UTF-8 byte ``b`` becomes token ``b % vocab_size`` (deterministic,
enough to drive the model with real text). Images are resized to the model's size, scaled to [0, 1] and
normalised with the processor's mean/std (ViT: 0.5/0.5), as ``ViTImageProcessor`` does.
"""

from __future__ import annotations

from functools import lru_cache
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


#: transformers' "no limit recorded" value of ``model_max_length`` (``VERY_LARGE_INTEGER``) is above this.
_UNSET_MAX_LENGTH = 1 << 40


@lru_cache(maxsize=8)
def load_tokenizer(directory: str):
    """The tokenizer saved in a model directory (loaded once per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def max_length(tok, max_positions: int | None) -> int | None:
    """Longest input in tokens: the tokenizer's ``model_max_length``, or the model's position count when the
    tokenizer leaves it unset (transformers stores a 1e30 sentinel there, which overflows the Rust tokenizer)."""
    limit = getattr(tok, "model_max_length", None)
    if limit is None or limit >= _UNSET_MAX_LENGTH:
        return max_positions
    return int(limit) if max_positions is None else min(int(limit), max_positions)


def tokenize(
    options: dict[str, Any],
    text: str | Sequence[str],
    vocab_size: int,
    device: torch.device,
    max_len: int | None = None,
    *,
    max_positions: int | None = None,
    chat: bool = False,
) -> BoundaryState:
    """``input_ids``, ``attention_mask`` (0 on right padding) and ``position_ids`` for one or more texts.

    With ``chat`` and a tokenizer that has a chat template (instruct models), each text becomes one user turn
    followed by the assistant's generation prompt, as ``tokenizer.apply_chat_template`` writes it.
    """
    texts = _texts(text)
    tok_dir = options.get("tokenizer_dir")
    if tok_dir:
        tok = load_tokenizer(str(tok_dir))
        special = True
        if chat and getattr(tok, "chat_template", None):
            texts = [
                tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                for t in texts
            ]
            special = False  # the template already wrote the special tokens
        limit = max_len or max_length(tok, max_positions)
        enc = tok(
            texts,
            padding=True,
            truncation=limit is not None,
            max_length=limit,
            add_special_tokens=special,
            return_tensors="pt",
        )
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


def decode_tokens(options: dict[str, Any], tokens: torch.Tensor, eos: frozenset[int] = frozenset()) -> list[str]:
    """Token ids [B, N] -> one text per row, each cut at its first end-of-sequence token: the model's tokenizer
    (special tokens skipped) when it ships one, else the built-ins' byte tokenizer."""
    rows = []
    for row in tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    tok_dir = options.get("tokenizer_dir")
    if tok_dir:
        tok = load_tokenizer(str(tok_dir))
        return [tok.decode(r, skip_special_tokens=True) for r in rows]
    return [bytes(t % 256 for t in r).decode("utf-8", errors="replace") for r in rows]


def pixel_values(
    image: Any, size: int, mean: Sequence[float], std: Sequence[float], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
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


def sample_image_file() -> bytes:
    """The bundled sample photo-like image as its JPEG file (``aiflow_cli/assets/sample.jpg``)."""
    from importlib.resources import files

    return files("aiflow_cli.assets").joinpath("sample.jpg").read_bytes()


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
#: Boundary-state name of images shipped as their encoded files (JPEG/PNG bytes, uint8 [n]): the raw input of
#: image models, which stage 0 (``input.prepare``) decodes on whichever tier runs it.
IMAGE_FILE = "image_file"
#: Byte length of each file in ``image_file`` (int64 [B]) when the request holds more than one image.
IMAGE_FILE_SIZES = "image_file_sizes"


def image_file_state(image: Any) -> BoundaryState:
    """The raw input of an image model: one image (a path, bytes or a PIL image) as ``{image_file}``, a list of
    them as their files one after the other plus ``image_file_sizes`` (see :func:`image_file_tensor`)."""
    if not isinstance(image, (list, tuple)):
        return {IMAGE_FILE: image_file_tensor(image)}
    if not image:
        raise InputError("image must be an image or a non-empty list of them")
    files = [image_file_tensor(im) for im in image]
    return {IMAGE_FILE: torch.cat(files), IMAGE_FILE_SIZES: torch.tensor([len(f) for f in files], dtype=torch.int64)}


def images_of(state: BoundaryState) -> Any:
    """The RGB PIL image(s) in a raw image input (:func:`image_file_state`): one image, or a list when the state
    has ``image_file_sizes``."""
    data = state[IMAGE_FILE]
    sizes = state.get(IMAGE_FILE_SIZES)
    if sizes is None:
        return decode_image_file(data)
    if sizes.dtype != torch.int64 or sizes.dim() != 1 or int(sizes.sum()) != data.numel() or bool((sizes < 1).any()):
        raise InputError(f"{IMAGE_FILE_SIZES} must be positive int64 lengths summing to the {data.numel()} file bytes")
    return [decode_image_file(part) for part in torch.split(data, sizes.tolist())]


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
