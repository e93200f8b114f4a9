"""The record store interface. `cache.factory.open_store(StoreConfig)` picks a backend from a URL.

A store maps a `RecordKey` to the serialized bytes of one record (see `cache.serde`); it never looks
inside them. Every method is called by the encoder actors (writes) and the LLM worker (reads), from
any thread: implementations are thread-safe.

- `put(key, blob)`: store or overwrite.
- `get(key) -> bytes | None`: the blob, or None if the key is not found (never seen, deleted or evicted).
- `contains(key) -> bool`: whether `get` would return bytes, without transferring them.
- `delete(key) -> bool`: remove; True if the key existed.
- `put_many(items)` / `get_many(keys)`: the same for a batch in one round trip where the backend allows;
  `get_many` returns one entry per key, in order, None for each miss. Batches are not atomic.
- `get_prefixes(keys, size)`: the first `size` bytes of each blob (all of a shorter one), None for a miss,
  in one round trip where the backend allows. For reading a record's header and latent without its K/V
  (`cache.serde.read_latent`): 16 KiB of a 528 KiB record at paper size. Each prefix is read at once,
  so it never mixes two versions of a record. The default reads whole blobs; backends override it.
- `iter_ids(fingerprint) -> Iterator[str]`: image ids of one model's stored records, in no set order.
- `count(fingerprint) -> int`: how many records of one model are stored (a full key scan on Redis).
- `feed_position(fingerprint) -> FeedPosition`: the position after every change written so far to the
  model's change feed (`cache.feed`), which every put and delete appends to atomically with the write.
- `read_feed(fingerprint, after, limit) -> FeedRead`: up to `limit` changes after `after`, in order;
  `FeedTrimmedError` if changes after it were trimmed (the reader rebuilds from the store).
- `close()`: release connections or the environment; the store is unusable afterwards.

Network backends raise StoreUnavailableError once their bounded retries are spent; no method returns
None to hide an outage.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from types import TracebackType

from cache.feed import FeedPosition, FeedRead
from cache.keys import RecordKey

logger = logging.getLogger(__name__)


class RecordStore(ABC):
    """Bytes by `RecordKey`; see the module docstring for each method's contract."""

    @abstractmethod
    def put(self, key: RecordKey, blob: bytes) -> None: ...

    @abstractmethod
    def get(self, key: RecordKey) -> bytes | None: ...

    @abstractmethod
    def contains(self, key: RecordKey) -> bool: ...

    @abstractmethod
    def delete(self, key: RecordKey) -> bool: ...

    @abstractmethod
    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None: ...

    @abstractmethod
    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]: ...

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]:
        return [None if blob is None else blob[:size] for blob in self.get_many(keys)]

    @abstractmethod
    def iter_ids(self, fingerprint: str) -> Iterator[str]: ...

    def count(self, fingerprint: str) -> int:
        return sum(1 for _ in self.iter_ids(fingerprint))

    @abstractmethod
    def feed_position(self, fingerprint: str) -> FeedPosition: ...

    @abstractmethod
    def read_feed(self, fingerprint: str, after: FeedPosition, limit: int = 1024) -> FeedRead: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
