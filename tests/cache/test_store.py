"""The contract of `RecordStore`, run against every backend through the `store` fixture."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cache.errors import CorruptRecordError, FingerprintMismatchError
from cache.factory import StoreConfig, lmdb_path, open_store
from cache.keys import RecordKey
from cache.lmdb_store import LmdbStore
from cache.records import get_record, get_records, put_records
from cache.redis_store import RedisStore
from cache.serde import serialize
from cache.store import RecordStore

from .helpers import FINGERPRINT, key_of, make_record


def test_a_miss_is_none(store: RecordStore) -> None:
    assert store.get(key_of(1)) is None
    assert not store.contains(key_of(1))
    assert store.delete(key_of(1)) is False
    assert get_record(store, key_of(1)) is None


def test_put_get_overwrite_delete(store: RecordStore) -> None:
    store.put(key_of(1), b"first")
    assert store.get(key_of(1)) == b"first" and store.contains(key_of(1))
    store.put(key_of(1), b"second")
    assert store.get(key_of(1)) == b"second"
    assert store.delete(key_of(1)) is True
    assert store.get(key_of(1)) is None and not store.contains(key_of(1))


def test_batches_keep_order_and_report_misses(store: RecordStore) -> None:
    store.put_many([(key_of(i), f"blob-{i}".encode()) for i in range(0, 20, 2)])
    got = store.get_many([key_of(i) for i in range(20)])
    assert got == [f"blob-{i}".encode() if i % 2 == 0 else None for i in range(20)]
    store.put_many([])
    assert store.get_many([]) == []


def test_models_are_namespaced(store: RecordStore) -> None:
    store.put_many(
        [(key_of(i), b"a") for i in range(5)] + [(key_of(i, "other-model"), b"b") for i in range(3)]
    )
    # the same image under another model is a different key: a miss, never the other model's record
    assert store.get(key_of(4, "other-model")) is None
    assert sorted(store.iter_ids(FINGERPRINT)) == sorted(key_of(i).image_id for i in range(5))
    assert store.count(FINGERPRINT) == 5 and store.count("other-model") == 3 and store.count("nobody") == 0


def test_records_round_trip_through_the_store(store: RecordStore) -> None:
    records = [make_record(i) for i in range(4)]
    keys = put_records(store, records, kv_dtype="fp32")
    assert keys == [key_of(i) for i in range(4)]
    got = get_records(store, [*keys, key_of(99)])
    assert got[-1] is None
    for rec, out in zip(records, got[:-1], strict=True):
        assert out is not None and out.image_id == rec.image_id
        assert out.keys.equal(rec.keys) and out.values.equal(rec.values) and out.latent.equal(rec.latent)


def test_paper_size_record(store: RecordStore) -> None:
    rec = make_record(7, shape=(32, 32, 1, 128), d=4096)  # 512 KiB of fp16 state
    put_records(store, [rec])
    out = get_record(store, key_of(7))
    assert out is not None and out.keys.shape == (32, 32, 1, 128)
    assert (out.keys.float() - rec.keys).abs().max() < 3 * 6 * 2**-11  # fp16: |k| < ~6*3 here


def test_damaged_blobs_raise_instead_of_returning_state(store: RecordStore) -> None:
    blob = serialize(make_record(1))
    store.put(key_of(1), blob[: len(blob) // 2])
    with pytest.raises(CorruptRecordError):
        get_record(store, key_of(1))
    flipped = bytearray(blob)
    flipped[-3] ^= 0xFF
    store.put(key_of(1), bytes(flipped))
    with pytest.raises(CorruptRecordError, match="checksum"):
        get_record(store, key_of(1))
    store.put(key_of(2), blob)  # image 1's bytes under image 2's key
    with pytest.raises(CorruptRecordError, match="holds image"):
        get_record(store, key_of(2))


def test_another_models_record_under_our_key_is_refused(store: RecordStore) -> None:
    store.put(key_of(3), serialize(make_record(3, fingerprint="other-model")))
    with pytest.raises(FingerprintMismatchError):
        get_record(store, key_of(3))


def test_open_store_picks_the_backend_by_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url, where in [
        (f"lmdb://{tmp_path}/a", tmp_path / "a"),
        (str(tmp_path / "b"), tmp_path / "b"),
        ("lmdb://rel/c", tmp_path / "rel" / "c"),
        ("plain-dir", tmp_path / "plain-dir"),
    ]:
        with open_store(StoreConfig(url)) as s:
            assert isinstance(s, LmdbStore)
            s.put(key_of(1), b"x")
        assert (where / "data.mdb").exists(), url


def test_open_store_redis_urls(redis_url: str) -> None:
    with open_store(StoreConfig(redis_url, key_prefix="onetoken-test-factory")) as s:
        assert isinstance(s, RedisStore)
        assert s.get(key_of(1)) is None
    with open_store(
        StoreConfig("rediss://127.0.0.1:1/0")
    ) as s:  # TLS is chosen by the scheme; no connection yet
        assert isinstance(s, RedisStore)
        assert s._client.connection_pool.connection_class.__name__ == "SSLConnection"


def test_open_store_refuses_unknown_urls() -> None:
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        StoreConfig("s3://bucket/x")
    with pytest.raises(ValueError, match="key_prefix"):
        StoreConfig(key_prefix="a:b")
    with pytest.raises(ValueError, match="names no directory"):
        lmdb_path("lmdb://")


def test_lmdb_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    with open_store(StoreConfig(path)) as s:
        put_records(s, [make_record(i) for i in range(3)])
    with open_store(StoreConfig(f"lmdb://{path}")) as s:
        assert s.count(FINGERPRINT) == 3
        assert get_record(s, key_of(2)) is not None
    assert os.path.getsize(os.path.join(path, "data.mdb")) < 1 << 20  # map_size reserves, not allocates


def test_keys_are_validated_before_any_io(store: RecordStore) -> None:
    with pytest.raises(ValueError):
        store.get(RecordKey("bad:fingerprint", key_of(1).image_id))


def test_threads_share_one_store(store: RecordStore) -> None:
    # the interface promises thread safety: encoder actors write while the worker reads
    def work(t: int) -> list[bytes | None]:
        mine = [key_of(1000 * t + i) for i in range(50)]
        store.put_many([(k, f"{t}-{i}".encode()) for i, k in enumerate(mine[:25])])
        for i, k in enumerate(mine[25:]):
            store.put(k, f"{t}-{i + 25}".encode())
        return store.get_many(mine)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, range(4)))
    for t, got in enumerate(results):
        assert got == [f"{t}-{i}".encode() for i in range(50)]
    assert store.count(FINGERPRINT) == 200


def test_two_lmdb_stores_of_one_directory_share_it(tmp_path: Path) -> None:
    """The worker and an in-process encoder open the same store; LMDB allows one env per process."""
    first = open_store(StoreConfig(str(tmp_path / "db")))
    second = open_store(StoreConfig(f"lmdb://{tmp_path / 'db'}"))
    first.put(key_of(1), b"one")
    assert second.get(key_of(1)) == b"one"
    first.close()
    first.close()  # closing twice is harmless and does not close the other's environment
    second.put(key_of(2), b"two")
    assert second.get(key_of(2)) == b"two"
    second.close()
    with open_store(StoreConfig(str(tmp_path / "db"))) as third:  # reopened after the last close
        assert third.get(key_of(2)) == b"two"
