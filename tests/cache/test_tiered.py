"""The tiered store: a bounded hot tier (process memory, or a Redis with maxmemory) in front of LMDB on
disk. Records beyond the hot tier's budget are never lost, reads promote, deletes reach both tiers, and
a hot tier that fails costs speed, not answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cache.errors import StoreUnavailableError
from cache.factory import StoreConfig, open_store
from cache.feed import FeedPosition
from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.records import get_record, key_of, put_records
from cache.redis_store import RedisConfig, RedisStore
from cache.retry import RetryPolicy
from cache.tiered import MemoryTier, TieredStore
from htcvlm.sizes import parse_size

from .helpers import FINGERPRINT, RedisServer, make_record

StartServer = Callable[..., RedisServer]


def records(n: int, start: int = 0):
    # (2 layers, 2 kv heads, 1 voco, 256) fp16 K/V: about 4.6 KB per record
    return [make_record(seed=i, shape=(2, 2, 1, 256)) for i in range(start, start + n)]


@pytest.fixture(params=["memory", "redis"])
def tiered(request: pytest.FixtureRequest, tmp_path: Path, redis_server: StartServer):
    """A 64 KiB hot tier of each kind over LMDB: room for about a dozen of `records`."""
    cold = LmdbStore(LmdbConfig(path=str(tmp_path / "cold")))
    if request.param == "memory":
        hot = MemoryTier(64 << 10)
    else:
        # Redis counts its own overhead in maxmemory: 1.5 MiB over an empty server's ~1 MB
        server = redis_server("--maxmemory", "1536kb", "--maxmemory-policy", "allkeys-lru")
        hot = RedisStore(RedisConfig(server.url, feed=False, retry=RetryPolicy(total_s=0.5)))
    store = TieredStore(hot, cold)
    yield store
    store.close()


def test_records_beyond_the_hot_budget_are_never_lost(tiered: TieredStore):
    written = records(400)  # ~1.8 MB: far over the hot tier's budget
    for start in range(0, len(written), 50):
        put_records(tiered, written[start : start + 50])
    for record in written:
        got = get_record(tiered, key_of(record))
        assert got is not None and got.image_id == record.image_id
        assert (got.keys.float() - record.keys).abs().max() < 0.02  # fp16 storage
    assert tiered.count(FINGERPRINT) == 400
    assert tiered.counts.missed == 0 and tiered.counts.cold > 0  # read through from disk
    if isinstance(tiered.hot, MemoryTier):
        assert tiered.hot.bytes <= tiered.hot.max_bytes and 0 < len(tiered.hot) < 400


def test_a_read_from_disk_is_promoted_and_served_hot_next(tiered: TieredStore):
    put_records(tiered, records(30))
    first = key_of(make_record(seed=0, shape=(2, 2, 1, 256)))
    tiered.hot.delete(first)  # evicted (Redis's LRU is approximate: which key goes is not ours to pick)
    before = (tiered.counts.hot, tiered.counts.cold)
    assert tiered.get(first) is not None
    assert tiered.get(first) is not None
    assert (tiered.counts.hot, tiered.counts.cold) == (before[0] + 1, before[1] + 1)


def test_a_delete_reaches_both_tiers_and_the_feed(tiered: TieredStore):
    (record,) = records(1)
    start = tiered.feed_position(FINGERPRINT)
    put_records(tiered, [record])
    assert tiered.hot.get_many([key_of(record)])[0] is not None  # written to both
    assert tiered.delete(key_of(record)) and not tiered.delete(key_of(record))
    assert tiered.get(key_of(record)) is None and tiered.hot.get_many([key_of(record)]) == [None]
    assert [c.op for c in tiered.read_feed(FINGERPRINT, start).changes] == ["put", "delete"]


def test_a_delete_or_rewrite_by_another_process_reaches_this_processes_hot_tier(tmp_path: Path):
    """Two processes' tiered stores over one LMDB, each with its own memory tier: what one deletes, the
    other must not go on serving from memory (it learns it from the disk tier's feed)."""
    a, b = (
        TieredStore(MemoryTier(1 << 20), LmdbStore(LmdbConfig(path=str(tmp_path / "cold")))) for _ in "ab"
    )
    try:
        written = records(3)
        put_records(a, written)
        assert all(b.get(key_of(r)) is not None for r in written)  # now in b's memory too
        assert a.delete(key_of(written[1]))
        assert b.get(key_of(written[1])) is None and b.counts.missed == 1
        assert b.get(key_of(written[0])) is not None
        a.put(key_of(written[2]), b"replaced")  # a damaged record re-encoded, say: b must not keep the old
        assert b.get(key_of(written[2])) == b"replaced"
    finally:
        a.close()
        b.close()


def test_a_memory_tier_behind_a_trimmed_feed_is_cleared(tmp_path: Path):
    cold = LmdbStore(LmdbConfig(path=str(tmp_path / "cold"), feed_length=2))
    store = TieredStore(MemoryTier(1 << 20), cold)
    other = LmdbStore(LmdbConfig(path=str(tmp_path / "cold"), feed_length=2))
    try:
        written = records(5)
        put_records(store, written[:1])
        assert store.get(key_of(written[0])) is not None
        other.delete(key_of(written[0]))
        put_records(other, written[1:])  # the delete is trimmed from the feed before `store` reads it
        assert store.get(key_of(written[0])) is None and len(store.hot) == 0
    finally:
        store.close()
        other.close()


def test_the_hot_redis_writes_no_feed_of_its_own(tmp_path: Path, redis_server: StartServer):
    server = redis_server()
    config = StoreConfig(f"tiered:{server.url}|{tmp_path / 'cold'}")
    with open_store(config) as store:
        assert isinstance(store, TieredStore)
        put_records(store, records(3))
        assert store.read_feed(FINGERPRINT, FeedPosition()).position.seq == 3  # the disk tier's feed
    raw = redis.Redis.from_url(server.url)
    assert len(raw.keys("*")) == 3 and not raw.keys("*:feed")
    raw.close()


def test_a_hot_tier_that_is_down_costs_speed_not_answers(tmp_path: Path, redis_server: StartServer):
    server = redis_server()
    hot = RedisStore(RedisConfig(server.url, feed=False, retry=RetryPolicy(total_s=0.3)))
    store = TieredStore(hot, LmdbStore(LmdbConfig(path=str(tmp_path / "cold"))))
    try:
        written = records(5)
        put_records(store, written[:3])
        server.kill()
        put_records(store, written[3:])  # on disk; the hot tier's failure is only logged
        assert all(get_record(store, key_of(r)) is not None for r in written)
        assert store.count(FINGERPRINT) == 5
        with pytest.raises(StoreUnavailableError):  # a stale hot copy could answer for it later
            store.delete(key_of(written[0]))
        assert get_record(store, key_of(written[0])) is not None
    finally:
        store.close()


def test_tiered_urls_open_and_bad_ones_say_what_is_wrong(tmp_path: Path):
    with open_store(StoreConfig(f"tiered:memory:4MiB|lmdb://{tmp_path / 'cold'}")) as store:
        assert isinstance(store, TieredStore) and store.hot.max_bytes == 4 << 20
        put_records(store, records(2))
    with open_store(StoreConfig(str(tmp_path / "cold"))) as cold:
        assert cold.count(FINGERPRINT) == 2  # the disk tier is an ordinary store on its own
    for bad, says in [
        ("tiered:memory:4MiB", "tiered:HOT|COLD"),
        ("tiered:memory:0|/x", "not a positive size"),
        ("tiered:memory:lots|/x", "not a positive size"),
        ("tiered:lmdb:///a|/x", "hot tier is memory:SIZE or a Redis URL"),
        ("tiered:memory:1MiB|ftp://x", "unknown store URL scheme"),
        ("tiered:memory:1MiB|tiered:memory:1MiB|/x", "tiered:HOT|COLD"),
    ]:
        with pytest.raises(ValueError, match=says):
            StoreConfig(bad)


def test_sizes_parse_in_binary_and_decimal_units():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MB") == 512_000_000
    assert parse_size("1000") == 1000 and parse_size("1.5 KiB") == 1536
