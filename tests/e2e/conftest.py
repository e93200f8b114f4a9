"""A real OneToken server on a free local port, over the embedded store and over Redis.

The server runs on its own event loop in a background thread; tests talk to it through the real gRPC
client. The model is a small random-weights one (exactness does not depend on training).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest

from cache.factory import StoreConfig
from encoder_service.config import EncoderConfig
from llm_worker.client import OneTokenClient
from llm_worker.config import WorkerConfig
from llm_worker.server import RunningServer, start
from tests.cache.helpers import purge_prefix


class ServerThread:
    """Runs `llm_worker.server.start(config)` on an event loop of its own."""

    def __init__(self, config: WorkerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(start(config))

    def call(self, coro):
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=120)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def service(self):
        return self.running.service

    def stop(self) -> None:
        self.call(self.running.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def worker_config(model_dir: Path, store_url: str, index_dir: Path, prefix: str, **changes) -> WorkerConfig:
    config = WorkerConfig(
        store=StoreConfig(store_url, key_prefix=prefix),
        encoder=EncoderConfig(model_dir=str(model_dir), kv_dtype="fp32", backend="local"),
        port=0,
        index_dir=str(index_dir),
        index_follow_s=0,
    )
    return replace(config, **changes)


@pytest.fixture(scope="module", params=["lmdb", "redis", "tiered"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(store URL, key prefix) of each backend in turn (tiered: LMDB behind a hot tier in memory too
    small for every record); Redis keys are removed afterwards."""
    prefix = f"onetoken-e2e-{uuid.uuid4().hex[:10]}"
    if request.param in ("lmdb", "tiered"):
        path = tmp_path_factory.mktemp("lmdb") / "records"
        yield (str(path) if request.param == "lmdb" else f"tiered:memory:256KiB|{path}"), prefix
        return
    url = request.getfixturevalue("redis_url")
    yield url, prefix
    purge_prefix(url, prefix)


@pytest.fixture(scope="module")
def server(
    model_dir: Path, store_url: tuple, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    url, prefix = store_url
    config = worker_config(model_dir, url, tmp_path_factory.mktemp("index"), prefix, max_decode_batch=8)
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[OneTokenClient]:
    with OneTokenClient(server.address, timeout_s=60) as c:
        yield c
