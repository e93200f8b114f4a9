"""The Redis store on a real Redis Cluster (6 private nodes: 3 primaries, 3 replicas): records spread
over the primaries, listing scans them all, the change feed works across slots, and a primary killed
mid-write fails over without the store giving up or losing a write it acknowledged after."""

from __future__ import annotations

import threading

import redis

from cache.factory import StoreConfig, open_store
from cache.feed import FeedPosition
from cache.records import get_record, key_of, put_records

from .helpers import FINGERPRINT, RedisClusterNodes, make_record


def test_records_spread_over_the_primaries_and_everything_works_across_slots(
    redis_cluster: RedisClusterNodes,
):
    with open_store(StoreConfig(redis_cluster.url)) as store:
        records = [make_record(seed=i) for i in range(60)]
        put_records(store, records)
        assert sorted(store.iter_ids(FINGERPRINT)) == sorted(r.image_id for r in records)
        assert store.count(FINGERPRINT) == 60
        assert all(get_record(store, key_of(r)) is not None for r in records)
        assert store.delete(key_of(records[0])) and store.get(key_of(records[0])) is None
        read = store.read_feed(FINGERPRINT, FeedPosition())
        assert [c.op for c in read.changes] == ["put"] * 60 + ["delete"]
        assert read.position == store.feed_position(FINGERPRINT)
    holders = {redis_cluster.primary_of(key_of(r).to_str()).port for r in records}
    assert len(holders) == 3  # hash tags by image id: every primary holds records


def test_a_primary_killed_mid_write_fails_over_and_the_store_goes_on(redis_cluster: RedisClusterNodes):
    records = [make_record(seed=i) for i in range(120)]
    victim = redis_cluster.primary_of(key_of(records[0]).to_str())
    with open_store(StoreConfig(redis_cluster.url, retry_s=30)) as store:
        put_records(store, records[:40])
        killer = threading.Timer(0.05, victim.kill)
        killer.start()
        for start in range(40, 120, 10):  # writes go on while the primary dies and a replica takes over
            put_records(store, records[start : start + 10])
        killer.join()
        assert victim.proc is None
        missing = [r for r in records if get_record(store, key_of(r)) is None]
        # writes acknowledged just before the failover may be lost (replication is asynchronous); a
        # rerun (what ingest does) writes them again, and then every record is there
        put_records(store, missing)
        assert store.count(FINGERPRINT) == 120
        assert all(get_record(store, key_of(r)) is not None for r in records)
    survivor = next(n for n in redis_cluster.nodes if n.proc is not None)
    assert redis.Redis(port=survivor.port).execute_command("CLUSTER INFO")["cluster_state"] == "ok"
