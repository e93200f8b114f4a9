"""Fixtures of the encoder-service tests; `model_dir`, `redis_url` and `ray_cluster` come
from tests/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`pytest.mark.anyio`) run on asyncio, the loop the gRPC server uses."""
    return "asyncio"
