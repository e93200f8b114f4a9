"""Image bytes -> validated RGB -> pixel tensors. Every failure is one typed `InvalidImageError`."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from htcvlm.errors import ImageTooLargeError, InvalidImageError

logger = logging.getLogger(__name__)

# 64 megapixels: far above any camera photo a VLM needs, far below what exhausts a worker's memory.
DEFAULT_MAX_PIXELS = 64_000_000


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
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                    "downscale it before sending"
                )
            img.load()  # decodes fully: truncated or corrupt data fails here, not later in the model
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError("not an image: the bytes match no known image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's ways of saying "corrupt"
        raise InvalidImageError(f"corrupt or truncated image: {exc}") from exc
    return to_rgb(img)


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


def to_pixels(img: Image.Image, image_size: int) -> torch.Tensor:
    """RGB image -> (3, S, S) float32 in [0, 1]: padded to a square (nothing cropped away), then resized."""
    width, height = img.size
    side = max(width, height)
    if width != height:
        # LLaVA's expand2square: pad with grey so the whole image stays visible.
        square = Image.new("RGB", (side, side), (127, 127, 127))
        square.paste(img, ((side - width) // 2, (side - height) // 2))
        img = square
    if side != image_size:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (S, S, 3) -> (3, S, S)


def pixels_from_bytes(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    return to_pixels(load_image(data, max_pixels), image_size)
