"""The embedded default store: one LMDB environment on local disk, no server.

LMDB is memory-mapped and copy-on-write: readers never block writers or each other, a crash never
leaves a half-written record, and several processes on one machine may open the same directory (open
it after forking, never before). Keys are the same strings as on Redis, so the two stores list and
scan alike.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lmdb

from cache.errors import StoreFullError
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

    def __post_init__(self) -> None:
        check_name("key_prefix", self.key_prefix)
        if self.map_size <= 0:
            raise ValueError(f"map_size must be positive, got {self.map_size}")


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

    def put(self, key: RecordKey, blob: bytes) -> None:
        self.put_many([(key, blob)])

    def put_many(self, items: Sequence[tuple[RecordKey, bytes]]) -> None:
        try:
            # one write transaction per batch: one fsync instead of one per record
            with self._env.begin(write=True) as txn:
                for key, blob in items:
                    txn.put(self._k(key), blob)
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

    def contains(self, key: RecordKey) -> bool:
        # buffers=True maps the value instead of copying it: a membership test costs no value bytes
        with self._env.begin(buffers=True) as txn:
            return txn.get(self._k(key)) is not None

    def delete(self, key: RecordKey) -> bool:
        with self._env.begin(write=True) as txn:
            return txn.delete(self._k(key))

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
