"""Records on Redis: redis-py with hiredis, one connection pool, bounded retries.

Everything about the connection comes from the URL as redis-py reads it: `redis://user:password@host:port/db`
for password/ACL, `rediss://` for TLS (with `ssl_ca_certs=`, `ssl_cert_reqs=` ... as query arguments).
Batches are pipelines of single-key commands, one round trip (never MGET/MSET, which a cluster could not
split across hash slots: see `cache.keys` for the slot design); writes and deletes are one MULTI/EXEC
with their change feed entries (below). This class speaks to one node; Redis Cluster needs a
`RedisCluster` client in its place and a SCAN per primary in `iter_ids`.

The change feed (`cache.feed`) of a model is a Redis Stream, `<prefix>:<fingerprint>:feed`, with one
entry per put or delete (`op`, `id`), appended in the same MULTI/EXEC as the write and trimmed
approximately (`XADD MAXLEN ~`) to `feed_length` entries. XINFO STREAM's `entries-added` minus its
`length` is how many changes were trimmed (the store never XDELs), which tells a reader whether it fell
behind: this needs Redis 7.0 or newer. On a Redis Cluster the feed key and a record key lie in different
slots, so the two could not share a MULTI; this class speaks to one node.

Least privilege: the store sends only GET, GETRANGE, SET, EXISTS, DEL, SCAN, MULTI, EXEC, XADD, XRANGE
and XINFO STREAM, on keys under its prefix. An ACL user for it (`redis_acl_rule(prefix)`, e.g. `ACL
SETUSER onetoken on >PASSWORD resetkeys ~onetoken:* resetchannels -@all +get +getrange +set +exists
+del +scan +multi +exec +xadd +xrange +xinfo|stream`) can do nothing else: no FLUSHALL, CONFIG, KEYS,
EVAL or MODULE, and no key outside the prefix.

Under `maxmemory` with an LRU policy Redis may evict any record: that is an ordinary miss here, and
`cache.records.lookup` tells it apart from an image never seen by asking the vector index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError
from redis.retry import Retry

from cache.errors import StoreFullError, StoreUnavailableError
from cache.feed import DEFAULT_FEED_LENGTH, Change, FeedPosition, FeedRead, Op, check_trimmed
from cache.keys import DEFAULT_PREFIX, RecordKey, check_name, record_key_prefix
from cache.retry import RetryPolicy, call_with_retry
from cache.store import RecordStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Worth retrying: the server is restarting, loading its AOF (BusyLoadingError is a ConnectionError),
# the network dropped, or a cluster is failing over (no primary for a slot yet: CLUSTERDOWN, TRYAGAIN,
# a topology the client cannot map). AuthenticationError is a ConnectionError too but is not
# transient; see _call.
_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
)


# every command the store sends
COMMANDS = (
    "get",
    "getrange",
    "set",
    "exists",
    "del",
    "scan",
    "multi",
    "exec",
    "xadd",
    "xrange",
    "xinfo|stream",
)


def redis_acl_rule(prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL rules (after `ACL SETUSER NAME on >PASSWORD`) that let a user run exactly this store."""
    commands = " ".join(f"+{c}" for c in COMMANDS)
    return f"resetkeys ~{check_name('prefix', prefix)}:* resetchannels -@all {commands}"


@dataclass(frozen=True)
class RedisConfig:
    url: str
    key_prefix: str = DEFAULT_PREFIX
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Each attempt must fail fast so that the retry budget, not a socket, bounds a call.
    socket_timeout_s: float = 2.0
    socket_connect_timeout_s: float = 1.0
    max_connections: int = 64
    scan_count: int = 1000  # keys per SCAN page
    feed_length: int = DEFAULT_FEED_LENGTH  # changes kept per model in the change feed (about)
    # False for a cache in front of another store (a tiered store's hot tier): that store's feed is
    # the one of record, and this one writes none
    feed: bool = True
    cluster: bool = False  # a Redis Cluster: url names any one of its nodes

    def __post_init__(self) -> None:
        check_name("key_prefix", self.key_prefix)
        if not self.url.startswith(("redis://", "rediss://")):
            raise ValueError(f"RedisStore needs a redis:// or rediss:// URL, got {self.url!r}")


class RedisStore(RecordStore):
    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        connection = {
            "max_connections": config.max_connections,
            "socket_timeout": config.socket_timeout_s,
            "socket_connect_timeout": config.socket_connect_timeout_s,
            # redis-py's own retries would run inside ours and stretch the time bound
            "retry": Retry(NoBackoff(), 0),
        }
        parts = urlsplit(config.url)
        self._where = f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or '/0'}"
        self._client: redis.Redis | RedisCluster
        if config.cluster:
            self._where = f"cluster via {self._where}"
            self._client = self._call("connect", lambda: RedisCluster.from_url(config.url, **connection))
        else:
            self._client = redis.Redis(
                connection_pool=redis.ConnectionPool.from_url(config.url, **connection)
            )
        logger.info("Redis store at %s with key prefix %s", self._where, config.key_prefix)

    def _safe_url(self) -> str:
        return self._where

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except redis.AuthenticationError as e:
                raise StoreUnavailableError(
                    f"Redis at {self._safe_url()} rejected the credentials: {e}; check the user and "
                    "password in the store URL"
                ) from e
            except redis.exceptions.OutOfMemoryError as e:
                raise StoreFullError(
                    f"Redis at {self._safe_url()} is out of memory under a noeviction policy: {e}; "
                    "raise maxmemory or choose an allkeys-lru policy"
                ) from e
            except _TRANSIENT:
                if isinstance(getattr(self, "_client", None), RedisCluster):
                    self._remap_cluster()
                raise

        return call_with_retry(attempt, self.config.retry, _TRANSIENT, f"Redis {what} at {self._safe_url()}")

    def _remap_cluster(self) -> None:
        """After a failed call on a cluster, ask the nodes that answer who serves each slot now: the
        client's map still names a primary that died, and its pipelines do not remap by themselves."""
        assert isinstance(self._client, RedisCluster)
        try:
            self._client.nodes_manager.initialize()
        except (*_TRANSIENT, redis.RedisError) as e:  # no node answers yet: the next attempt asks again
            logger.info("cannot map the Redis Cluster's slots yet: %s", e)

    def _k(self, key: RecordKey) -> str:
        return key.to_str(self.config.key_prefix)

    def _feed(self, fingerprint: str) -> str:
        return f"{self.config.key_prefix}:{check_name('fingerprint', fingerprint)}:feed"

    def _append(self, pipe: redis.client.Pipeline, key: RecordKey, op: Op) -> None:
        fields = {"op": op, "id": key.image_id}
        pipe.xadd(self._feed(key.fingerprint), fields, maxlen=self.config.feed_length, approximate=True)

    def put(self, key: RecordKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def get(self, key: RecordKey) -> bytes | None:
        return self._call("GET", lambda: self._client.get(self._k(key)))

    def contains(self, key: RecordKey) -> bool:
        return bool(self._call("EXISTS", lambda: self._client.exists(self._k(key))))

    def delete(self, key: RecordKey) -> bool:
        def run() -> bool:
            pipe = self._client.pipeline(transaction=self.config.feed and not self.config.cluster)
            pipe.delete(self._k(key))
            if self.config.cluster and self.config.feed:  # the record first, then its change
                deleted = bool(pipe.execute()[0])
                pipe = self._client.pipeline(transaction=False)
                self._append(pipe, key, "delete")
                pipe.execute()
                return deleted
            if self.config.feed:
                self._append(pipe, key, "delete")
            return bool(pipe.execute()[0])

        # after a retried DEL that had already landed this says False: the key is gone either way
        return self._call("DEL", run)

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        def run() -> None:
            # one MULTI/EXEC: the feed entries land with the records or not at all (on a cluster: the
            # records first, then their changes)
            pipe = self._client.pipeline(transaction=self.config.feed and not self.config.cluster)
            for key, blob in items:
                pipe.set(self._k(key), blob)
                if self.config.feed and not self.config.cluster:
                    self._append(pipe, key, "put")
            pipe.execute()
            if self.config.feed and self.config.cluster:
                pipe = self._client.pipeline(transaction=False)
                for key, _ in items:
                    self._append(pipe, key, "put")
                pipe.execute()

        if items:
            # a retried batch repeats every SET and appends its changes again; both are idempotent
            # for readers, so that is safe
            self._call(f"SET x{len(items)}", run)

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        def run() -> list[bytes | None]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self._k(key))
            return pipe.execute()

        return self._call(f"pipelined GET x{len(keys)}", run) if keys else []

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]:
        def run() -> list[bytes | None]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(self._k(key), 0, size - 1)  # both ends inclusive
            # GETRANGE answers b"" for a missing key; a stored blob is never empty
            return [raw or None for raw in pipe.execute()]

        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return self._call(f"pipelined GETRANGE x{len(keys)}", run) if keys else []

    def iter_ids(self, fingerprint: str) -> Iterator[str]:
        start = record_key_prefix(fingerprint, self.config.key_prefix)
        match = start + "*"  # prefix and fingerprint hold no glob characters (checked in keys.py)
        if self.config.cluster:  # a SCAN of every primary, retried whole if a node fails midway
            raw_keys = self._call(
                "SCAN", lambda: set(self._client.scan_iter(match=match, count=self.config.scan_count))
            )
            for raw in raw_keys:
                yield RecordKey.parse(raw.decode(), self.config.key_prefix).image_id
            return
        seen: set[str] = set()  # SCAN may return a key more than once
        cursor = 0
        while True:
            # bind the cursor now: the lambda runs inside the retry loop
            cursor, raw_keys = self._call(
                "SCAN", lambda c=cursor: self._client.scan(c, match=match, count=self.config.scan_count)
            )
            for raw in raw_keys:
                image_id = RecordKey.parse(raw.decode(), self.config.key_prefix).image_id
                if image_id not in seen:
                    seen.add(image_id)
                    yield image_id
            if cursor == 0:
                return

    def _feed_state(self, info: Any) -> tuple[FeedPosition, int]:
        """(the position after the last change, changes trimmed) from XINFO STREAM's reply, or from
        its error where the stream does not exist (nothing written yet, or the key was lost)."""
        if isinstance(info, Exception):
            if "no such key" not in str(info):
                raise info
            return FeedPosition(), 0
        info = {_text(k): v for k, v in _pairs(info).items()}  # a cluster's transactions leave replies raw
        written, length = int(info["entries-added"]), int(info["length"])
        return FeedPosition(_text(info["last-generated-id"]), written), written - length

    def feed_position(self, fingerprint: str) -> FeedPosition:
        def run() -> Any:
            try:
                return self._client.xinfo_stream(self._feed(fingerprint))
            except redis.ResponseError as e:  # no such key: nothing written yet
                return e

        return self._feed_state(self._call("XINFO STREAM", run))[0]

    def read_feed(self, fingerprint: str, after: FeedPosition, limit: int = 1024) -> FeedRead:
        feed = self._feed(fingerprint)

        def run() -> list[Any]:
            # one MULTI/EXEC: the trimmed count is the one the entries were read under
            pipe = self._client.pipeline(transaction=True)
            pipe.xrange(feed, f"({after.offset}" if after.offset else "-", "+", count=limit)
            pipe.xinfo_stream(feed)
            return pipe.execute(raise_on_error=False)

        entries, info = self._call("XRANGE", run)
        if isinstance(entries, Exception):
            raise entries
        head, trimmed = self._feed_state(info)
        check_trimmed(fingerprint, after, trimmed, head.seq)
        changes = []
        for _, raw_fields in entries:
            fields = _pairs(raw_fields)
            changes.append(Change.read(_text(fields[b"op"]), _text(fields[b"id"]), fingerprint))
        if not changes:
            return FeedRead([], after)
        return FeedRead(changes, FeedPosition(_text(entries[-1][0]), after.seq + len(changes)))

    def close(self) -> None:
        if isinstance(self._client, RedisCluster):
            self._client.close()
        else:
            self._client.connection_pool.disconnect()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(reply: Any) -> dict[Any, Any]:
    """A reply of field/value pairs as a dict: as parsed, or raw ([f1, v1, f2, v2, ...])."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
