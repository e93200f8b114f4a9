"""LLaVA-1.5's image preprocessing equals transformers' CLIPImageProcessor bit for bit on real photos:
image file bytes -> our pixels in [0, 1] -> the model's normalization for its vision tower."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil

from htcvlm.config import CLIP_MEAN, HTCConfig, ImageProcessing, LLMConfig, VisionConfig
from htcvlm.images import pixels_from_bytes
from htcvlm.model import HTCVLM
from htcvlm.tokenizer import train_tokenizer

SIZE = 336
# LLaVA's pad colour: tuple(int(x * 255) for x in image_processor.image_mean)
LLAVA = ImageProcessing(pad_colour=(122, 116, 104), resize="shortest_edge")
PHOTOS = {
    "astronaut": skimage.data.astronaut,  # 512 x 512
    "chelsea": skimage.data.chelsea,  # 451 x 300, landscape
    "coffee": skimage.data.coffee,  # 600 x 400
    "camera": skimage.data.camera,  # grayscale
    "portrait": lambda: skimage.data.rocket()[:, 100:400],  # 300 x 427, taller than wide
    "small": lambda: skimage.data.chelsea()[::3, ::3],  # 151 x 100: upscaled, not downscaled
}


@pytest.fixture(scope="module")
def model() -> HTCVLM:
    """Any model with a vision tower at 336 px: only its input normalization is used."""
    config = HTCConfig(
        image_size=SIZE,
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2),
        llm=LLMConfig(
            hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2, vocab_size=259
        ),
        channels="continuous",
        projector="mlp2x_gelu",
    )
    return HTCVLM(config, train_tokenizer([], vocab_size=259))


def photo_bytes(name: str) -> tuple[Image.Image, bytes]:
    img = Image.fromarray(PHOTOS[name]())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, buf.getvalue()


def ours(model: HTCVLM, data: bytes, processing: ImageProcessing) -> torch.Tensor:
    pixels = pixels_from_bytes(data, SIZE, processing=processing)
    return model.vision_input(pixels[None])[0]


def expand2square(img: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """LLaVA's own padding (llava/mm_utils.py), written out here as the reference."""
    width, height = img.size
    side = max(width, height)
    square = Image.new(img.mode, (side, side), colour)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def clip_processor() -> CLIPImageProcessorPil:
    # openai/clip-vit-large-patch14-336's preprocessor_config.json
    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_llava_padding_then_clip_processor(model, name):
    img, data = photo_bytes(name)
    colour = tuple(int(x * 255) for x in CLIP_MEAN)
    assert colour == LLAVA.pad_colour
    reference = clip_processor()(expand2square(img.convert("RGB"), colour), return_tensors="pt")
    got = ours(model, data, LLAVA)
    assert got.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(got, reference.pixel_values[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_transformers_llava_processor_with_padding(model, name):
    img, data = photo_bytes(name)
    processor = LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    reference = processor(img, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(ours(model, data, LLAVA), reference, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["chelsea", "portrait", "small"])
def test_clip_processor_without_padding(model, name):
    """Not square and not padded: the shortest edge resized and the centre cropped, as CLIP does."""
    img, data = photo_bytes(name)
    reference = clip_processor()(img, return_tensors="pt").pixel_values[0]
    crop_only = ImageProcessing(pad_to_square=False, resize="shortest_edge")
    torch.testing.assert_close(ours(model, data, crop_only), reference, rtol=0, atol=0)


def test_padding_colour_and_placement():
    """A wide image lands in the middle rows of the square; the rows above and below are the colour."""
    img = Image.fromarray(np.full((100, 300, 3), 255, dtype=np.uint8))  # 300 wide, 100 high
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    pixels = pixels_from_bytes(buf.getvalue(), 30, processing=LLAVA)
    expected = torch.tensor(LLAVA.pad_colour, dtype=torch.float32) / 255
    torch.testing.assert_close(pixels[:, 0, 15], expected)
    torch.testing.assert_close(pixels[:, -1, 15], expected)
    torch.testing.assert_close(pixels[:, 15, 15], torch.ones(3))


def test_config_round_trip_and_old_json():
    """A LLaVA config keeps its preprocessing through JSON; a config without the new fields (every model
    saved before them) loads with the old behaviour and writes the same JSON as before."""
    config = HTCConfig(
        preprocess=LLAVA,
        vision=VisionConfig(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]),
    )
    assert HTCConfig.from_dict(json.loads(config.to_json())) == config
    plain = HTCConfig.from_name("tiny")
    data = json.loads(plain.to_json())
    assert "preprocess" not in data and "image_mean" not in data["vision"]
    assert HTCConfig.from_dict(data) == plain
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageProcessing(resize="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_colour"):
        ImageProcessing(pad_colour=(0, 0, 256))
