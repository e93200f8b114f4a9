"""Records through a store: serialize on the way in, verify on the way out, and tell a miss apart.

`lookup` is what the service asks before answering about an image. A store miss alone cannot say
whether the image was never encoded or its record was evicted (Redis under maxmemory with an LRU
policy may drop any key, so no marker kept in Redis could say it either); the vector index, which
lives on local disk, still knows every image it indexed, and so separates the two.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cache.dtypes import KvDtype
from cache.errors import CorruptRecordError
from cache.index import LatentIndex
from cache.keys import RecordKey
from cache.serde import deserialize, serialize
from cache.store import RecordStore
from htcvlm.record import Record

logger = logging.getLogger(__name__)


class LookupStatus(enum.Enum):
    FOUND = "found"
    EVICTED = "evicted"  # indexed once, record gone from the store: re-encode the image
    UNKNOWN = "unknown"  # never stored for this model: encode the image first


@dataclass(frozen=True)
class Lookup:
    status: LookupStatus
    record: Record | None  # set exactly when status is FOUND


def key_of(record: Record) -> RecordKey:
    return RecordKey(record.fingerprint, record.image_id)


def put_records(store: RecordStore, records: Sequence[Record], kv_dtype: KvDtype = "fp16") -> list[RecordKey]:
    """Serialize and store `records` in one batch; returns their keys in order."""
    keys = [key_of(r) for r in records]
    store.put_many([(k, serialize(r, kv_dtype)) for k, r in zip(keys, records, strict=True)])
    return keys


def get_records(store: RecordStore, keys: Sequence[RecordKey]) -> list[Record | None]:
    """The records under `keys` (None for a miss). Raises CorruptRecordError, naming the image, for
    unusable bytes and FingerprintMismatchError if a blob under a key of one model holds another
    model's record."""
    blobs = store.get_many(keys)
    return [None if blob is None else read_record(blob, k) for k, blob in zip(keys, blobs, strict=True)]


def read_record(blob: bytes, key: RecordKey) -> Record:
    """Verify and decode the blob stored under `key`; a CorruptRecordError names the image."""
    try:
        return deserialize(blob, fingerprint=key.fingerprint, image_id=key.image_id)
    except CorruptRecordError as e:
        raise CorruptRecordError(f"the stored record of image {key.image_id} is damaged: {e}") from e


def get_record(store: RecordStore, key: RecordKey) -> Record | None:
    return get_records(store, [key])[0]


def lookup(store: RecordStore, index: LatentIndex | None, key: RecordKey) -> Lookup:
    """FOUND with the record, EVICTED if only the index knows the image, else UNKNOWN."""
    if index is not None and index.fingerprint != key.fingerprint:
        raise ValueError(f"index of model {index.fingerprint} cannot answer for model {key.fingerprint}")
    record = get_record(store, key)
    if record is not None:
        return Lookup(LookupStatus.FOUND, record)
    if index is not None and key.image_id in index:
        logger.info("record of indexed image %s was evicted from the store", key.image_id)
        return Lookup(LookupStatus.EVICTED, None)
    return Lookup(LookupStatus.UNKNOWN, None)


def delete_record(store: RecordStore, index: LatentIndex | None, key: RecordKey) -> bool:
    """Remove an image everywhere; the index first, so no lookup in between reports it evicted."""
    if index is not None:
        index.remove([key.image_id])
    return store.delete(key)
