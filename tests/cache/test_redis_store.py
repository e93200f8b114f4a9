"""Redis failure paths, each on a private redis-server: restarts, outages, eviction, auth and TLS."""

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cache.errors import StoreUnavailableError
from cache.factory import StoreConfig, open_store
from cache.feed import FeedPosition
from cache.index import IndexConfig, LatentIndex
from cache.records import LookupStatus, get_record, lookup, put_records
from cache.redis_store import RedisConfig, RedisStore, redis_acl_rule
from cache.retry import RetryPolicy
from cache.store import RecordStore

from .helpers import FINGERPRINT, RedisServer, key_of, make_record, make_tls_certs, purge_prefix

StartServer = Callable[..., RedisServer]


def connect(server: RedisServer, total_s: float = 5.0) -> RedisStore:
    return RedisStore(RedisConfig(url=server.url, retry=RetryPolicy(total_s=total_s)))


def write_some(store: RecordStore, n: int = 40) -> dict[int, bytes]:
    put_records(store, [make_record(i) for i in range(n)])
    return {i: store.get(key_of(i)) for i in range(n)}  # type: ignore[misc]


def test_nothing_is_lost_over_a_graceful_restart(redis_server: StartServer) -> None:
    server = redis_server()
    with connect(server) as store:
        before = write_some(store)
        server.stop()
        server.start()  # same port and directory: Redis replays its append-only file
        assert {i: store.get(key_of(i)) for i in before} == before  # the pool reconnected by itself
        assert store.count(FINGERPRINT) == len(before)


def test_nothing_is_lost_over_a_crash_with_fsync_always(redis_server: StartServer) -> None:
    server = redis_server("--appendfsync", "always")  # everysec, the default, may lose the last second
    with connect(server) as store:
        before = write_some(store)
        server.kill()
        server.start()
        assert {i: store.get(key_of(i)) for i in before} == before


def test_an_outage_becomes_store_unavailable_within_the_bound(redis_server: StartServer) -> None:
    server = redis_server()
    with connect(server, total_s=1.0) as store:
        before = write_some(store, 3)
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="is the store running") as info:
            store.get(key_of(0))
        elapsed = time.monotonic() - t0
        # the budget plus at most one connect timeout (1 s) for the attempt in flight
        assert 1.0 <= elapsed < 2.5, elapsed
        assert isinstance(info.value.__cause__, redis.ConnectionError)
        server.start()
        assert store.get(key_of(0)) == before[0]  # and it works again once Redis is back


@pytest.mark.parametrize(
    "op",
    [
        lambda s: s.put(key_of(1), b"x"),
        lambda s: s.contains(key_of(1)),
        lambda s: s.delete(key_of(1)),
        lambda s: s.put_many([(key_of(1), b"x")]),
        lambda s: s.get_many([key_of(1), key_of(2)]),
        lambda s: list(s.iter_ids(FINGERPRINT)),
        lambda s: s.count(FINGERPRINT),
    ],
    ids=["put", "contains", "delete", "put_many", "get_many", "iter_ids", "count"],
)
def test_every_operation_reports_an_outage(
    redis_server: StartServer, op: Callable[[RecordStore], object]
) -> None:
    server = redis_server()
    with connect(server, total_s=0.2) as store:
        server.stop()
        with pytest.raises(StoreUnavailableError):
            op(store)


def test_retries_ride_out_a_short_restart(redis_server: StartServer) -> None:
    server = redis_server()
    with connect(server, total_s=10.0) as store:
        before = write_some(store, 2)
        server.stop()
        restart = threading.Timer(0.5, server.start)
        restart.start()
        t0 = time.monotonic()
        assert store.get(key_of(1)) == before[1]
        restart.join()
        assert 0.4 < time.monotonic() - t0 < 8


def test_evicted_is_told_apart_from_never_seen(redis_server: StartServer) -> None:
    server = redis_server("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=64))
    n = 200
    with connect(server) as store:
        for i in range(n):  # 32 KiB of fp32 state each: 6.4 MB written into 4 MB
            rec = make_record(i, shape=(4, 4, 1, 256))
            put_records(store, [rec], kv_dtype="fp32")
            index.add([rec.image_id], rec.latent.numpy())
        results = {i: lookup(store, index, key_of(i)) for i in range(n)}
        statuses = [r.status for r in results.values()]
        assert redis.Redis.from_url(server.url).info("stats")["evicted_keys"] > 0
        assert statuses.count(LookupStatus.EVICTED) > 0 and statuses.count(LookupStatus.FOUND) > 0
        for i, r in results.items():
            if r.status is LookupStatus.FOUND:
                assert r.record is not None and r.record.keys.equal(make_record(i, shape=(4, 4, 1, 256)).keys)
            else:
                assert r.record is None and get_record(store, key_of(i)) is None
        never_seen = lookup(store, index, key_of(n + 1))
        assert never_seen.status is LookupStatus.UNKNOWN and never_seen.record is None


def test_an_outage_is_never_reported_as_a_miss(redis_server: StartServer) -> None:
    # during an outage lookup must not answer EVICTED or UNKNOWN: the service would re-encode for nothing
    server = redis_server()
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=64))
    with connect(server, total_s=0.3) as store:
        rec = make_record(1)
        put_records(store, [rec])
        index.add([rec.image_id], rec.latent.numpy())
        server.stop()
        for key in (key_of(1), key_of(2)):
            with pytest.raises(StoreUnavailableError):
                lookup(store, index, key)


def test_password_and_acl_user_come_from_the_url(redis_server: StartServer) -> None:
    server = redis_server("--requirepass", "s3cret", "--user", "alice", "on", ">wonderland", "~*", "+@all")
    base = f"127.0.0.1:{server.port}/0"
    for url in (f"redis://:s3cret@{base}", f"redis://alice:wonderland@{base}"):
        with open_store(StoreConfig(url)) as store:
            store.put(key_of(1), url.encode())
            assert store.get(key_of(1)) == url.encode()
    t0 = time.monotonic()
    with (
        open_store(StoreConfig(f"redis://alice:wrong@{base}")) as store,
        pytest.raises(StoreUnavailableError, match="credentials"),
    ):
        store.get(key_of(1))
    assert time.monotonic() - t0 < 1.0  # a wrong password is not retried for the whole budget


def test_tls_from_a_rediss_url(redis_server: StartServer, tmp_path: Path) -> None:
    server = redis_server(tls_dir=make_tls_certs(tmp_path / "tls"))
    assert server.url.startswith("rediss://")
    with open_store(StoreConfig(server.url)) as store:
        put_records(store, [make_record(1)])
        assert get_record(store, key_of(1)) is not None
    plain = server.url.replace("rediss://", "redis://").split("?")[0]
    with open_store(StoreConfig(plain, retry_s=0.3)) as store, pytest.raises(StoreUnavailableError):
        store.get(key_of(1))


def test_a_least_privilege_acl_user_over_tls_runs_the_store_and_nothing_else(
    redis_server: StartServer, tmp_path: Path
) -> None:
    """The documented ACL (only the store's commands, on keys under the prefix), over TLS: every store
    operation works, the change feed included, and the same credentials can neither flush the server nor
    touch other keys."""
    rule = redis_acl_rule("onetoken").split()
    server = redis_server(
        "--user", "default", "off", "--user", "onetoken", "on", ">s3cret", *rule,
        tls_dir=make_tls_certs(tmp_path / "tls"),
    )  # fmt: skip
    url = server.url.replace("rediss://", "rediss://onetoken:s3cret@")
    with open_store(StoreConfig(url)) as store:
        put_records(store, [make_record(i) for i in range(3)])
        assert get_record(store, key_of(1)) is not None and store.contains(key_of(2))
        assert store.count(FINGERPRINT) == 3 and store.delete(key_of(0)) and store.get(key_of(0)) is None
        read = store.read_feed(FINGERPRINT, FeedPosition())
        assert [c.op for c in read.changes] == ["put"] * 3 + ["delete"]
        assert read.position == store.feed_position(FINGERPRINT)
    raw = redis.Redis.from_url(url)
    for forbidden in (raw.flushall, lambda: raw.set("other:key", b"x"), lambda: raw.config_get("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    raw.close()


def test_scan_pages_are_joined_without_duplicates(redis_url: str) -> None:
    prefix = f"onetoken-test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(RedisConfig(url=redis_url, key_prefix=prefix, scan_count=7))
    try:
        store.put_many([(key_of(i), b"x") for i in range(100)])
        ids = list(store.iter_ids(FINGERPRINT))
        assert len(ids) == len(set(ids)) == 100 == store.count(FINGERPRINT)
    finally:
        store.close()
        purge_prefix(redis_url, prefix)
