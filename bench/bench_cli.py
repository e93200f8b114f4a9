"""Wall time of the client commands a user types: `onetoken search --help` and `onetoken ask` (one short
answer from a running server), for this checkout and, with `--against DIR`, an older one side by side.

One server (this checkout's, the shipped model, the embedded store) answers both clients, so what
differs is only the client process: its imports and its start-up.

    python bench/bench_cli.py [--against ../older-checkout] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from llm_worker.client import OneTokenClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wall_s(argv: list[str], pythonpath: Path, repeats: int) -> float:
    """Median wall time of `python -m llm_worker.cli ARGV` with imports from `pythonpath`."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1"}
    times = []
    for _ in range(repeats + 1):  # the first run warms the file cache
        started = time.perf_counter()
        # run from the checkout: `python -m` puts the working directory first on sys.path
        done = subprocess.run(
            [sys.executable, "-m", "llm_worker.cli", *argv], env=env, cwd=pythonpath, capture_output=True
        )
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} failed: {done.stderr.decode()[-1000:]}")
    return statistics.median(times[1:])


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--against", type=Path, help="an older checkout to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "ONETOKEN_STORE": f"{tmp}/records",
            "ONETOKEN_INDEX_DIR": f"{tmp}/index",
            "ONETOKEN_ENCODER_BACKEND": "local",
            "ONETOKEN_PORT": str(port),
        }
        server = subprocess.Popen([sys.executable, "-m", "llm_worker.cli", "serve"], env=env)
        try:
            address = f"127.0.0.1:{port}"
            with OneTokenClient(address) as client:
                try:
                    client.wait_ready(timeout_s=120)
                except grpc.FutureTimeoutError:
                    raise RuntimeError("the server did not come up") from None
                from PIL import Image

                image = Path(tmp) / "image.png"
                Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
                image_id = client.encode(image.read_bytes()).image_id
            commands = {
                "onetoken search --help": ["search", "--help"],
                "onetoken ask (4 tokens)": [
                    "ask",
                    "--image-id",
                    image_id,
                    "--max-new-tokens",
                    "4",
                    "--address",
                    address,
                    "Color?",
                ],
            }
            checkouts = {"this checkout": ROOT} | ({"--against": args.against} if args.against else {})
            print(f"median wall time of {args.repeats} runs, one server for all")
            print(f"{'command':<28}" + "".join(f"{name:>16}" for name in checkouts) + f"{'ratio':>10}")
            for name, argv in commands.items():
                times = [wall_s(argv, path, args.repeats) for path in checkouts.values()]
                ratio = f"{times[1] / times[0]:>9.1f}x" if len(times) == 2 else ""
                print(f"{name:<28}" + "".join(f"{t:>15.2f}s" for t in times) + ratio)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
