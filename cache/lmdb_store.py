"""The embedded default store: one LMDB environment on local disk, no server.

LMDB is memory-mapped and copy-on-write: readers never block writers or each other, a crash never
leaves a half-written record, and several processes on one machine may open the same directory (open
it after forking, never before). Keys are the same strings as on Redis, so the two stores list and
scan alike.

The change feed (`cache.feed`) of a model is a log in the same key space, written in the same write
transaction as the records: `<prefix>:<fingerprint>:feed:<seq, 20 digits>` -> `put:<image id>` or
`delete:<image id>`, and `<prefix>:<fingerprint>:feedstate` -> "<written> <trimmed>" (changes ever
appended, changes trimmed from the start). Keys sort, so a log read is one cursor walk.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lmdb

from cache.errors import StoreFullError
from cache.feed import DEFAULT_FEED_LENGTH, Change, FeedPosition, FeedRead, check_trimmed
from cache.keys import DEFAULT_PREFIX, RecordKey, check_name, record_key_prefix
from cache.store import RecordStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LmdbConfig:
    path: str
    key_prefix: str = DEFAULT_PREFIX
    # Address space reserved, not disk used: the file grows with the data. 1 TiB holds ~2M records
    # at paper size (512 KiB each).
    map_size: int = 1 << 40
    sync: bool = True  # fsync on commit: a put that returned survives a power cut
    feed_length: int = DEFAULT_FEED_LENGTH  # changes kept per model in the change feed

    def __post_init__(self) -> None:
        check_name("key_prefix", self.key_prefix)
        if self.map_size <= 0 or self.feed_length <= 0:
            raise ValueError(f"map_size and feed_length must be positive, got {self}")


# LMDB allows one open environment per directory and process: stores of one directory share it (the
# LLM worker and an in-process encoder both open the default store), and the last close closes it.
_ENVS: dict[str, tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _open_env(config: LmdbConfig) -> lmdb.Environment:
    path = os.path.realpath(config.path)
    with _ENVS_LOCK:
        env, users = _ENVS.get(path, (None, 0))
        if env is None:
            os.makedirs(path, exist_ok=True)
            env = lmdb.open(path, map_size=config.map_size, sync=config.sync, max_dbs=0)
            logger.info("opened LMDB store at %s", path)
        _ENVS[path] = (env, users + 1)
        return env


def _close_env(path: str) -> None:
    path = os.path.realpath(path)
    with _ENVS_LOCK:
        env, users = _ENVS.pop(path)
        if users > 1:
            _ENVS[path] = (env, users - 1)
        else:
            env.close()


class LmdbStore(RecordStore):
    def __init__(self, config: LmdbConfig) -> None:
        self.config = config
        self._env = _open_env(config)
        self._closed = False

    def _k(self, key: RecordKey) -> bytes:
        return key.to_str(self.config.key_prefix).encode()

    def _feed(self, fingerprint: str) -> str:
        return f"{self.config.key_prefix}:{check_name('fingerprint', fingerprint)}:feed"

    def _state(self, txn: lmdb.Transaction, fingerprint: str) -> tuple[int, int]:
        """(changes ever written, changes trimmed) of a model's feed."""
        raw = txn.get(f"{self._feed(fingerprint)}state".encode())
        if raw is None:
            return 0, 0
        written, trimmed = raw.split()
        return int(written), int(trimmed)

    def _append(self, txn: lmdb.Transaction, fingerprint: str, changes: Sequence[Change]) -> None:
        """Append `changes` to a model's feed inside the write transaction `txn`, then trim its start."""
        feed = self._feed(fingerprint)
        written, trimmed = self._state(txn, fingerprint)
        for change in changes:
            written += 1
            txn.put(f"{feed}:{written:020d}".encode(), f"{change.op}:{change.image_id}".encode())
        while written - trimmed > self.config.feed_length:
            trimmed += 1
            txn.delete(f"{feed}:{trimmed:020d}".encode())
        txn.put(f"{feed}state".encode(), f"{written} {trimmed}".encode())

    def put(self, key: RecordKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        changes: dict[str, list[Change]] = defaultdict(list)
        for key, _ in items:
            changes[key.fingerprint].append(Change("put", key.image_id))
        try:
            # one write transaction per batch: one fsync instead of one per record, and the feed
            # entries commit with the records or not at all
            with self._env.begin(write=True) as txn:
                for key, blob in items:
                    txn.put(self._k(key), blob)
                for fingerprint, appended in changes.items():
                    self._append(txn, fingerprint, appended)
        except lmdb.MapFullError as e:
            raise StoreFullError(
                f"LMDB store at {self.config.path} is full at map_size={self.config.map_size}; "
                "reopen it with a larger map_size"
            ) from e

    def get(self, key: RecordKey) -> bytes | None:
        with self._env.begin() as txn:
            return txn.get(self._k(key))

    def get_many(self, keys: Sequence[RecordKey]) -> list[bytes | None]:
        with self._env.begin() as txn:
            return [txn.get(self._k(key)) for key in keys]

    def get_prefixes(self, keys: Sequence[RecordKey], size: int) -> list[bytes | None]:
        # buffers=True maps each value: only the pages of its first `size` bytes are read from disk
        with self._env.begin(buffers=True) as txn:
            return [None if (buf := txn.get(self._k(key))) is None else bytes(buf[:size]) for key in keys]

    def contains(self, key: RecordKey) -> bool:
        # buffers=True maps the value instead of copying it: a membership test costs no value bytes
        with self._env.begin(buffers=True) as txn:
            return txn.get(self._k(key)) is not None

    def delete(self, key: RecordKey) -> bool:
        with self._env.begin(write=True) as txn:
            deleted = txn.delete(self._k(key))
            if deleted:
                self._append(txn, key.fingerprint, [Change("delete", key.image_id)])
            return deleted

    def feed_position(self, fingerprint: str) -> FeedPosition:
        with self._env.begin() as txn:
            written, _ = self._state(txn, fingerprint)
        return FeedPosition(str(written) if written else "", written)

    def read_feed(self, fingerprint: str, after: FeedPosition, limit: int = 1024) -> FeedRead:
        feed = f"{self._feed(fingerprint)}:".encode()
        changes: list[Change] = []
        with self._env.begin() as txn:  # one snapshot: the state and the entries agree
            written, trimmed = self._state(txn, fingerprint)
            check_trimmed(fingerprint, after, trimmed, written)
            cursor = txn.cursor()
            if cursor.set_range(feed + f"{after.seq + 1:020d}".encode()):
                for raw_key, raw in cursor.iternext():
                    if not raw_key.startswith(feed) or len(changes) == limit:
                        break
                    op, image_id = raw.decode().split(":")
                    changes.append(Change.read(op, image_id, fingerprint))
        seq = after.seq + len(changes)
        return FeedRead(changes, FeedPosition(str(seq) if seq else after.offset, seq))

    def iter_ids(self, fingerprint: str) -> Iterator[str]:
        start = record_key_prefix(fingerprint, self.config.key_prefix).encode()
        # keys are sorted, so one model's records are a contiguous range starting at its prefix;
        # ids are collected inside one read snapshot, then yielded after it closes
        with self._env.begin() as txn:
            cursor = txn.cursor()
            ids: list[str] = []
            if cursor.set_range(start):
                for raw in cursor.iternext(keys=True, values=False):
                    if not raw.startswith(start):
                        break
                    ids.append(RecordKey.parse(raw.decode(), self.config.key_prefix).image_id)
        yield from ids

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _close_env(self.config.path)
