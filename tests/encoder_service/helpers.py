"""Images and configs shared by the encoder-service tests."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from encoder_service.config import EncoderConfig


def png(seed: int, size: int = 48) -> bytes:
    """A random RGB PNG: every seed gives different bytes, hence a different image id."""
    gen = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def truncated_png(seed: int) -> bytes:
    """A PNG cut in half: the header parses, decoding fails."""
    data = png(seed)
    return data[: len(data) // 2]


def encoder_config(model_dir: Path, **changes: object) -> EncoderConfig:
    """A config for the small test model with lossless K/V, so stored records compare exactly."""
    base: dict[str, object] = {"model_dir": str(model_dir), "kv_dtype": "fp32"}
    return EncoderConfig(**{**base, **changes})  # type: ignore[arg-type]
