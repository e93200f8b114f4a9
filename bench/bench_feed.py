"""Indexes following the change feed, against the periodic full scan they replaced.

1. Propagation: two real gRPC workers on one private Redis, each following the feed at the default
   interval; an image is encoded on worker A, and worker B's Search is polled (every 2 ms) until it
   finds it. p50/p99 of the time from A's EncodeImage reply to B's first hit; each encode starts at a
   random moment of B's follow interval.
2. Sync cost at `--records` records (1 M by default) of one model on a private Redis: what one worker
   costs Redis in a minute, in Redis CPU seconds (INFO's used_cpu_user + used_cpu_sys) and in the
   worker's own wall time. The old refresh listed every record id (SCAN) every 30 s: 2 rounds a minute.
   The feed is read every 0.25 s: 240 reads a minute, here all finding nothing new (an idle minute)
   and then the cost of reading changes, per change.

    python bench/bench_feed.py [--records 1000000] [--images 100]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import redis

from cache.factory import StoreConfig, open_store
from cache.feed import FeedPosition
from cache.keys import RecordKey
from encoder_service.config import EncoderConfig
from htcvlm.checkpoint import load_pretrained
from htcvlm.data.dataset import ProceduralVQA
from htcvlm.defaults import DEFAULT_MODEL_DIR
from htcvlm.record import image_id_of
from llm_worker.client import OneTokenClient
from llm_worker.config import WorkerConfig
from llm_worker.server import start

FOLLOW_S = WorkerConfig().index_follow_s
OLD_REFRESH_S = 30.0  # the periodic scan the feed replaced


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir)]
    proc = subprocess.Popen([*args, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(500):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.01)
    raise RuntimeError("redis-server did not start")


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def pngs(n: int, image_size: int) -> list[bytes]:
    data = ProceduralVQA("test", n, image_size=image_size)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        data[i].image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def propagation(url: str, root: Path, model: str, images: list[bytes]) -> list[float]:
    def config(name: str) -> WorkerConfig:
        return WorkerConfig(
            store=StoreConfig(url, key_prefix="bench"),
            encoder=EncoderConfig(model_dir=model, backend="local"),
            port=0,
            index_dir=str(root / f"index-{name}"),
        )

    a, b = await start(config("a")), await start(config("b"))
    try:

        def measure() -> list[float]:
            delays = []
            with OneTokenClient(f"127.0.0.1:{a.port}") as ca, OneTokenClient(f"127.0.0.1:{b.port}") as cb:
                ca.encode(images[0])  # warm-up
                jitter = random.Random(0)
                for image in images[1:]:
                    # a random phase against B's follow loop: a client that encodes right after B's last
                    # hit would always wait almost a whole interval
                    time.sleep(jitter.uniform(0, FOLLOW_S))
                    image_id = ca.encode(image).image_id
                    encoded = time.perf_counter()
                    while True:
                        try:
                            if cb.search(1, image_id=image_id).hits:
                                break
                        except grpc.RpcError as e:
                            if e.code() != grpc.StatusCode.NOT_FOUND:  # not indexed there yet
                                raise
                        time.sleep(0.002)
                    delays.append((time.perf_counter() - encoded) * 1e3)
            return delays

        return await asyncio.to_thread(measure)
    finally:
        await a.stop()
        await b.stop()


def fill(url: str, records: int, tail: int) -> FeedPosition:
    """`records` keys of one model, and as many changes in its feed, written the way the store writes
    them (record bytes are a placeholder: listing and the feed never read them). Returns the feed's
    position `tail` changes before its end."""
    with open_store(StoreConfig(url, key_prefix="sync")) as store:
        batch = 2000
        for start_at in range(0, records - tail, batch):
            ids = (
                image_id_of(str(i).encode()) for i in range(start_at, min(records - tail, start_at + batch))
            )
            store.put_many([(RecordKey("m", i), b"x") for i in ids])
        before_tail = store.feed_position("m")
        ids = (image_id_of(str(i).encode()) for i in range(records - tail, records))
        store.put_many([(RecordKey("m", i), b"x") for i in ids])
    return before_tail


def sync_cost(url: str, records: int) -> dict[str, float]:
    raw = redis.Redis.from_url(url)
    tail = 10_000
    before_tail = fill(url, records, tail)
    with open_store(StoreConfig(url, key_prefix="sync")) as store:
        head = store.feed_position("m")
        assert head.seq == records, head

        cpu, started = redis_cpu(raw), time.perf_counter()
        listed = sum(1 for _ in store.iter_ids("m"))
        scan_wall, scan_cpu = time.perf_counter() - started, redis_cpu(raw) - cpu
        assert listed == records, listed

        reads = int(60 / FOLLOW_S)
        cpu, started = redis_cpu(raw), time.perf_counter()
        for _ in range(reads):
            assert not store.read_feed("m", head).changes
        idle_wall, idle_cpu = time.perf_counter() - started, redis_cpu(raw) - cpu

        cpu, started = redis_cpu(raw), time.perf_counter()
        position, changes = before_tail, 0
        while (read := store.read_feed("m", position, limit=256)).changes:
            position, changes = read.position, changes + len(read.changes)
        change_wall, change_cpu = time.perf_counter() - started, redis_cpu(raw) - cpu
        assert changes == tail and position == head
    memory = raw.info("memory")["used_memory"]
    raw.close()
    return {
        "scan_wall": scan_wall,
        "scan_cpu": scan_cpu,
        "idle_wall": idle_wall,
        "idle_cpu": idle_cpu,
        "change_wall": change_wall / tail,
        "change_cpu": change_cpu / tail,
        "memory": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, url = start_redis(root)
        try:
            image_size = load_pretrained(args.model).config.image_size
            delays = asyncio.run(propagation(url, root, args.model, pngs(args.images + 1, image_size)))
            cost = sync_cost(url, args.records)
        finally:
            proc.terminate()
            proc.wait(10)
    q = statistics.quantiles(delays, n=100)
    print(f"{os.cpu_count()} CPUs; workers follow the feed every {FOLLOW_S} s\n")
    print(f"EncodeImage on worker A -> Search hit on worker B, {len(delays)} images")
    print(f"  p50 {statistics.median(delays):.0f} ms   p99 {q[98]:.0f} ms   max {max(delays):.0f} ms\n")
    per_min_scan = 60 / OLD_REFRESH_S
    memory = cost["memory"] / 2**20
    print(f"index sync at {args.records:,} records of one model (Redis used_memory {memory:.0f} MiB)")
    print(f"{'':<44}{'Redis CPU s/min':>16}{'worker s/min':>14}")
    scan = (cost["scan_cpu"] * per_min_scan, cost["scan_wall"] * per_min_scan)
    idle = (cost["idle_cpu"], cost["idle_wall"])
    print(f"{'old: full SCAN every 30 s':<44}{scan[0]:>16.3f}{scan[1]:>14.3f}")
    print(f"{'feed: 240 reads, nothing new':<44}{idle[0]:>16.3f}{idle[1]:>14.3f}")
    print(f"{'  ratio old / feed':<44}{scan[0] / max(idle[0], 1e-9):>15.0f}x{scan[1] / idle[1]:>13.0f}x")
    print(
        f"feed: each change read costs {cost['change_cpu'] * 1e6:.1f} us of Redis CPU and "
        f"{cost['change_wall'] * 1e6:.1f} us of the worker's time (pages of 256)"
    )


if __name__ == "__main__":
    main()
