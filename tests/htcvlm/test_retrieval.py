"""Near-duplicate retrieval: the augmentations, the recall arithmetic and the real-photo set."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from htcvlm.retrieval import AUGMENTATIONS, near_duplicate_recall, pooled_recall, skimage_photos

from .helpers import make_model


def test_the_real_photo_set_is_the_distinct_photos_shipped_with_scikit_image():
    photos = skimage_photos()
    assert len(photos) == 25  # 26 files; the two chessboards are one picture
    assert len({p.tobytes() for p in photos}) == 25
    assert all(p.mode == "RGB" and min(p.size) >= 64 for p in photos)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_change_the_image_but_keep_it_rgb(name):
    img = Image.effect_noise((64, 48), 60).convert("RGB")
    out = AUGMENTATIONS[name](img, random.Random(0))
    assert out.mode == "RGB"
    assert out.tobytes() != img.tobytes()


def test_recall_is_perfect_when_copies_are_the_originals(tokenizer, monkeypatch):
    model = make_model(tokenizer, seed=0)
    images = [Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB") for i in range(6)]
    monkeypatch.setattr("htcvlm.retrieval.AUGMENTATIONS", {"identity": lambda img, rng: img})
    results = near_duplicate_recall(model, images)
    assert results["identity"]["recall@1"] == 1.0 and results["all"]["recall@10"] == 1.0


def test_pooled_recall_counts_any_image_of_the_same_source():
    """Sources 0 and 1 lie apart; each copy's nearest other image is its source's other copy or original."""
    base = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    near = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), dim=-1)
    swapped = near.flip(0)  # each copy now lies beside the other source
    assert pooled_recall(base, [near, near])["recall@1"] == 1.0
    result = pooled_recall(base, [swapped])
    assert result["recall@1"] == 0.0 and result["cos_max"] == pytest.approx(0.0, abs=1e-6)
