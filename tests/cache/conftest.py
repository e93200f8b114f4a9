"""Fixtures of the cache tests: a store of every backend and private Redis servers.

Tests on the shared Redis at REDIS_URL work under a key prefix of their own and delete it afterwards;
tests that stop, restart or squeeze Redis start a private `redis-server` on a free port in a temp dir
and never touch the shared one.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.redis_store import RedisConfig, RedisStore
from cache.retry import RetryPolicy
from cache.store import RecordStore
from cache.tiered import MemoryTier, TieredStore

from .helpers import RedisServer, purge_prefix, redis_unreachable


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisStore]:
    prefix = f"onetoken-test-{uuid.uuid4().hex[:12]}"
    store = RedisStore(RedisConfig(url=redis_url, key_prefix=prefix, retry=RetryPolicy(total_s=2.0)))
    yield store
    store.close()
    purge_prefix(redis_url, prefix)


@pytest.fixture
def lmdb_store(tmp_path: Path) -> Iterator[LmdbStore]:
    store = LmdbStore(LmdbConfig(path=str(tmp_path / "lmdb")))
    yield store
    store.close()


@pytest.fixture
def tiered_store(tmp_path: Path) -> Iterator[TieredStore]:
    """LMDB on disk behind a 64 KiB hot tier in memory: a few small records each, so tests evict."""
    store = TieredStore(MemoryTier(64 << 10), LmdbStore(LmdbConfig(path=str(tmp_path / "cold"))))
    yield store
    store.close()


@pytest.fixture(params=["lmdb", "redis", "tiered"])
def store(request: pytest.FixtureRequest) -> RecordStore:
    """Each backend in turn: every test that takes `store` runs against all three."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """A factory of private servers (`redis_server("--maxmemory", "4mb")`), all killed at teardown."""
    if shutil.which("redis-server") is None:
        redis_unreachable("redis-server is not installed, so no private server can be started")
    servers: list[RedisServer] = []

    def start(*options: str, tls_dir: Path | None = None) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, *options, tls_dir=tls_dir)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
