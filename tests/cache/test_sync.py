"""The store -> index path: one failure policy for every reader of stored latents, on both backends."""

from __future__ import annotations

import dataclasses

import pytest

from cache.index import IndexConfig, LatentIndex
from cache.records import key_of, put_records
from cache.serde import serialize
from cache.sync import build_from_store, catch_up, stored_latents

from .helpers import make_record


def fill(store, n: int, damaged: int | None = None, foreign: int | None = None):
    records = [make_record(seed=i) for i in range(n)]
    put_records(store, records)
    if damaged is not None:  # a flipped header length: read_metadata refuses it
        blob = store.get(key_of(records[damaged]))
        store.put(key_of(records[damaged]), b"\xff" * 8 + blob[8:])
    if foreign is not None:  # another model's blob under this model's key (a mixed-up deployment)
        other = dataclasses.replace(records[foreign], fingerprint="other-model")
        store.put(key_of(records[foreign]), serialize(other))
    return records


def test_one_damaged_record_does_not_stop_the_others_being_indexed(store):
    """The worker's refresh used to raise on the first bad record and index nothing, every round."""
    records = fill(store, 6, damaged=2, foreign=4)
    dim = records[0].latent.numel()
    index = LatentIndex(records[0].fingerprint, IndexConfig(dim=dim))
    assert catch_up(index, store) == 4
    assert sorted(index.image_ids()) == sorted(r.image_id for i, r in enumerate(records) if i not in (2, 4))
    assert catch_up(index, store) == 0  # nothing new


def test_every_reader_shares_the_policy(store):
    records = fill(store, 5, damaged=0)
    ids = [r.image_id for r in records] + ["f" * 64]  # and one never stored
    got = {
        i: x
        for batch_ids, xs in stored_latents(store, records[0].fingerprint, ids, batch=2)
        for i, x in zip(batch_ids, xs, strict=True)
    }
    assert sorted(got) == sorted(r.image_id for r in records[1:])
    for r in records[1:]:
        assert got[r.image_id] == pytest.approx(r.latent.float().numpy())
    built = build_from_store(store, records[0].fingerprint, IndexConfig(dim=records[0].latent.numel()))
    assert sorted(built.image_ids()) == sorted(got)
