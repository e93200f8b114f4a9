"""Errors of the cache subsystem, one class per condition a caller handles differently.

Who catches what:
- `StoreUnavailableError`: the gRPC handler layer (UNAVAILABLE, "retry later"); raised only after the
  store's own bounded retries are spent, so callers must not retry in a tight loop.
- `CorruptRecordError`: whoever reads a record; the record is unusable and should be deleted and the
  image re-encoded. Never swallowed into a miss, so corruption stays visible.
- `FingerprintMismatchError`: the handler layer (FAILED_PRECONDITION); a record of another model was
  asked for or found, and it must never be decoded with this model.
- `IndexCorruptError` / `IndexStaleError`: `cache.index.load_or_rebuild`, which rebuilds the index from
  the store; nobody else should see them.
- `IdCollisionError`: the ingestion path; two different images map to one int64 FAISS id. With 64 bits
  of SHA-256 this needs about 4 billion images, so seeing it means a bug or an attack.
- `StoreFullError`: the operator; the embedded store hit its map_size and needs a bigger one.
- `NotIndexedError`: the Search handler (NOT_FOUND); a search by an image id that is not indexed.
- `IndexOperationError`: the caller asked for something the chosen FAISS index type cannot do
  (e.g. removal from HNSW); rebuild the index instead.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error raised by `cache`; catch it to handle all cache failures at once."""


class StoreUnavailableError(CacheError):
    """The store could not be reached within the retry budget (connection refused, reset, timed out)."""


class CorruptRecordError(CacheError):
    """Stored bytes are not a valid record: truncated, bit-flipped, or of an unknown format version."""


class FingerprintMismatchError(CacheError):
    """A record belongs to another model than the one asking for it."""


class IndexCorruptError(CacheError):
    """The persisted index or its manifest cannot be read or fails its checksum."""


class IndexStaleError(CacheError):
    """The persisted index is readable but does not match the store or the expected model."""


class IdCollisionError(CacheError):
    """Two different image ids map to the same int64 FAISS id."""


class NotIndexedError(CacheError, KeyError):
    """A search by image id names an image the index does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class IndexOperationError(CacheError):
    """The configured FAISS index type does not support the requested operation."""


class StoreFullError(CacheError):
    """The embedded store reached its configured size (LMDB map_size); raise the limit and reopen."""
