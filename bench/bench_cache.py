"""Record store throughput and latency: LMDB and Redis, against redis-benchmark in the same run.

Two record sizes: `tiny` (the shipped model: 4 layers x 2 kv heads x 32, latent 128) and `paper`
(32 layers x 32 kv heads x 128 in fp16 = 512 KiB of state, latent 4096). For each store:
single-record put/get (one client, one request at a time: p50/p99 per call) and batched
put_many/get_many (one pipeline or one transaction per batch), on serialized blobs; plus serde cost.
redis-benchmark runs with the same value size, one client, once unpipelined and once with the batch
size as its pipeline depth (more requests than ours: its timer counts whole milliseconds), so the
ratios show what our Python layer costs over raw Redis.

    python bench/bench_cache.py [--n-tiny 5000] [--n-paper 500] [--batch 64] [--quick]

redis-benchmark writes one key (`key:__rand_int__`) in database --bench-db and the script deletes it;
the stores write under a unique key prefix and delete it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
import torch

from cache.keys import RecordKey
from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.redis_store import RedisConfig, RedisStore
from cache.serde import deserialize, serialize
from cache.store import RecordStore
from htcvlm.record import Record, image_id_of

FINGERPRINT = "bench"
SIZES: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "tiny": ((4, 2, 1, 32), 128),  # (layers, kv heads, voco, head_dim), latent d
    "paper": ((32, 32, 1, 128), 4096),
}


@dataclass(frozen=True)
class Row:
    size: str
    backend: str
    op: str
    ops_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    value_bytes: int = 0

    @property
    def mb_per_s(self) -> float:
        return self.ops_per_s * self.value_bytes / 1e6


def make_record(i: int, shape: tuple[int, int, int, int], d: int, g: torch.Generator) -> Record:
    return Record(
        image_id=image_id_of(f"bench-{i}".encode()),
        fingerprint=FINGERPRINT,
        latent=torch.randn(d, generator=g),
        keys=torch.randn(shape, generator=g),
        values=torch.randn(shape, generator=g),
        voco_position=580,
    )


def percentile_ms(times_s: Sequence[float], q: int) -> float:
    return statistics.quantiles(times_s, n=100)[q - 1] * 1e3


def time_each(fn: Callable[[int], object], n: int) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


def single_row(size: str, backend: str, op: str, times: list[float], nbytes: int) -> Row:
    return Row(
        size, backend, op, len(times) / sum(times), percentile_ms(times, 50), percentile_ms(times, 99), nbytes
    )


def bench_store(
    size: str, backend: str, store: RecordStore, items: list[tuple[RecordKey, bytes]], batch: int
) -> list[Row]:
    nbytes = len(items[0][1])
    keys = [k for k, _ in items]
    puts = time_each(lambda i: store.put(*items[i]), len(items))
    gets = time_each(lambda i: store.get(keys[i]), len(items))
    assert store.get(keys[-1]) == items[-1][1], f"{backend} returned other bytes"
    batches = range(0, len(items), batch)
    t0 = time.perf_counter()
    for s in batches:
        store.put_many(items[s : s + batch])
    put_many = len(items) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = 0
    for s in batches:
        got += sum(b is not None for b in store.get_many(keys[s : s + batch]))
    get_many = len(items) / (time.perf_counter() - t0)
    assert got == len(items), f"{backend} lost records: {got} of {len(items)}"
    return [
        single_row(size, backend, "put", puts, nbytes),
        single_row(size, backend, "get", gets, nbytes),
        Row(size, backend, f"put_many x{batch}", put_many, value_bytes=nbytes),
        Row(size, backend, f"get_many x{batch}", get_many, value_bytes=nbytes),
    ]


def bench_serde(size: str, records: list[Record]) -> list[Row]:
    blobs = []
    ser = time_each(lambda i: blobs.append(serialize(records[i], "fp16")), len(records))
    de = time_each(lambda i: deserialize(blobs[i], fingerprint=FINGERPRINT), len(records))
    nbytes = len(blobs[0])
    return [
        single_row(size, "serde fp16", "serialize", ser, nbytes),
        single_row(size, "serde fp16", "deserialize", de, nbytes),
    ]


_RB_LINE = re.compile(r"^(SET|GET): ([\d.]+) requests per second, p50=([\d.]+) msec", re.M)


def redis_benchmark(url: str, db: int, size: str, nbytes: int, n: int, pipeline: int) -> list[Row]:
    parts = urlsplit(url)
    args = ["redis-benchmark", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    if parts.password:
        args += ["-a", parts.password]
    args += [
        "--dbnum",
        str(db),
        "-t",
        "set,get",
        "-d",
        str(nbytes),
        "-n",
        str(n),
        "-c",
        "1",
        "-P",
        str(pipeline),
        "-q",
    ]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600).stdout
    label = "redis-benchmark" + (f" -P {pipeline}" if pipeline > 1 else "")
    op = (
        {"SET": "put", "GET": "get"}
        if pipeline == 1
        else {"SET": f"put_many x{pipeline}", "GET": f"get_many x{pipeline}"}
    )
    rows = [
        Row(size, label, op[m[1]], float(m[2]), float(m[3]) if pipeline == 1 else None, None, nbytes)
        for m in _RB_LINE.finditer(out.replace("\r", "\n"))
    ]
    if len(rows) != 2:
        raise RuntimeError(f"could not parse redis-benchmark output: {out!r}")
    return rows


def print_table(rows: list[Row]) -> None:
    head = ("size", "value", "backend", "op", "ops/s", "MB/s", "p50 ms", "p99 ms")
    line = "{:6} {:>10} {:22} {:14} {:>10} {:>8} {:>8} {:>8}"
    print(line.format(*head))
    for r in rows:
        p50 = "" if r.p50_ms is None else f"{r.p50_ms:.3f}"
        p99 = "" if r.p99_ms is None else f"{r.p99_ms:.3f}"
        value = f"{r.value_bytes / 1024:.1f} KiB"
        print(
            line.format(r.size, value, r.backend, r.op, f"{r.ops_per_s:.0f}", f"{r.mb_per_s:.1f}", p50, p99)
        )


def print_ratios(rows: list[Row], batch: int) -> None:
    by = {(r.size, r.backend, r.op): r for r in rows}
    print("\nratios of ops/s, same run:")
    ops = [("put", "redis-benchmark"), ("get", "redis-benchmark")]
    ops += [(f"{op} x{batch}", f"redis-benchmark -P {batch}") for op in ("put_many", "get_many")]
    for size in SIZES:
        for op, ref in ops:
            ours, lmdb, nosync, raw = (
                by[(size, b, op)].ops_per_s for b in ("redis", "lmdb", "lmdb nosync", ref)
            )
            print(
                f"  {size:5} {op:14} RedisStore / {ref:20} {ours / raw:6.2f}"
                f"   LMDB / RedisStore {lmdb / ours:7.2f}   LMDB nosync / LMDB {nosync / lmdb:6.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--bench-db", type=int, default=15, help="database redis-benchmark writes its key in")
    parser.add_argument("--n-tiny", type=int, default=5000)
    parser.add_argument("--n-paper", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    # redis-benchmark needs more requests than our loops to give a rate finer than its ms timer
    parser.add_argument("--rb-n-tiny", type=int, default=100_000, help="redis-benchmark requests, tiny")
    parser.add_argument("--rb-n-paper", type=int, default=3000, help="redis-benchmark requests, paper size")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 tiny and 30 paper records")
    args = parser.parse_args()
    counts = {"tiny": 200, "paper": 30} if args.quick else {"tiny": args.n_tiny, "paper": args.n_paper}
    rb_counts = (
        {"tiny": 5000, "paper": 100} if args.quick else {"tiny": args.rb_n_tiny, "paper": args.rb_n_paper}
    )
    torch.set_num_threads(1)

    rows: list[Row] = []
    prefix = f"onetoken-bench-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.mkdtemp(prefix="onetoken-bench-")
    # the default LMDB store fsyncs every commit; "nosync" shows what that durability costs
    stores: dict[str, RecordStore] = {
        "lmdb": LmdbStore(LmdbConfig(path=f"{tmp}/sync", key_prefix=prefix)),
        "lmdb nosync": LmdbStore(LmdbConfig(path=f"{tmp}/nosync", key_prefix=prefix, sync=False)),
        "redis": RedisStore(RedisConfig(url=args.redis_url, key_prefix=prefix)),
    }
    try:
        for size, (shape, d) in SIZES.items():
            g = torch.Generator().manual_seed(0)
            records = [make_record(i, shape, d, g) for i in range(counts[size])]
            rows += bench_serde(size, records)
            items = [(RecordKey(FINGERPRINT, r.image_id), serialize(r, "fp16")) for r in records]
            for name, store in stores.items():
                rows += bench_store(size, name, store, items, args.batch)
            for pipeline in (1, args.batch):
                nbytes = len(items[0][1])
                rows += redis_benchmark(
                    args.redis_url, args.bench_db, size, nbytes, rb_counts[size], pipeline
                )
    finally:
        for store in stores.values():
            store.close()
        shutil.rmtree(tmp)
        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()
        # the URL's /db would override a db= argument, so name the database in the URL itself
        bench_db_url = urlsplit(args.redis_url)._replace(path=f"/{args.bench_db}").geturl()
        redis.Redis.from_url(bench_db_url).delete("key:__rand_int__")

    print(
        f"records: tiny x{counts['tiny']}, paper x{counts['paper']} (fp16 state), redis-benchmark "
        f"requests: tiny x{rb_counts['tiny']}, paper x{rb_counts['paper']}; batch {args.batch}; "
        f"one client; Redis at {urlsplit(args.redis_url).hostname}\n"
    )
    print_table(rows)
    print_ratios(rows, args.batch)


if __name__ == "__main__":
    main()
