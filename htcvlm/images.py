"""Image bytes -> validated RGB -> pixel tensors. Every failure is one typed `InvalidImageError`."""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from htcvlm.config import ImageProcessing
from htcvlm.defaults import DEFAULT_MAX_PIXELS
from htcvlm.errors import ImageTooLargeError, InvalidImageError

logger = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_DEFAULT_PROCESSING = ImageProcessing()  # the tiny model's: grey padding to a square, resized
# Adam7 interlacing: (first column, first row, column step, row step) of each of the seven passes
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image file bytes into an RGB image, or raise `InvalidImageError` saying why."""
    if not data:
        raise InvalidImageError("empty image: 0 bytes received")
    try:
        with warnings.catch_warnings():
            # PIL warns (then errors) on huge images by its own global limit; ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # read from the header: nothing decoded yet
            if width == 0 or height == 0:
                raise InvalidImageError(f"zero-size image ({width}x{height})")
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,}; downscale it before sending"
                )
            if img.format == "PNG" and (missing := png_data_missing(data)):
                # Pillow zero-fills the rows a PNG's data stream ends without: refuse before allocating
                raise InvalidImageError(f"truncated image: {missing}")
            img.load()  # decodes fully: truncated or corrupt data fails here, not later in the model
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own ceiling, far above ours
        raise ImageTooLargeError(
            f"image is over the limit of {max_pixels:,} pixels; downscale it before sending"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError("not an image: the bytes match no known image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's ways of saying "corrupt"
        raise InvalidImageError(f"corrupt or truncated image: {exc}") from exc
    return to_rgb(img)


def png_data_missing(data: bytes) -> str | None:
    """Why a PNG's image data is incomplete, or None when its IDAT stream inflates to every row and ends.

    Pillow treats a zlib stream that ends early as the end of the image and zero-fills the rows it never
    got, so a 180-byte file whose header claims 8000 x 8000 would decode as 192 MB of zeros. Inflating
    the stream (in bounded pieces, nothing kept) to count its bytes is cheap next to decoding it. Chunks
    after the image data (IEND included) may be missing: every pixel is there.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, need, got = len(_PNG_SIGNATURE), 0, 0
    inflate = zlib.decompressobj()
    while pos + 8 <= len(data) and got <= need and not inflate.eof:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length  # length, type, body, CRC
        if kind == b"IHDR" and len(body) >= 13:
            need = _png_raw_bytes(*struct.unpack(">IIBBBBB", body[:13]))
        elif kind == b"IDAT":
            try:
                # past `need` the rest is surplus Pillow ignores: stop rather than inflate a bomb's tail
                while body and got <= need and not inflate.eof:
                    got += len(inflate.decompress(body, 1 << 20))  # at most 1 MiB held at a time
                    body = inflate.unconsumed_tail
            except zlib.error:
                return None  # corrupt, not short: Pillow's decoder reports it
        elif kind == b"IEND":
            break
    if got < need:
        return f"its pixel data ends after {got:,} of {need:,} bytes"
    if got == need and not inflate.eof:
        return "its compressed pixel data is cut before its end"
    return None


def _png_raw_bytes(
    width: int, height: int, depth: int, colour: int, _compression: int, _filter: int, interlace: int
) -> int:
    """Bytes of filtered scanlines a PNG of this header inflates to (a filter byte starts each row)."""
    bits = _PNG_CHANNELS.get(colour, 4) * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)  # ceil; <= 0 for an empty pass
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, palettes expanded, 16/32-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max())
        # 16-bit modes span 0..65535; 32-bit int and float images carry their own range.
        if img.mode.startswith("I;16"):
            top = 65535.0
        else:
            top = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else peak
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def pad_to_square(img: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: the image centred on a square of `colour`, nothing cropped away."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new("RGB", (side, side), colour)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor's resize: the shortest edge to `size` (bicubic), the other edge truncated to
    keep the aspect ratio, as transformers' get_resize_output_image_size computes it."""
    width, height = img.size
    short, long = sorted((width, height))
    other = int(size * long / short)
    target = (size, other) if width <= height else (other, size)  # PIL sizes are (width, height)
    return img if img.size == target else img.resize(target, Image.Resampling.BICUBIC)


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """The centre size x size of an image at least that large, offsets rounded down as transformers does."""
    width, height = img.size
    if width < size or height < size:
        raise ValueError(f"cannot crop {size} x {size} from a {width} x {height} image")
    left, top = (width - size) // 2, (height - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_pixels(
    img: Image.Image, image_size: int, processing: ImageProcessing = _DEFAULT_PROCESSING
) -> torch.Tensor:
    """RGB image -> (3, S, S) float32 in [0, 1], as the checkpoint's `processing` says (padded to a square
    and resized by default)."""
    if processing.pad_to_square:
        img = pad_to_square(img, processing.pad_colour)
    if processing.resize == "shortest_edge":
        img = centre_crop(resize_shortest_edge(img, image_size), image_size)
    elif img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    # x / 255 in float32 is bit for bit CLIPImageProcessor's rescale (float64 x * (1 / 255), then float32)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (S, S, 3) -> (3, S, S)


def pixels_from_bytes(
    data: bytes,
    image_size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    processing: ImageProcessing = _DEFAULT_PROCESSING,
) -> torch.Tensor:
    return to_pixels(load_image(data, max_pixels), image_size, processing)
