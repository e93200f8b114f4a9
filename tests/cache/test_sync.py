"""The store -> index path: one failure policy for every reader of stored latents, and indexes that follow
the change feed instead of scanning the store, on both backends."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.feed import FeedTrimmedError
from cache.index import IndexConfig, LatentIndex
from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.records import key_of, put_records
from cache.serde import serialize
from cache.store import RecordStore
from cache.sync import build_from_store, follow, follow_or_rebuild, load_or_rebuild, stored_latents

from .helpers import FINGERPRINT, make_record


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


class Scans(RecordStore):
    """A real store that counts full listings (`iter_ids`): following the feed must not make any."""

    def __init__(self, inner: RecordStore) -> None:
        self.inner, self.listings = inner, 0

    def iter_ids(self, fingerprint: str) -> Iterator[str]:
        self.listings += 1
        return self.inner.iter_ids(fingerprint)

    def put(self, key, blob):
        return self.inner.put(key, blob)

    def get(self, key):
        return self.inner.get(key)

    def contains(self, key):
        return self.inner.contains(key)

    def delete(self, key):
        return self.inner.delete(key)

    def put_many(self, items):
        return self.inner.put_many(items)

    def get_many(self, keys):
        return self.inner.get_many(keys)

    def feed_position(self, fingerprint):
        return self.inner.feed_position(fingerprint)

    def read_feed(self, fingerprint, after, limit=1024):
        return self.inner.read_feed(fingerprint, after, limit)

    def close(self):
        self.inner.close()


def new_index(store: RecordStore, dim: int = 64) -> LatentIndex:
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=dim))
    index.feed = store.feed_position(FINGERPRINT)
    return index


def test_one_damaged_record_does_not_stop_the_others_being_indexed(store):
    """The worker's refresh used to raise on the first bad record and index nothing, every round."""
    index = new_index(store)
    records = fill(store, 6, damaged=2, foreign=4)
    followed = follow(index, store, batch=4)
    assert followed.added == 4 and followed.changes == 8  # 6 puts + the two overwrites
    assert sorted(index.image_ids()) == sorted(r.image_id for i, r in enumerate(records) if i not in (2, 4))
    assert follow(index, store).changes == 0  # nothing new


def test_an_index_follows_puts_and_deletes_without_listing_the_store(store):
    scans = Scans(store)
    index = new_index(scans)
    records = fill(store, 5)
    assert follow(index, scans).added == 5
    store.delete(key_of(records[1]))
    store.delete(key_of(records[3]))
    put_records(store, [records[3], make_record(seed=9)])  # 3 comes back at once; 9 is new
    followed = follow(index, scans)
    assert (followed.added, followed.removed, followed.changes) == (1, 1, 4)
    expected = {r.image_id for r in records} - {records[1].image_id} | {make_record(seed=9).image_id}
    assert set(index.image_ids()) == expected
    assert scans.listings == 0


def test_a_put_whose_record_is_gone_by_the_time_it_is_read_is_passed_over(store):
    index = new_index(store)
    records = fill(store, 2)
    store.delete(key_of(records[0]))
    assert follow(index, store).added == 1 and index.image_ids() == [records[1].image_id]


def test_an_index_behind_a_trimmed_feed_is_rebuilt(tmp_path: Path):
    store = LmdbStore(LmdbConfig(path=str(tmp_path / "lmdb"), feed_length=3))
    try:
        index = new_index(store)
        records = fill(store, 6)
        with pytest.raises(FeedTrimmedError):
            follow(index, store)
        rebuilt, was_rebuilt = follow_or_rebuild(index, store)
        assert was_rebuilt and sorted(rebuilt.image_ids()) == sorted(r.image_id for r in records)
        assert rebuilt.feed == store.feed_position(FINGERPRINT)
        same, was_rebuilt = follow_or_rebuild(rebuilt, store)
        assert same is rebuilt and not was_rebuilt
    finally:
        store.close()


def test_a_saved_index_catches_up_on_what_happened_while_it_was_down(store, tmp_path: Path):
    records = fill(store, 4)
    config = IndexConfig(dim=64)
    load_or_rebuild(tmp_path, store, FINGERPRINT, config)  # built and saved
    store.delete(key_of(records[0]))
    put_records(store, [make_record(seed=7)])
    scans = Scans(store)
    index = load_or_rebuild(tmp_path, scans, FINGERPRINT, config)
    assert scans.listings == 0  # followed the feed, no rebuild
    expected = {r.image_id for r in records[1:]} | {make_record(seed=7).image_id}
    assert set(index.image_ids()) == expected
    # and the position it reached was saved: a restart reads nothing again
    assert LatentIndex.load(tmp_path, FINGERPRINT, config).feed == store.feed_position(FINGERPRINT)


def test_an_index_saved_without_a_feed_position_is_rebuilt(store, tmp_path: Path):
    """Indexes saved before the feed existed cannot know what changed since: they are rebuilt once."""
    records = fill(store, 3)
    config = IndexConfig(dim=64)
    load_or_rebuild(tmp_path, store, FINGERPRINT, config)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["feed"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store.delete(key_of(records[2]))
    scans = Scans(store)
    index = load_or_rebuild(tmp_path, scans, FINGERPRINT, config)
    assert scans.listings == 1 and sorted(index.image_ids()) == sorted(r.image_id for r in records[:2])


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
