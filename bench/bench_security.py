"""What TLS and token authentication cost: Ask latency and throughput at concurrency 16, plaintext without
authentication against TLS with a bearer token checked on every call, two servers measured in alternating
rounds in one run (the shipped model, the embedded store, greedy answers of a fixed length).

    python bench/bench_security.py [--asks 20] [--concurrency 16] [--tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from PIL import Image

from cache.factory import StoreConfig
from encoder_service.config import EncoderConfig
from llm_worker.client import OneTokenClient
from llm_worker.config import WorkerConfig
from llm_worker.security import TokenTable, new_token
from llm_worker.server import start


def make_certs(directory: Path) -> None:
    """A throwaway CA and a certificate for localhost (the openssl command)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ("-newkey", "rsa:2048", "-nodes", "-days", "1")
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=bench-ca")
    run("req", *key[:3], "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-extfile", "ext", "-out", "server.crt")  # fmt: skip


class Served:
    """A server on its own event loop thread, and how to reach it."""

    def __init__(self, config: WorkerConfig, client_kwargs: dict) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.running = asyncio.run_coroutine_threadsafe(start(config), self.loop).result(timeout=300)
        self.address, self.client_kwargs = f"localhost:{self.running.port}", client_kwargs
        with OneTokenClient(self.address, **client_kwargs) as c:
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (30, 160, 40)).save(buf, "PNG")
            self.image_id = c.encode(buf.getvalue()).image_id

    def round(self, args: argparse.Namespace) -> tuple[float, float]:
        """(asks per second, median ms) of `concurrency` clients asking `asks` questions each."""

        def worker(_: int) -> list[float]:
            times = []
            with OneTokenClient(self.address, **self.client_kwargs) as client:
                client.wait_ready()  # the TLS handshake is not part of an Ask's latency
                for _ in range(args.asks):
                    started = time.perf_counter()
                    client.ask("What color is it?", image_id=self.image_id, max_new_tokens=args.tokens)
                    times.append((time.perf_counter() - started) * 1e3)
            return times

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            times = [t for chunk in pool.map(worker, range(args.concurrency)) for t in chunk]
        return len(times) / (time.perf_counter() - started), statistics.median(times)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(grace=1.0), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--asks", type=int, default=20, help="Asks per client")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens per answer")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_certs(root)
        token, line = new_token("admin")  # the bench encodes (writer) and asks (reader) with it
        base = WorkerConfig(
            store=StoreConfig(str(root / "plain")),
            encoder=EncoderConfig(backend="local"),
            port=0,
            index_dir=str(root / "plain-index"),
            index_follow_s=0,
        )
        secured = replace(
            base,
            store=StoreConfig(str(root / "tls")),
            index_dir=str(root / "tls-index"),
            tls_cert=str(root / "server.crt"),
            tls_key=str(root / "server.key"),
            tokens=TokenTable.parse(line),
        )
        servers = {
            "plaintext, no authentication": Served(base, {}),
            "TLS + bearer token": Served(secured, {"tls_ca": str(root / "ca.crt"), "token": token}),
        }
        # rounds alternate between the two servers, so drift in the machine's speed hits both alike
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, served in servers.items():
                results[name].append(served.round(args))
        for served in servers.values():
            served.stop()
    rows = [
        (name, (statistics.median(r for r, _ in got), statistics.median(p for _, p in got)))
        for name, got in results.items()
    ]
    print(
        f"{args.concurrency} concurrent clients x {args.asks} Asks, {args.tokens} greedy tokens each, "
        f"shipped model, embedded store; medians of {args.rounds} alternating rounds"
    )
    print(f"{'':<32}{'asks/s':>10}{'p50 ms':>10}")
    for name, (rate, p50) in rows:
        print(f"{name:<32}{rate:>10.1f}{p50:>10.1f}")
    (rate0, p0), (rate1, p1) = rows[0][1], rows[1][1]
    print(f"TLS + token cost: throughput x{rate1 / rate0:.3f}, median latency x{p1 / p0:.3f}")


if __name__ == "__main__":
    main()
