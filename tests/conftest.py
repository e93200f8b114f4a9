"""Test-wide settings (no hub access ever, deterministic torch on few threads) and session fixtures
shared by the service tests: a small saved model and one local Ray cluster."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token to share
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cache.helpers import RedisClusterNodes

QUESTION = "What shape is the object on the left?"


@pytest.fixture(scope="session")
def tokenizer():
    """The small byte-level BPE of the test questions that every small test model uses."""
    from htcvlm.tokenizer import train_tokenizer
    from tests.htcvlm.helpers import QUESTIONS

    return train_tokenizer([q.lower() for q in [*QUESTIONS, QUESTION]] * 4, vocab_size=300)


@pytest.fixture(scope="session")
def small_model(tokenizer):
    """The small random-weights model whose answers run their full length (exactness and batching do
    not depend on training). Shared by the session: tests must not change its weights."""
    from tests.htcvlm.helpers import make_model

    return make_model(tokenizer, seed=3, never_eos=True)


@pytest.fixture(scope="session")
def model_dir(small_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_model` saved as a checkpoint, for the service tests."""
    from htcvlm.checkpoint import save_pretrained

    return save_pretrained(small_model, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole session (it takes seconds to start): two CPUs, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis at REDIS_URL; unreachable is a skip, or a failure under ONETOKEN_REQUIRE_REDIS=1."""
    import redis

    from tests.cache.helpers import REDIS_URL, redis_unreachable

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as e:
        redis_unreachable(f"no Redis answers at {REDIS_URL}: {e}")
    return REDIS_URL


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A private 6-node Redis Cluster (3 primaries, 3 replicas) on free ports, killed at teardown."""
    import shutil

    from tests.cache.helpers import RedisClusterNodes, redis_unreachable

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        redis_unreachable("redis-server or redis-cli is not installed, so no cluster can be started")
    cluster = RedisClusterNodes(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.kill_all()
