"""Near-duplicate retrieval: the augmentations, the recall arithmetic and the real-photo set."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from htcvlm.retrieval import AUGMENTATIONS, near_duplicate_recall, skimage_photos

from .helpers import make_model


def test_the_real_photo_set_is_the_26_shipped_with_scikit_image():
    photos = skimage_photos()
    assert len(photos) == 26
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
