"""The voco latent as a search key: InfoNCE over the latents of two augmented views of each image.

`Search` ranks images by the cosine of their latents (the voco tokens' final hidden state, which no
answer ever reads: text reads the voco tokens' keys and values, made from each layer's input). The
answer loss never shapes that latent for search; this loss does. Each of a step's images is seen twice,
each view a random chain of the augmentations users' near-duplicates carry (`htcvlm.retrieval`: crop,
resize, color jitter, JPEG re-encoding, each with probability 1/2, at least one), then turned gray with
probability `GRAY` (training only: no search copy is grayed, but a quarter of the real photos users
search are gray, and the procedural scenes are all colored; a gray view must be told from other images by
its shapes and layout, not its colors); a view's latent must find its twin among the other views of the
step (symmetric InfoNCE, temperature `TEMPERATURE`).

The frozen tower and MGVQ see each view afresh (no cached features: the views are new every step).
Training images come from the training pool only; scikit-image's photos stay the held-out real set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from htcvlm.images import ImageProcessing, to_pixels
from htcvlm.model import HTCVLM
from htcvlm.pool import VQATensors
from htcvlm.retrieval import AUGMENTATIONS
from htcvlm.train.multi import voco_states

TEMPERATURE = 0.1
GRAY = 0.2  # the chance a training view loses its colors (SimCLR's random grayscale)


def augmented_view(
    pixels_u8: torch.Tensor, size: int, processing: ImageProcessing, rng: random.Random
) -> torch.Tensor:
    """(3, S, S) uint8 -> (3, size, size) float in [0, 1]: a random chain of the retrieval augmentations,
    grayed with probability `GRAY`, preprocessed as compress() preprocesses an image file."""
    image = Image.fromarray(pixels_u8.permute(1, 2, 0).numpy())
    names = [name for name in AUGMENTATIONS if rng.random() < 0.5] or [rng.choice(list(AUGMENTATIONS))]
    for name in names:  # in AUGMENTATIONS' order: crop, resize, color jitter, JPEG last
        image = AUGMENTATIONS[name](image, rng)
    if rng.random() < GRAY:
        image = image.convert("L").convert("RGB")
    return to_pixels(image, size, processing)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `a` (N, d) must pick row i of `b` among all of b's rows, and back."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def view_pairs(model: HTCVLM, pixels_u8: Sequence[torch.Tensor], rng: random.Random) -> torch.Tensor:
    """(2N, 3, S, S) on the model's device: two augmented views of each (3, S, S) uint8 image, image i's
    at rows 2i and 2i + 1, drawn from `rng` in that order."""
    size, processing = model.config.image_size, model.config.preprocess
    views = [augmented_view(p, size, processing, rng) for p in pixels_u8 for _ in range(2)]
    return torch.stack(views).to(model.device)


def view_latents(model: HTCVLM, views: torch.Tensor, freeze_vision: bool = True) -> torch.Tensor:
    """The voco latents (N, d) of `views`: the frozen encoders without gradients; P_d, P_v, the voco
    token and the LLM with them (the vision tower too, unless `freeze_vision`; the MGVQ never)."""
    with torch.no_grad():
        patches = model.vision_patches(views) if model.has_vision and freeze_vision else None
        quantized = model.mgvq.encode(views).quantized if model.has_mgvq else None
    *_, latents = voco_states(model, views, quantized, patches)
    return latents


def contrastive_loss(
    model: HTCVLM, pool: VQATensors, n_images: int, rng: random.Random, freeze_vision: bool = True
) -> torch.Tensor:
    """InfoNCE over two views of `n_images` distinct pool images drawn by `rng`."""
    picks = rng.sample(range(len(pool)), n_images)
    latents = view_latents(model, view_pairs(model, [pool.pixels[i] for i in picks], rng), freeze_vision)
    return info_nce(latents[0::2], latents[1::2])
