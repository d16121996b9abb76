"""Images uploaded as their encoded file (what a device that computes nothing sends), and how untrusted image
bytes are refused."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from aiflow_cli.errors import InputError
from aiflow_cli.models import load_model
from aiflow_cli.models.inputs import MAX_IMAGE_PIXELS, decode_image_file, image_file_tensor
from aiflow_cli.runtime.demo import SAMPLE_IMAGE


def test_a_path_ships_the_file_bytes_as_they_are():
    t = image_file_tensor(SAMPLE_IMAGE)
    assert t.dtype == torch.uint8 and t.dim() == 1
    assert bytes(t.numpy()) == SAMPLE_IMAGE.read_bytes()


def test_the_upper_tier_preprocesses_to_the_same_pixels_as_the_device():
    m = load_model("builtin:captioner-tiny")
    local = m.prepare(image=Image.open(SAMPLE_IMAGE).convert("RGB"))
    remote = m.prepare(image=decode_image_file(image_file_tensor(SAMPLE_IMAGE)))
    assert torch.equal(local["pixel_values"], remote["pixel_values"])
    pil = Image.open(SAMPLE_IMAGE).convert("RGB")
    via_png = m.prepare(image=decode_image_file(image_file_tensor(pil)))  # in-memory images go lossless
    assert torch.equal(local["pixel_values"], via_png["pixel_values"])


def _png_claiming(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"definitely not an image", "not a readable image"),
        (b"", "not a readable image"),
        (_png_claiming(8_000, 8_000), "above the limit"),
        (_png_claiming(100_000, 100_000), "decompression bomb"),
    ],
)
def test_untrusted_image_bytes_are_refused_before_decoding(payload, match):
    with pytest.raises(InputError, match=match):
        decode_image_file(
            torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
        )
    assert 8_000 * 8_000 > MAX_IMAGE_PIXELS


def test_wrong_tensor_kinds_are_refused():
    with pytest.raises(InputError, match="1-d uint8"):
        decode_image_file(torch.zeros(2, 3))
    with pytest.raises(InputError, match="cannot read image"):
        image_file_tensor("/no/such/file.jpg")


def test_stage_0_prepares_the_raw_input_as_the_device_would():
    """input.prepare on the raw input (a file, or several) gives the pixels that prepare() gives the decoded
    images, and the whole model from the raw input equals the model from prepared pixels."""
    m = load_model("builtin:captioner-tiny")
    pil = Image.open(SAMPLE_IMAGE).convert("RGB")
    raw = m.raw_input(image=SAMPLE_IMAGE)
    assert list(raw) == ["image_file"] and m.stages[0].name == "input.prepare"
    prepared = m.prepare(image=pil)
    assert torch.equal(m.run_stage(0, raw)["pixel_values"], prepared["pixel_values"])
    assert torch.equal(m.generate(raw, 3), m.generate(prepared, 3))
    two = m.raw_input(image=[SAMPLE_IMAGE, pil])  # a JPEG file and an in-memory image (sent as PNG)
    assert int(two["image_file_sizes"].sum()) == two["image_file"].numel()
    assert torch.equal(m.run_stage(0, two)["pixel_values"], m.prepare(image=[pil, pil])["pixel_values"])
    bad = dict(two, image_file_sizes=two["image_file_sizes"] + 1)
    with pytest.raises(InputError, match="image_file_sizes"):
        m.run_stage(0, bad)
    with pytest.raises(InputError, match="text or an image"):
        m.raw_input(text="a caption?", image=SAMPLE_IMAGE)
