"""Store -> index: the one place that reads stored records for their latents.

The store is the source of truth; indexes follow it. Every reader of stored latents goes through here
and shares one failure policy: a record that is missing (deleted or evicted since it was listed) is
passed over, and one that cannot be used (damaged, another model's) is logged with its image id and
passed over, so one bad record never stops the others from being indexed. A store outage
(StoreUnavailableError) is not a bad record: it propagates.

- `stored_latents(store, fingerprint, image_ids)`: (ids, latents) batches of the records that are usable.
- `read_latents(store, fingerprint, image_ids, dim)`: the latents alone, read from the first bytes of each
  blob without its K/V (`RecordStore.get_prefixes`), one entry per id; what re-ranking reads per search.
- `build_from_store` / `load_or_rebuild`: a whole index from the store (start-up, ingest without one).
- `follow(index, store)`: apply the store's change feed since the index's position (`cache.feed`):
  records other processes stored are indexed, deleted ones removed; the worker calls it every fraction
  of a second. It reads only the changes, never the whole store; an index that fell behind a trimmed
  feed is rebuilt.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.errors import CorruptRecordError, FingerprintMismatchError, IndexCorruptError, IndexStaleError
from cache.feed import FeedTrimmedError
from cache.index import IndexConfig, LatentIndex
from cache.keys import RecordKey
from cache.serde import deserialize, read_latent
from cache.store import RecordStore

logger = logging.getLogger(__name__)

BATCH = 256  # records per store round trip
# Bytes of a blob first read for its latent, beyond the latent itself: a header is ~1 KiB with a short
# source URI (up to ~10 KiB with the longest); a longer one costs a second read of just those blobs.
HEADER_GUESS = 4096


def stored_latents(
    store: RecordStore, fingerprint: str, image_ids: Sequence[str], batch: int = BATCH
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, latents (n, d) float32) batches of the usable stored records among `image_ids`."""
    for start in range(0, len(image_ids), batch):
        chunk = image_ids[start : start + batch]
        ids: list[str] = []
        rows: list[np.ndarray] = []
        for image_id, blob in zip(
            chunk, store.get_many([RecordKey(fingerprint, i) for i in chunk]), strict=True
        ):
            if blob is None:
                continue  # deleted or evicted since it was listed
            try:
                record = deserialize(blob, fingerprint=fingerprint, image_id=image_id)
            except (CorruptRecordError, FingerprintMismatchError) as e:
                logger.warning("passing over image %s: its stored record is unusable (%s)", image_id, e)
                continue
            ids.append(image_id)
            rows.append(record.latent.float().numpy())
        if ids:
            yield ids, np.stack(rows)


def read_latents(
    store: RecordStore, fingerprint: str, image_ids: Sequence[str], dim: int, batch: int = 1024
) -> list[np.ndarray | None]:
    """The stored latents (dim,) float32 of `image_ids`, in order: None where the record is gone, or
    unusable (logged, as in `stored_latents`). Reads each blob's header and latent, not its K/V: one
    round trip per `batch` ids when the K/V is fp16, bf16 or int8 (the latent comes first), two when
    it is fp32 or a header is long."""
    found: list[np.ndarray | None] = [None] * len(image_ids)
    for start in range(0, len(image_ids), batch):
        pending = list(range(start, min(start + batch, len(image_ids))))
        size = 8 + HEADER_GUESS + 4 * dim
        while pending:
            keys = [RecordKey(fingerprint, image_ids[n]) for n in pending]
            needs: dict[int, int] = {}
            for n, prefix in zip(pending, store.get_prefixes(keys, size), strict=True):
                if prefix is None:
                    continue  # deleted or evicted
                try:
                    latent = read_latent(prefix, fingerprint=fingerprint, image_id=image_ids[n])
                    if isinstance(latent, int) and len(prefix) < size:  # the whole blob, yet too short
                        raise CorruptRecordError(f"a blob of {len(prefix)} bytes ends before its latent")
                    if isinstance(latent, np.ndarray) and latent.shape != (dim,):
                        raise CorruptRecordError(f"its latent has shape {latent.shape}, not ({dim},)")
                except (CorruptRecordError, FingerprintMismatchError) as e:
                    logger.warning(
                        "passing over image %s: its stored record is unusable (%s)", image_ids[n], e
                    )
                    continue
                if isinstance(latent, int):
                    needs[n] = latent  # > size: every round reads further, so this ends
                else:
                    found[n] = latent
            pending = list(needs)
            size = max(needs.values(), default=size)
    return found


@dataclass(frozen=True)
class Followed:
    added: int  # records indexed
    removed: int  # deleted records dropped from the index
    changes: int  # feed entries read


def follow(index: LatentIndex, store: RecordStore, batch: int = BATCH) -> Followed:
    """Apply every change in the store's feed after `index.feed` and move it on. Raises FeedTrimmedError
    if changes after it were trimmed (`follow_or_rebuild` handles it)."""
    if index.feed is None:
        raise FeedTrimmedError(f"the index of model {index.fingerprint} has no feed position")
    added = removed = changes = 0
    while True:
        read = store.read_feed(index.fingerprint, index.feed, limit=batch)
        if not read.changes:
            return Followed(added, removed, changes)
        changes += len(read.changes)
        last: dict[str, str] = {}  # image id -> its last op in this batch: what the store holds now
        for change in read.changes:
            last.pop(change.image_id, None)  # re-inserted so that the order is the last op's
            last[change.image_id] = change.op
        removed += index.remove([i for i, op in last.items() if op == "delete"])
        new = [i for i, op in last.items() if op == "put" and i not in index]
        for ids, latents in stored_latents(store, index.fingerprint, new, batch):
            added += index.add(ids, latents)
        index.feed = read.position


def follow_or_rebuild(index: LatentIndex, store: RecordStore, batch: int = BATCH) -> tuple[LatentIndex, bool]:
    """`follow`, or where the index cannot follow (no position, or the feed trimmed changes it had not
    read) a new index built from the store; returns (the index, whether it was rebuilt)."""
    try:
        follow(index, store, batch)
        return index, False
    except FeedTrimmedError as e:
        logger.warning("rebuilding the index of model %s from the store: %s", index.fingerprint, e)
        return build_from_store(store, index.fingerprint, index.config, batch), True


def build_from_store(
    store: RecordStore, fingerprint: str, config: IndexConfig, batch: int = BATCH
) -> LatentIndex:
    """A fresh index of every record of `fingerprint` in `store` (trained on a random sample first), at
    the feed position from before the listing: changes made while it is built are followed later."""
    index = LatentIndex(fingerprint, config)
    index.feed = store.feed_position(fingerprint)
    image_ids = list(store.iter_ids(fingerprint))
    if not index.is_trained and image_ids:
        sample = random.Random(0).sample(image_ids, min(config.train_sample, len(image_ids)))
        index.train(np.concatenate([x for _, x in stored_latents(store, fingerprint, sample, batch)]))
    for ids, latents in stored_latents(store, fingerprint, image_ids, batch):
        index.add(ids, latents)
    logger.info("built %s index of %s latents for model %s", config.spec, len(index), fingerprint)
    return index


def load_or_rebuild(
    directory: str | os.PathLike[str], store: RecordStore, fingerprint: str, config: IndexConfig
) -> LatentIndex:
    """The saved index in `directory` brought up to date by the change feed, or, if it is missing,
    unsound, of another model or behind a trimmed feed, one rebuilt from the store; saved if it moved."""
    if not (Path(directory) / "manifest.json").exists():
        reason = "no saved index"
    else:
        try:
            index = LatentIndex.load(directory, fingerprint, config)
            followed = follow(index, store)
            if followed.changes:
                index.save(directory)
            return index
        except (IndexCorruptError, IndexStaleError, FeedTrimmedError) as e:
            reason = str(e)
    logger.warning("rebuilding the index in %s from the store: %s", directory, reason)
    index = build_from_store(store, fingerprint, config)
    index.save(directory)
    return index
