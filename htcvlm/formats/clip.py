"""CLIP vision towers as LLaVA uses them: a transformers CLIP config and its image preprocessing.

LLaVA-1.5's tower is `openai/clip-vit-large-patch14-336`: a `CLIPModel` folder (config.json with a
vision_config, weights with `vision_model.*` beside the text half LLaVA never uses, and a
preprocessor_config.json for CLIPImageProcessor). llava-hf carries the same tower inside its own weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPVisionConfig

from htcvlm.config import CLIP_MEAN, CLIP_STD, VisionConfig
from htcvlm.errors import CheckpointError
from htcvlm.formats.hf_config import parse_config, read_config_json
from htcvlm.formats.weights import load_weights, rename_keys

PREPROCESSOR_FILE = "preprocessor_config.json"
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json spells it
# The vision tower's own parts: CLIPVisionModel's keys, which its module `vision` in HTCVLM holds.
TOWER_PARTS = r"(embeddings\..+|pre_layrnorm\..+|encoder\..+|post_layernorm\..+)"


def vision_config(clip: CLIPVisionConfig, select_layer: int, source: str) -> tuple[VisionConfig, int]:
    """Our VisionConfig and the image size from a transformers CLIP vision config. What our tower does
    not build (another activation, layer norm epsilon or channel count) is a `CheckpointError`."""
    built = CLIPVisionConfig()  # what components.build_vision leaves at transformers' defaults
    differ = {
        name: (getattr(clip, name), getattr(built, name))
        for name in ("hidden_act", "layer_norm_eps", "num_channels")
        if getattr(clip, name) != getattr(built, name)
    }
    if differ:
        detail = ", ".join(f"{k} is {got!r}, supported {want!r}" for k, (got, want) in differ.items())
        raise CheckpointError(f"{source}: unsupported CLIP vision tower: {detail}")
    layers = clip.num_hidden_layers
    if not -(layers + 1) <= select_layer <= layers:  # hidden states: the embeddings, then each layer
        raise CheckpointError(f"{source}: no hidden state {select_layer} in a {layers}-layer tower")
    config = VisionConfig(
        hidden_size=clip.hidden_size,
        intermediate_size=clip.intermediate_size,
        num_layers=clip.num_hidden_layers,
        num_heads=clip.num_attention_heads,
        patch_size=clip.patch_size,
        select_layer=select_layer,
    )
    return config, clip.image_size


def read_clip_folder(folder: Path) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """A local CLIP folder (a CLIPModel's or a CLIPVisionModel's) -> its vision config and the tower's
    weights under our keys (`vision.*`). The text half, the projections and `logit_scale` are dropped."""
    raw = read_config_json(folder)
    kind = raw.get("model_type")
    if kind == "clip":
        clip = parse_config(CLIPConfig, raw, str(folder)).vision_config
    elif kind == "clip_vision_model":
        clip = parse_config(CLIPVisionConfig, raw, str(folder))
    else:
        raise CheckpointError(f"{folder}/config.json is a {kind!r} model, not CLIP (clip, clip_vision_model)")
    state = rename_keys(
        load_weights(folder),
        renames=[(rf"(?:vision_model\.)?{TOWER_PARTS}", r"vision.\1")],
        drops=[
            r"text_model\..+",
            r"(text|visual)_projection\.weight",
            r"logit_scale",
            r"(vision_model\.)?embeddings\.position_ids",  # a buffer older checkpoints saved
        ],
        source=str(folder),
    )
    return clip, state


def clip_preprocessing(folder: Path, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalization mean and std of the CLIPImageProcessor in `folder` (CLIP's when it has no
    preprocessor_config.json), after checking it does what OneToken's preprocessing does: resize the
    shortest edge to the tower's image size (bicubic), crop the centre, rescale by 1/255, normalize."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    raw: dict[str, Any] = json.loads(path.read_text())
    wrong = []
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if raw.get(flag, True) is not True:
            wrong.append(f"{flag} is {raw[flag]!r}")
    if raw.get("resample", BICUBIC) != BICUBIC:
        wrong.append(f"resample is {raw['resample']!r}, not bicubic ({BICUBIC})")
    if not math.isclose(raw.get("rescale_factor", 1 / 255), 1 / 255):
        wrong.append(f"rescale_factor is {raw['rescale_factor']!r}")
    size = raw.get("size", image_size)
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    if shortest != image_size:
        wrong.append(f"size is {size!r}, not shortest_edge {image_size}")
    crop = raw.get("crop_size", image_size)
    if (crop if isinstance(crop, int) else (crop.get("height"), crop.get("width"))) not in (
        image_size,
        (image_size, image_size),
    ):
        wrong.append(f"crop_size is {crop!r}, not {image_size}")
    if wrong:
        raise CheckpointError(f"{path}: unsupported image preprocessing: {'; '.join(wrong)}")
    return tuple(raw.get("image_mean", CLIP_MEAN)), tuple(raw.get("image_std", CLIP_STD))
