"""Bad input: every image mode becomes RGB; every broken or hostile file is one typed error."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from htcvlm.defaults import DEFAULT_MAX_PIXELS
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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def handmade_png(width: int, height: int, rows: int, interlace: bool = False) -> bytes:
    """An 8-bit RGB PNG whose header claims width x height but whose data stream holds `rows` scanlines
    (each the filter byte 0 then mid-grey pixels); with `interlace`, the seven Adam7 passes, complete."""
    if interlace:
        passes = (
            (0, 0, 8, 8),
            (4, 0, 8, 8),
            (0, 4, 4, 8),
            (2, 0, 4, 4),
            (0, 2, 2, 4),
            (1, 0, 2, 2),
            (0, 1, 1, 2),
        )
        raw = b""
        for x0, y0, dx, dy in passes:
            columns, lines = -(-(width - x0) // dx), -(-(height - y0) // dy)
            if columns > 0 and lines > 0:
                raw += (b"\0" + b"\x80" * (3 * columns)) * lines
    else:
        raw = (b"\0" + b"\x80" * (3 * width)) * rows
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, int(interlace))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


def test_a_pixel_flood_png_is_refused_before_decoding():
    """180 bytes claiming 8000 x 8000 with 4 rows of data: Pillow would zero-fill 192 MB."""
    flood = handmade_png(8000, 8000, rows=4)
    assert len(flood) < 200
    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="truncated image: its pixel data ends after"):
        load_image(flood)
    assert time.perf_counter() - started < 1.0, "refused from the header and 4 rows, nothing decoded"


def test_png_with_missing_rows_is_refused_and_complete_ones_load():
    assert load_image(handmade_png(64, 48, rows=48)).getpixel((63, 47)) == (128, 128, 128)
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(handmade_png(64, 48, rows=47))


def test_interlaced_png_counts_every_pass():
    complete = handmade_png(37, 29, rows=0, interlace=True)
    assert load_image(complete).getpixel((36, 28)) == (128, 128, 128)
    idat = complete.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", complete[idat : idat + 4])
    stream = zlib.decompress(complete[idat + 8 : idat + 8 + length])
    short = zlib.compress(stream[:-10])
    cut = complete[:idat] + png_chunk(b"IDAT", short) + png_chunk(b"IEND", b"")
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(cut)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "1", "I;16"])
def test_every_truncation_of_a_real_png_is_refused(mode):
    from skimage import data as photos

    img = Image.fromarray(photos.astronaut()).resize((96, 64))
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    data = encode(img)
    assert load_image(data).size == (96, 64)
    iend = data.rindex(b"IEND") - 4
    for cut in [
        *range(40, iend - 4, max(1, (iend - 40) // 40)),
        *range(iend - 8, iend - 4),
    ]:  # in the data, not its CRC
        with pytest.raises(InvalidImageError):
            load_image(data[:cut])


def test_the_limit_quoted_is_the_projects_even_past_pillows_own():
    """A header of 20000 x 20000 is over Pillow's own bomb limit (178,956,970 pixels): Pillow refuses it
    while opening, and the message still quotes the project's limit."""
    huge = handmade_png(20_000, 20_000, rows=1)
    with pytest.raises(ImageTooLargeError, match=f"over the limit of {DEFAULT_MAX_PIXELS:,} pixels") as err:
        load_image(huge)
    assert "178956970" not in str(err.value)
    with pytest.raises(
        ImageTooLargeError, match="8001x8000 = 64,008,000 pixels, over the limit of 64,000,000"
    ):
        load_image(handmade_png(8001, 8000, rows=1))
