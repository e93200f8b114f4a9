"""Records beyond RAM: a bounded hot tier in memory (or Redis) in front of a disk tier that holds every
record.

The cold tier (LMDB on local disk, or any store every reader can reach) is the store of record: every
write lands there first, its change feed is the feed, and listing and counting read it. The hot tier
is a cache of recently used records: reads try it first, fall through to the cold tier on a miss and
promote what they find; writes go to both. The hot tier may drop any record at any time (its byte
budget, Redis's maxmemory policy, a restart) and nothing is lost, because the cold tier still holds it.

Hot tiers:
- `memory:SIZE` (e.g. `memory:4GiB`): an LRU of blobs in this process, bounded by their bytes. Each
  process has its own; nothing to run. Other processes' writes and deletes reach it through the cold
  tier's change feed, read before every lookup (one LMDB cursor seek), so it never answers with a
  deleted or replaced record.
- a `redis://` / `rediss://` URL: a Redis shared by every process, run with `maxmemory` and an
  `allkeys-lru` policy. It writes no change feed of its own.

A hot tier that fails (Redis down) never fails a read or a write that the cold tier can serve: the
call goes on without it, with a warning. A delete must reach both tiers (a stale hot copy would answer
for a deleted image), so a hot tier that cannot delete fails the delete.

URL: `tiered:HOT|COLD`, e.g. `tiered:memory:4GiB|/data/records` or
`tiered:redis://cache:6379/0|lmdb:///data/records` (`|` never occurs in a URL).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from cache.errors import CacheError
from cache.feed import FeedPosition, FeedRead, FeedTrimmedError
from cache.keys import RecordKey
from cache.store import RecordStore

logger = logging.getLogger(__name__)


def split_tiered_url(url: str) -> tuple[str, str]:
    """'tiered:HOT|COLD' -> (HOT, COLD)."""
    body = url.removeprefix("tiered:")
    hot, sep, cold = body.partition("|")
    if not sep or not hot or not cold or "|" in cold:
        raise ValueError(
            f"a tiered store URL is tiered:HOT|COLD, e.g. tiered:memory:4GiB|/data/records; got {url!r}"
        )
    return hot, cold


class HotTier(Protocol):
    """What the tiered store needs of its hot tier; a miss is None."""

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]: ...

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]: ...

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None: ...

    def delete(self, key: RecordKey) -> bool: ...

    def close(self) -> None: ...


class MemoryTier:
    """An LRU of blobs in process memory, holding at most `max_bytes` of them; thread-safe. A blob larger
    than the whole budget is not kept."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blobs: OrderedDict[RecordKey, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blobs)

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        with self._lock:
            found = [self._blobs.get(key) for key in keys]
            for key, blob in zip(keys, found, strict=True):
                if blob is not None:
                    self._blobs.move_to_end(key)
        return found

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]:
        # no move_to_end: a prefix read (re-ranking scans hundreds of candidates) is no sign of use
        with self._lock:
            return [None if (blob := self._blobs.get(key)) is None else blob[:size] for key in keys]

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        with self._lock:
            for key, blob in items:
                old = self._blobs.pop(key, None)
                if old is not None:
                    self.bytes -= len(old)
                if len(blob) > self.max_bytes:
                    continue
                self._blobs[key] = blob
                self.bytes += len(blob)
            while self.bytes > self.max_bytes:
                _, evicted = self._blobs.popitem(last=False)
                self.bytes -= len(evicted)

    def delete(self, key: RecordKey) -> bool:
        with self._lock:
            blob = self._blobs.pop(key, None)
            if blob is not None:
                self.bytes -= len(blob)
            return blob is not None

    def clear(self) -> None:
        with self._lock:
            self._blobs.clear()
            self.bytes = 0

    def close(self) -> None:
        self.clear()


@dataclass
class TierCounts:
    """Records read, by where they were found: hot, cold (then promoted), or nowhere."""

    hot: int = 0
    cold: int = 0
    missed: int = 0


class TieredStore(RecordStore):
    """See the module docstring. A `MemoryTier` belongs to this process alone, so the deletes other
    processes make are learned from the cold tier's feed; a shared (Redis) hot tier sees them itself."""

    def __init__(self, hot: HotTier, cold: RecordStore) -> None:
        self.hot = hot
        self.cold = cold
        self.counts = TierCounts()
        self._counts_lock = threading.Lock()
        self._feeds: dict[str, FeedPosition] = {}  # per model: the cold feed read up to here
        self._feeds_lock = threading.Lock()

    def _forget_changed(self, keys: Sequence[RecordKey]) -> None:
        """Drop from a private hot tier every record written or deleted since it last looked, by any
        process (the cold tier's feed lists them): another process may have deleted a record or
        replaced it (a damaged one re-encoded), and this tier must not answer with the old bytes. A model
        seen for the first time starts at the feed's end: nothing of it can be in the tier from before."""
        if not isinstance(self.hot, MemoryTier):
            return
        with self._feeds_lock:
            for fingerprint in {key.fingerprint for key in keys}:
                position = self._feeds.get(fingerprint)
                if position is None:
                    self._feeds[fingerprint] = self.cold.feed_position(fingerprint)
                    continue
                try:
                    while (read := self.cold.read_feed(fingerprint, position)).changes:
                        for change in read.changes:
                            self.hot.delete(RecordKey(fingerprint, change.image_id))
                        position = read.position
                except FeedTrimmedError:  # fell behind: what it holds cannot be trusted
                    logger.warning("hot tier cleared: the change feed of model %s moved past it", fingerprint)
                    self.hot.clear()
                    position = self.cold.feed_position(fingerprint)
                self._feeds[fingerprint] = position

    def _hot_get(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        try:
            return self.hot.get_many(keys)
        except CacheError as e:
            logger.warning("hot tier read failed, reading the disk tier: %s", e)
            return [None] * len(keys)

    def _hot_put(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        try:
            self.hot.put_many(items)
        except CacheError as e:  # the cold tier holds them: the next read promotes them
            logger.warning("hot tier write of %d records failed: %s", len(items), e)

    def put(self, key: RecordKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        self._forget_changed([key for key, _ in items])
        self.cold.put_many(items)  # the store of record first: a write that returned is on disk
        self._hot_put(items)

    def get(self, key: RecordKey) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        self._forget_changed(keys)
        found = self._hot_get(keys)
        missing = [n for n, blob in enumerate(found) if blob is None]
        promoted: list[tuple[RecordKey, bytes]] = []
        if missing:
            for n, blob in zip(missing, self.cold.get_many([keys[n] for n in missing]), strict=True):
                if blob is not None:
                    found[n] = blob
                    promoted.append((keys[n], blob))
            if promoted:
                self._hot_put(promoted)
        with self._counts_lock:
            self.counts.hot += len(keys) - len(missing)
            self.counts.cold += len(promoted)
            self.counts.missed += len(missing) - len(promoted)
        return found

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]:
        """Hot tier first, the rest from the cold tier; nothing is promoted: re-ranking reads the prefixes
        of hundreds of candidates per search, which would flush the records actually being asked about."""
        self._forget_changed(keys)
        try:
            found = self.hot.get_prefixes(keys, size)
        except CacheError as e:
            logger.warning("hot tier read failed, reading the disk tier: %s", e)
            found = [None] * len(keys)
        missing = [n for n, prefix in enumerate(found) if prefix is None]
        cold = self.cold.get_prefixes([keys[n] for n in missing], size) if missing else []
        for n, prefix in zip(missing, cold, strict=True):
            found[n] = prefix
        return found

    def contains(self, key: RecordKey) -> bool:
        return self.cold.contains(key)  # it holds every record, without transferring any

    def delete(self, key: RecordKey) -> bool:
        # hot, cold, hot again: a read between the first two could promote the record back
        self.hot.delete(key)
        deleted = self.cold.delete(key)
        self.hot.delete(key)
        return deleted

    def iter_ids(self, fingerprint: str) -> Iterator[str]:
        return self.cold.iter_ids(fingerprint)

    def count(self, fingerprint: str) -> int:
        return self.cold.count(fingerprint)

    def feed_position(self, fingerprint: str) -> FeedPosition:
        return self.cold.feed_position(fingerprint)

    def read_feed(self, fingerprint: str, after: FeedPosition, limit: int = 1024) -> FeedRead:
        return self.cold.read_feed(fingerprint, after, limit)

    def close(self) -> None:
        self.hot.close()
        self.cold.close()
