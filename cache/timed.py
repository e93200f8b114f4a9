"""A store wrapper that times every call: `TimedStore(inner, observe)` calls `observe(StoreCall(op, seconds,
error))` after each operation of `inner` (`error`: the name of the exception it raised, or None), and
otherwise behaves exactly as `inner` (see `cache.store` for the contract).

The worker feeds its Prometheus metrics from it directly; the encoders, which run in Ray actors, keep
their calls in a `StoreCalls` list and hand them back with each batch, so their store latency reaches
the worker's metrics endpoint too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cache.feed import FeedPosition, FeedRead
from cache.keys import RecordKey
from cache.store import RecordStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreCall:
    op: str  # the RecordStore method
    seconds: float
    error: str | None  # the exception type's name if the call raised


Observe = Callable[[StoreCall], None]


class StoreCalls:
    """An `Observe` that keeps calls until `take()`: thread-safe, bounded (the oldest are dropped)."""

    def __init__(self, limit: int = 10_000) -> None:
        self._calls: list[StoreCall] = []
        self._lock = threading.Lock()
        self._limit = limit

    def __call__(self, call: StoreCall) -> None:
        with self._lock:
            if len(self._calls) >= self._limit:
                del self._calls[: len(self._calls) // 2]
            self._calls.append(call)

    def take(self) -> list[StoreCall]:
        """Every call kept since the last take, oldest first."""
        with self._lock:
            calls, self._calls = self._calls, []
        return calls


class TimedStore(RecordStore):
    def __init__(self, inner: RecordStore, observe: Observe) -> None:
        self.inner = inner
        self.observe = observe

    @contextmanager
    def _timed(self, op: str) -> Iterator[None]:
        started = time.perf_counter()
        error: str | None = None
        try:
            yield
        except Exception as e:  # not GeneratorExit: a caller that stops iter_ids early is no error
            error = type(e).__name__
            raise
        finally:
            self.observe(StoreCall(op, time.perf_counter() - started, error))

    def put(self, key: RecordKey, blob: bytes) -> None:
        with self._timed("put"):
            self.inner.put(key, blob)

    def get(self, key: RecordKey) -> bytes | None:
        with self._timed("get"):
            return self.inner.get(key)

    def contains(self, key: RecordKey) -> bool:
        with self._timed("contains"):
            return self.inner.contains(key)

    def delete(self, key: RecordKey) -> bool:
        with self._timed("delete"):
            return self.inner.delete(key)

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        with self._timed("put_many"):
            self.inner.put_many(items)

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        with self._timed("get_many"):
            return self.inner.get_many(keys)

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]:
        with self._timed("get_prefixes"):
            return self.inner.get_prefixes(keys, size)

    def iter_ids(self, fingerprint: str) -> Iterator[str]:
        with self._timed("iter_ids"):  # from the first id to the last (or until the caller stops)
            yield from self.inner.iter_ids(fingerprint)

    def count(self, fingerprint: str) -> int:
        with self._timed("count"):
            return self.inner.count(fingerprint)

    def feed_position(self, fingerprint: str) -> FeedPosition:
        with self._timed("feed_position"):
            return self.inner.feed_position(fingerprint)

    def read_feed(self, fingerprint: str, after: FeedPosition, limit: int = 1024) -> FeedRead:
        with self._timed("read_feed"):
            return self.inner.read_feed(fingerprint, after, limit)

    def close(self) -> None:
        self.inner.close()
