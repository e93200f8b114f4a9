"""The tiered store: what a record costs in each tier, and how long a read takes from each.

1. Capacity: records per GiB at the tiny and paper geometries, fp16 and int8 K/V: the serialized
   record (what a memory or Redis hot tier holds, before Redis's own per-key overhead, measured
   separately from used_memory) and LMDB on disk (the data file's size after writing the records,
   B-tree pages included).
2. Read latency of one paper-size fp16 record (512 KiB of state): a hit in a memory hot tier, a hit in
   a Redis hot tier (a private redis-server on a free port), a miss served from LMDB with the file in
   the page cache, and one from LMDB with the file closed and its pages dropped from the cache first
   (posix_fadvise DONTNEED) so that it reads the disk; each read then promoted. p50/p99 over `--reads`.
   "memory rec/GiB" counts the blobs' bytes only; Redis's is from its used_memory.

    python bench/bench_tiered.py [--records 200] [--reads 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import torch

from cache.keys import RecordKey
from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.redis_store import RedisConfig, RedisStore
from cache.serde import serialize
from cache.tiered import MemoryTier, TieredStore
from htcvlm.record import Record, image_id_of

GEOMETRIES = {"tiny": ((4, 2, 1, 32), 128), "paper": ((32, 32, 1, 128), 4096)}  # (L, H, voco, D), d


def record(seed: int, geometry: str) -> Record:
    shape, d = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(seed)
    return Record(
        image_id=image_id_of(f"{geometry}-{seed}".encode()),
        fingerprint="bench",
        latent=torch.randn(d, generator=g),
        keys=torch.randn(shape, generator=g),
        values=torch.randn(shape, generator=g),
        voco_position=580,
        source_uri=f"file:///corpus/{seed}.jpg",
        created_at=1.8e9,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmdb_bytes_per_record(folder: Path, blobs: list[tuple[RecordKey, bytes]]) -> float:
    store = LmdbStore(LmdbConfig(path=str(folder), sync=False))
    try:
        store.put_many(blobs)
    finally:
        store.close()
    return (folder / "data.mdb").stat().st_size / len(blobs)


def redis_bytes_per_record(url: str, blobs: list[tuple[RecordKey, bytes]]) -> float:
    raw = redis.Redis.from_url(url)
    raw.flushall()
    before = raw.info("memory")["used_memory"]
    store = RedisStore(RedisConfig(url, feed=False))
    store.put_many(blobs)
    store.close()
    used = raw.info("memory")["used_memory"] - before
    raw.flushall()
    raw.close()
    return used / len(blobs)


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_reads(store: TieredStore, keys: list[RecordKey]) -> list[float]:
    times = []
    for key in keys:
        started = time.perf_counter()
        assert store.get(key) is not None
        times.append((time.perf_counter() - started) * 1e3)
    return times


def disk_reads(cold_path: Path, keys: list[RecordKey]) -> list[float]:
    """Reads that find nothing in memory and nothing in the page cache: LMDB is closed (its map gone)
    and the file's pages dropped before each one, and only the read itself is timed."""
    times = []
    for key in keys:
        drop_page_cache(cold_path / "data.mdb")
        store = TieredStore(MemoryTier(1 << 30), LmdbStore(LmdbConfig(path=str(cold_path))))
        try:
            times += timed_reads(store, [key])
        finally:
            store.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=root,
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for _ in range(500):
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            print(f"capacity ({args.records} records each)")
            print(f"{'geometry':<8}{'K/V':<6}{'record':>11}{'memory':>12}{'Redis':>12}{'LMDB disk':>12}")
            print(f"{'':<14}{'bytes':>11}{'rec/GiB':>12}{'rec/GiB':>12}{'rec/GiB':>12}")
            for geometry in GEOMETRIES:
                records = [record(i, geometry) for i in range(args.records)]
                for dtype in ("fp16", "int8"):
                    blobs = [(RecordKey(r.fingerprint, r.image_id), serialize(r, dtype)) for r in records]
                    size = statistics.mean(len(b) for _, b in blobs)
                    in_redis = redis_bytes_per_record(url, blobs)
                    on_disk = lmdb_bytes_per_record(root / f"cap-{geometry}-{dtype}", blobs)
                    gib = 1 << 30
                    print(
                        f"{geometry:<8}{dtype:<6}{size:>11,.0f}{gib / size:>12,.0f}{gib / in_redis:>12,.0f}"
                        f"{gib / on_disk:>12,.0f}"
                    )

            records = [record(i, "paper") for i in range(args.reads)]
            blobs = [(RecordKey(r.fingerprint, r.image_id), serialize(r, "fp16")) for r in records]
            keys = [k for k, _ in blobs]
            cold_path = root / "cold"
            memory = TieredStore(MemoryTier(1 << 40), LmdbStore(LmdbConfig(path=str(cold_path))))
            memory.put_many(blobs)
            shared = TieredStore(
                RedisStore(RedisConfig(url, feed=False)), LmdbStore(LmdbConfig(str(cold_path)))
            )
            shared.hot.put_many(blobs)
            rows = [("memory hot tier hit", timed_reads(memory, keys))]
            rows.append(("Redis hot tier hit", timed_reads(shared, keys)))
            memory.hot.clear()
            rows.append(("LMDB, page cache warm (+ promote)", timed_reads(memory, keys)))
            memory.close()
            shared.close()
            rows.append(("LMDB, page cache dropped (+ promote)", disk_reads(cold_path, keys)))
        finally:
            server.terminate()
            server.wait(10)
    size = statistics.mean(len(b) for _, b in blobs)
    print(f"\nread latency of one paper-size fp16 record ({size / 2**10:,.0f} KiB), {args.reads} reads")
    print(f"{'':<36}{'p50 ms':>9}{'p99 ms':>9}")
    for name, times in rows:
        q = statistics.quantiles(times, n=100)
        print(f"{name:<36}{statistics.median(times):>9.3f}{q[98]:>9.3f}")


if __name__ == "__main__":
    main()
