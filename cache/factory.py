"""Opening a record store: `StoreConfig` (URL, key prefix, retry budget) and `open_store`, which picks the
backend from the URL's scheme. The worker, the encoders and ingest all open their store from one
`StoreConfig`, so they can never disagree about where records live.

- `redis://[user:password@]host:port/db` and `rediss://...` (TLS; `?ssl_cert_reqs=...&ssl_ca_certs=...` as
  redis-py reads them): a `RedisStore`; the key prefix namespaces its keys, `retry_s` bounds reconnects.
  `redis+cluster://host:port` and `rediss+cluster://...`: the same on a Redis Cluster, through any one
  of its nodes.
- `lmdb:///abs/path`, `lmdb://rel/path` or a plain path: the embedded `LmdbStore` (created if absent).
- `tiered:HOT|COLD`: a `TieredStore`, records on the COLD store (any of the above) with a bounded hot
  tier in front, `memory:SIZE` (this process) or a Redis URL (shared); see `cache.tiered`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from cache.feed import DEFAULT_FEED_LENGTH
from cache.keys import DEFAULT_PREFIX, check_name
from cache.retry import RetryPolicy
from cache.store import RecordStore
from cache.tiered import HotTier, MemoryTier, TieredStore, split_tiered_url
from htcvlm.sizes import parse_size

logger = logging.getLogger(__name__)

DEFAULT_STORE_URL = ".onetoken/records"  # a plain path: the embedded LMDB store, no server needed
REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
SCHEMES = (*REDIS_SCHEMES, "lmdb", "tiered", "")  # "" is a plain path


@dataclass(frozen=True)
class StoreConfig:
    url: str = DEFAULT_STORE_URL
    key_prefix: str = DEFAULT_PREFIX  # namespaces every key: several deployments can share one Redis
    retry_s: float = 10.0  # how long a network store retries one call before StoreUnavailableError
    # Changes kept per model in the change feed: an index that falls further behind rebuilds.
    feed_length: int = DEFAULT_FEED_LENGTH

    def __post_init__(self) -> None:
        check_name("key_prefix", self.key_prefix)
        if self.retry_s < 0:
            raise ValueError(f"retry_s must be >= 0, got {self.retry_s}")
        if self.feed_length <= 0:
            raise ValueError(f"feed_length must be positive, got {self.feed_length}")
        scheme = urlsplit(self.url).scheme
        if scheme not in SCHEMES:
            choices = "redis://, rediss://, redis+cluster://, lmdb://, tiered:HOT|COLD or a path"
            raise ValueError(f"unknown store URL scheme {scheme!r} in {self.url!r}; use {choices}")
        if scheme == "tiered":
            hot, cold = split_tiered_url(self.url)
            if not hot.startswith(("memory:", *(f"{scheme}://" for scheme in REDIS_SCHEMES))):
                raise ValueError(f"a tiered store's hot tier is memory:SIZE or a Redis URL, got {hot!r}")
            if hot.startswith("memory:"):
                parse_size(hot.removeprefix("memory:"), "a memory tier")
            if urlsplit(cold).scheme == "tiered":
                raise ValueError(f"a tiered store's cold tier cannot be tiered itself: {self.url!r}")
            replace(self, url=cold)  # a config of the cold URL alone: validated like any other


def open_store(config: StoreConfig) -> RecordStore:
    """Open the store `config.url` names (see the module docstring); `close()` it when done."""
    scheme = urlsplit(config.url).scheme
    if scheme == "tiered":
        hot_url, cold_url = split_tiered_url(config.url)
        cold = open_store(replace(config, url=cold_url))
        try:
            hot = _open_hot_tier(config, hot_url)
        except BaseException:
            cold.close()
            raise
        return TieredStore(hot, cold)
    if scheme in REDIS_SCHEMES:
        return _open_redis(config, feed=True)
    from cache.lmdb_store import LmdbConfig, LmdbStore

    path = lmdb_path(config.url)
    return LmdbStore(LmdbConfig(path=path, key_prefix=config.key_prefix, feed_length=config.feed_length))


def _open_redis(config: StoreConfig, feed: bool) -> RecordStore:
    from cache.redis_store import RedisConfig, RedisStore  # redis-py only where Redis is used

    retry = RetryPolicy(total_s=config.retry_s)
    cluster = "+cluster://" in config.url.split("?")[0]
    return RedisStore(
        RedisConfig(
            url=config.url.replace("+cluster://", "://", 1) if cluster else config.url,
            cluster=cluster,
            key_prefix=config.key_prefix,
            retry=retry,
            feed_length=config.feed_length,
            feed=feed,
        )
    )


def _open_hot_tier(config: StoreConfig, url: str) -> HotTier:
    if url.startswith("memory:"):
        return MemoryTier(parse_size(url.removeprefix("memory:"), "a memory tier"))
    return _open_redis(replace(config, url=url), feed=False)  # a RedisStore has every method a hot tier needs


def lmdb_path(url: str) -> str:
    """The directory an `lmdb://` URL or plain path names: lmdb:///abs -> /abs, lmdb://rel/x -> rel/x."""
    if not url.startswith("lmdb:"):
        return url
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if not path:
        raise ValueError(f"lmdb URL {url!r} names no directory")
    return path
