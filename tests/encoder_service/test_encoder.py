"""Encoder: image bytes -> stored records, exactly what `model.compress` makes, with no model work for
images already stored and a failed outcome (not an exception) for bad bytes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.factory import StoreConfig, open_store
from cache.keys import RecordKey
from cache.records import get_records
from encoder_service.encoder import Encoder
from htcvlm.checkpoint import load_pretrained
from htcvlm.record import image_id_of
from tests.cache.helpers import purge_prefix
from tests.encoder_service.helpers import encoder_config, png, truncated_png


@pytest.fixture
def encoder(model_dir: Path, tmp_path: Path) -> Iterator[Encoder]:
    enc = Encoder(encoder_config(model_dir, max_pixels=60 * 60), StoreConfig(str(tmp_path / "store")))
    yield enc
    enc.close()


def test_records_equal_model_compress_after_the_store_round_trip(encoder: Encoder, model_dir: Path) -> None:
    images = [png(seed) for seed in range(3)]
    uris = [f"file:///corpus/{n}.png" for n in range(3)]
    outcomes = encoder.encode(images, uris)
    assert [o.status for o in outcomes] == ["encoded"] * 3
    assert [o.image_id for o in outcomes] == [image_id_of(b) for b in images]

    expected = load_pretrained(model_dir).compress(images, uris)
    keys = [RecordKey(encoder.fingerprint, o.image_id) for o in outcomes]
    stored = get_records(encoder.store, keys)
    for want, got, outcome in zip(expected, stored, outcomes, strict=True):
        assert got is not None
        assert torch.equal(got.latent, want.latent)
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert got.voco_position == want.voco_position and got.source_uri == want.source_uri
        assert outcome.latent is not None and outcome.latent.shape == (encoder.latent_dim,)
        np.testing.assert_array_equal(outcome.latent, want.latent.numpy())


def test_cached_image_costs_no_model_work(encoder: Encoder) -> None:
    first = encoder.encode([png(0), png(1)])
    assert encoder.images_compressed == 2
    again = encoder.encode([png(1), png(2), png(0)])
    assert [o.status for o in again] == ["cached", "encoded", "cached"]
    assert encoder.images_compressed == 3  # only the new image went through the model
    for before, after in ((first[1], again[0]), (first[0], again[2])):
        assert before.latent is not None and after.latent is not None
        np.testing.assert_array_equal(after.latent, before.latent)


def test_bad_bytes_fail_alone_and_duplicates_compress_once(encoder: Encoder) -> None:
    images = [png(5), b"not an image at all", truncated_png(6), png(5), b"", png(7, size=64), png(8)]
    outcomes = encoder.encode(images)
    assert [o.status for o in outcomes] == [
        "encoded", "failed", "failed", "encoded", "failed", "failed", "encoded"
    ]  # fmt: skip
    assert "not an image" in outcomes[1].error and outcomes[1].latent is None
    assert "truncated" in outcomes[2].error
    assert "empty image" in outcomes[4].error
    assert outcomes[5].too_large and "over the limit of 3,600" in outcomes[5].error
    assert not any(o.too_large for n, o in enumerate(outcomes) if n != 5)
    assert outcomes[0].image_id == outcomes[3].image_id
    assert encoder.images_compressed == 2  # png(5) once, png(8) once
    assert encoder.store.count(encoder.fingerprint) == 2


def test_ray_data_stage_passes_unread_rows_through(encoder: Encoder) -> None:
    batch = {
        "path": np.array(["/a.png", "/gone.png", "/b.txt"], dtype=object),
        "data": np.array([png(1), b"", b"hello"], dtype=object),
        "error": np.array(["", "unreadable: No such file or directory", ""], dtype=object),
    }
    out = encoder(batch)
    assert list(out["status"]) == ["encoded", "failed", "failed"]
    assert out["reason"][1] == "unreadable: No such file or directory" and out["image_id"][1] == ""
    assert "not an image" in out["reason"][2]
    assert out["latent"].shape == (3, encoder.latent_dim) and out["latent"].dtype == np.float32
    assert not out["latent"][1].any() and out["latent"][0].any()
    assert set(out["fingerprint"]) == {encoder.fingerprint}


def test_encoder_over_redis(model_dir: Path, redis_url: str) -> None:
    """The same contract over the shared Redis, under a key prefix of its own, removed afterwards."""
    prefix = f"onetoken-test-enc-{uuid.uuid4().hex[:12]}"
    store = StoreConfig(redis_url, key_prefix=prefix)
    encoder = Encoder(encoder_config(model_dir), store)
    try:
        assert [o.status for o in encoder.encode([png(11), b"junk", png(12)])] == [
            "encoded", "failed", "encoded"
        ]  # fmt: skip
        assert [o.status for o in encoder.encode([png(12), png(11)])] == ["cached", "cached"]
        assert encoder.images_compressed == 2
        with open_store(store) as opened:
            stored = sorted(opened.iter_ids(encoder.fingerprint))
        assert stored == sorted(image_id_of(png(s)) for s in (11, 12))
    finally:
        encoder.close()
        purge_prefix(redis_url, prefix)
