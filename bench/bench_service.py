"""The service end to end: ingestion efficiency and Ask latency/throughput under concurrency.

1. Ingestion: images/s of `onetoken ingest` (Ray Data, actor pool, store and index writes, a fresh
   store) against the bare batched `compress()` loop in one process over the same image bytes (decode
   of the files included in both), on the same torch threads as one encoder actor (`--threads`; Ray
   gives an actor with one CPU one thread). The ratio is the service's efficiency.
2. Ask: a real gRPC server on a free local port (embedded store, local encoder); p50/p99 latency per
   Ask and aggregate generated tokens/s with 1, 4 and 16 concurrent clients, each asking about its own
   cached image with greedy decoding of a fixed number of tokens.

    python bench/bench_service.py [--model DIR | --preset bench] [--images 256] [--asks 48] [--tokens 16]

`--preset NAME` runs a model of that geometry with random weights (the shipped tokenizer), saved to a
temporary folder: `bench` has the paper's 576 patches + 4 anchors at small widths.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from cache.factory import StoreConfig
from encoder_service.config import EncoderConfig
from encoder_service.ingest import IngestSummary, ingest
from htcvlm.checkpoint import load_pretrained, save_pretrained
from htcvlm.config import HTCConfig
from htcvlm.data.dataset import ProceduralVQA
from htcvlm.defaults import DEFAULT_MODEL_DIR
from htcvlm.model import new_model
from llm_worker.client import OneTokenClient
from llm_worker.config import WorkerConfig
from llm_worker.server import start


def write_corpus(folder: Path, n: int, image_size: int) -> list[Path]:
    folder.mkdir(parents=True)
    data = ProceduralVQA("test", n, image_size=image_size)
    paths = []
    for i in range(n):
        buf = io.BytesIO()
        data[i].image.save(buf, format="PNG")
        path = folder / f"{i:05d}.png"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def bare_compress(model_dir: str, paths: list[Path], batch: int) -> float:
    model = load_pretrained(model_dir)
    blobs = [p.read_bytes() for p in paths[:batch]]
    model.compress(blobs)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(paths), batch):
        model.compress([p.read_bytes() for p in paths[i : i + batch]])
    return len(paths) / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def ask_load(address: str, image_ids: list[str], concurrency: int, asks: int, tokens: int) -> tuple:
    latencies: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def worker(w: int) -> None:
        with OneTokenClient(address) as client:
            for i in range(w, asks, concurrency):
                started = time.perf_counter()
                reply = client.ask(
                    "what color is the circle?", image_id=image_ids[i % len(image_ids)], max_new_tokens=tokens
                )
                with lock:
                    latencies.append((time.perf_counter() - started) * 1e3)
                    generated[0] += reply.usage.completion_tokens

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return statistics.median(latencies), percentile(latencies, 99), generated[0] / wall


async def serve_and_measure(config: WorkerConfig, paths: list[Path], args: argparse.Namespace) -> list:
    running = await start(config)
    try:
        address = f"127.0.0.1:{running.port}"

        def measure() -> list:
            with OneTokenClient(address) as client:
                ids = [client.encode(p.read_bytes()).image_id for p in paths[:32]]
                client.ask("warm up", image_id=ids[0], max_new_tokens=2)
            return [(c, *ask_load(address, ids, c, args.asks, args.tokens)) for c in (1, 4, 16)]

        return await asyncio.to_thread(measure)
    finally:
        await running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--encoders", type=int, default=1)
    parser.add_argument("--asks", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--preset", default=None, help="random weights of this geometry instead of --model")
    parser.add_argument("--threads", type=int, default=1, help="the bare loop's: one encoder actor's")
    parser.add_argument("--skip-ask", action="store_true", help="measure ingestion only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.preset is not None:
            tokenizer = load_pretrained(DEFAULT_MODEL_DIR).tokenizer
            args.model = str(
                save_pretrained(new_model(HTCConfig.from_name(args.preset), tokenizer), root / "model")
            )
        image_size = load_pretrained(args.model).config.image_size
        paths = write_corpus(root / "corpus", args.images, image_size)
        bare = bare_compress(args.model, paths, args.batch)

        def run_ingest(folder: str, store: str) -> IngestSummary:
            config = EncoderConfig(model_dir=args.model, num_actors=args.encoders)
            return ingest(
                [folder],
                config,
                StoreConfig(str(root / store)),
                str(root / f"{store}-index"),
                batch_size=args.batch,
                show_progress=False,
            )

        # a quarter of the corpus into its own store first: the difference of the two runs is the
        # steady-state rate, without the fixed cost of starting actors and loading the model
        quarter = root / "quarter"
        quarter.mkdir()
        for p in paths[: args.images // 4]:
            (quarter / p.name).write_bytes(p.read_bytes())
        run_ingest(str(quarter), "warm-up")  # starts Ray, so neither timed pair pays for it
        small = run_ingest(str(quarter), "small")
        full = run_ingest(str(root / "corpus"), "records")
        again = run_ingest(str(root / "corpus"), "records")
        assert full.encoded == args.images and again.cached == args.images, (full, again)
        steady = (full.encoded - small.encoded) / (full.seconds - small.seconds)
        print(
            f"model {args.model}, {args.images} images of {image_size} px, batch {args.batch}, "
            f"{args.encoders} encoder actor(s), {args.threads} torch threads, {os.cpu_count()} CPUs\n"
        )
        print(f"{'ingestion':<46}{'images/s':>10}{'vs bare':>10}")
        rows = [
            ("bare compress() loop, one process", bare),
            (f"onetoken ingest, fresh store ({full.seconds:.1f} s in all)", full.images_per_s),
            (f"  steady state ({args.images // 4} -> {args.images} images)", steady),
            (f"onetoken ingest again, all cached ({again.seconds:.1f} s)", again.images_per_s),
        ]
        for name, rate in rows:
            print(f"{name:<46}{rate:>10.1f}{rate / bare:>9.2f}x")
        if args.skip_ask:
            return
        worker = WorkerConfig(
            store=StoreConfig(str(root / "serve")),
            encoder=EncoderConfig(model_dir=args.model, backend="local"),
            port=0,
            index_dir=str(root / "serve-index"),
            index_follow_s=0,
        )
        rows = asyncio.run(serve_and_measure(worker, paths, args))
    print(f"\nAsk over gRPC, {args.asks} asks per level, {args.tokens} greedy tokens each")
    print(f"{'concurrency':>11}{'p50 ms':>10}{'p99 ms':>10}{'tokens/s':>10}{'vs c=1':>9}")
    base = rows[0][3]
    for c, p50, p99, tps in rows:
        print(f"{c:>11}{p50:>10.1f}{p99:>10.1f}{tps:>10.1f}{tps / base:>8.2f}x")


if __name__ == "__main__":
    main()
