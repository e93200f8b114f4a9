"""Bad input: every image mode becomes RGB; every broken or hostile file is one typed error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from htcvlm.errors import ImageTooLargeError, InvalidImageError
from htcvlm.images import load_image, pixels_from_bytes, to_pixels


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_become_rgb(mode):
    img = Image.new("RGB", (20, 10), (200, 40, 10)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "LA" else "PNG"
    out = load_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(encode(img)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = load_image(encode(img))
    assert out.mode == "RGB"
    assert abs(out.getpixel((0, 0))[0] - 128) <= 1, "mid-grey 16-bit must stay mid-grey"


def test_truncated_image():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_corrupt_bytes_inside_a_png():
    data = bytearray(encode(Image.effect_noise((32, 32), 50).convert("RGB")))
    data[60:90] = b"\x00" * 30
    with pytest.raises(InvalidImageError):
        load_image(bytes(data))


@pytest.mark.parametrize("data", [b"hello, this is text", b"%PDF-1.7\n", b"\x00" * 100])
def test_non_image_bytes(data):
    with pytest.raises(InvalidImageError, match="not an image"):
        load_image(data)


def test_empty_bytes():
    with pytest.raises(InvalidImageError, match="0 bytes"):
        load_image(b"")


def test_zero_size_image():
    # A GIF header can declare a 0 x 0 screen; PIL reads it before any pixel data.
    gif = b"GIF89a\x00\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00;"
    with pytest.raises(InvalidImageError):
        load_image(gif)


def test_decompression_bomb_is_rejected_before_decoding():
    big = encode(Image.new("L", (3000, 3000)))  # 9 Mpx of zeros compresses to a few KB
    assert len(big) < 100_000
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(big, max_pixels=1_000_000)
    assert load_image(big, max_pixels=10_000_000).size == (3000, 3000)


def test_pixels_are_square_and_keep_the_whole_image():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    px = to_pixels(img, 32)
    assert px.shape == (3, 32, 32) and px.min() >= 0 and px.max() <= 1
    assert px[0, 16, 16] > 0.95, "centre is the red image"
    assert abs(px[0, 0, 16] - 127 / 255) < 0.02, "top rows are grey padding, not a crop"
    assert pixels_from_bytes(encode(img), 32).shape == (3, 32, 32)
