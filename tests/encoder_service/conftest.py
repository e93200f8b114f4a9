"""Fixtures of the encoder-service tests; `model_dir` and `ray_cluster` come from tests/conftest.py."""

from __future__ import annotations

import pytest
import redis

from tests.cache.helpers import REDIS_URL, redis_unreachable


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis at REDIS_URL; skipped (or failed under ONETOKEN_REQUIRE_REDIS=1) if unreachable."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        redis_unreachable(f"no Redis answers at {REDIS_URL}: {e}")
    return REDIS_URL


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`pytest.mark.anyio`) run on asyncio, the loop the gRPC server uses."""
    return "asyncio"
