"""The change feed: every put and delete of a record, in order, atomically with the write; readers learn
when they fell behind a trimmed feed. Both backends, through the real Redis and a real LMDB."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cache.errors import StoreFullError
from cache.feed import Change, FeedPosition, FeedTrimmedError
from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.records import put_records
from cache.redis_store import RedisConfig, RedisStore
from cache.store import RecordStore

from .helpers import FINGERPRINT, key_of, make_record, purge_prefix


def changes_after(store: RecordStore, position: FeedPosition, limit: int = 1024) -> list[Change]:
    got: list[Change] = []
    while (read := store.read_feed(FINGERPRINT, position, limit)).changes:
        got += read.changes
        position = read.position
    return got


def test_every_put_and_delete_is_in_the_feed_in_order(store: RecordStore) -> None:
    start = store.feed_position(FINGERPRINT)
    assert start.seq == 0 and store.read_feed(FINGERPRINT, start).changes == []
    put_records(store, [make_record(i) for i in range(3)])
    assert store.delete(key_of(0))
    put_records(store, [make_record(3)])
    store.put(key_of(0), store.get(key_of(1)))  # a plain put is a change too
    expected = [
        Change("put", key_of(0).image_id),
        Change("put", key_of(1).image_id),
        Change("put", key_of(2).image_id),
        Change("delete", key_of(0).image_id),
        Change("put", key_of(3).image_id),
        Change("put", key_of(0).image_id),
    ]
    read = store.read_feed(FINGERPRINT, start)
    assert read.changes == expected and read.position.seq == 6
    assert read.position == store.feed_position(FINGERPRINT)
    assert store.read_feed(FINGERPRINT, read.position).changes == []
    assert changes_after(store, start, limit=4) == expected  # pages join without gaps or repeats
    # another model's feed is its own
    assert store.feed_position("other-model") == FeedPosition()
    assert store.read_feed("other-model", FeedPosition()).changes == []


def test_a_reader_from_the_middle_sees_only_what_came_after(store: RecordStore) -> None:
    put_records(store, [make_record(i) for i in range(2)])
    middle = store.feed_position(FINGERPRINT)
    put_records(store, [make_record(2)])
    assert store.read_feed(FINGERPRINT, middle).changes == [Change("put", key_of(2).image_id)]


def test_a_reader_behind_the_trimmed_start_is_told_so(tmp_path: Path, redis_url: str) -> None:
    lmdb = LmdbStore(LmdbConfig(path=str(tmp_path / "lmdb"), feed_length=5))
    prefix = f"onetoken-test-{uuid.uuid4().hex[:12]}"
    # Redis trims whole stream nodes (100 entries by default), so it needs more writes to trim at all
    redis_store = RedisStore(RedisConfig(url=redis_url, key_prefix=prefix, feed_length=5))
    try:
        for store, writes in ((lmdb, 12), (redis_store, 300)):
            start = store.feed_position(FINGERPRINT)
            for i in range(writes - 3):
                store.put(key_of(i), b"x")
            recent = store.feed_position(FINGERPRINT)
            for i in range(writes - 3, writes):
                store.put(key_of(i), b"x")
            with pytest.raises(FeedTrimmedError, match="trimmed changes 1\\.\\."):
                store.read_feed(FINGERPRINT, start)
            # a reader still inside the kept window loses nothing
            assert [c.image_id for c in store.read_feed(FINGERPRINT, recent).changes] == [
                key_of(i).image_id for i in range(writes - 3, writes)
            ]
    finally:
        lmdb.close()
        redis_store.close()
        purge_prefix(redis_url, prefix)


def test_a_lost_redis_feed_is_not_mistaken_for_an_empty_one(redis_store: RedisStore) -> None:
    put_records(redis_store, [make_record(i) for i in range(3)])
    position = redis_store.feed_position(FINGERPRINT)
    redis_store._client.delete(redis_store._feed(FINGERPRINT))  # evicted, or deleted by an operator
    with pytest.raises(FeedTrimmedError, match="lost"):
        redis_store.read_feed(FINGERPRINT, position)


def test_a_batch_that_does_not_fit_leaves_neither_records_nor_changes(tmp_path: Path) -> None:
    store = LmdbStore(LmdbConfig(path=str(tmp_path / "lmdb"), map_size=1 << 20))
    try:
        put_records(store, [make_record(0)])
        before = store.feed_position(FINGERPRINT)
        with pytest.raises(StoreFullError):
            store.put_many([(key_of(i), b"\0" * 200_000) for i in range(1, 10)])
        assert store.feed_position(FINGERPRINT) == before and store.get(key_of(1)) is None
    finally:
        store.close()


def test_positions_round_trip_and_damaged_ones_are_refused() -> None:
    position = FeedPosition("1796101310352-0", 17)
    assert FeedPosition.from_dict(position.to_dict()) == position
    for bad in (None, {"offset": 3, "seq": 1}, {"offset": "", "seq": -1}, {"offset": "", "seq": True}):
        with pytest.raises(ValueError):
            FeedPosition.from_dict(bad)
