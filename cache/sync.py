"""Store -> index: the one place that reads stored records for their latents.

The store is the source of truth; indexes follow it. Every reader of stored latents goes through here
and shares one failure policy: a record that is missing (deleted or evicted since it was listed) is
passed over, and one that cannot be used (damaged, another model's) is logged with its image id and
passed over, so one bad record never stops the others from being indexed. A store outage
(StoreUnavailableError) is not a bad record: it propagates.

- `stored_latents(store, fingerprint, image_ids)`: (ids, latents) batches of the records that are usable.
- `build_from_store` / `load_or_rebuild`: a whole index from the store (start-up, ingest without one).
- `catch_up(index, store)`: index what other processes stored since (the worker's periodic refresh).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cache.errors import CorruptRecordError, FingerprintMismatchError, IndexCorruptError, IndexStaleError
from cache.index import IndexConfig, LatentIndex
from cache.keys import RecordKey
from cache.serde import deserialize
from cache.store import RecordStore

logger = logging.getLogger(__name__)

BATCH = 256  # records per store round trip


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


def catch_up(index: LatentIndex, store: RecordStore, batch: int = BATCH) -> int:
    """Index every usable stored record of the index's model that it does not hold; returns how many."""
    missing = [i for i in store.iter_ids(index.fingerprint) if i not in index]
    added = 0
    for ids, latents in stored_latents(store, index.fingerprint, missing, batch):
        added += index.add(ids, latents)
    return added


def build_from_store(
    store: RecordStore, fingerprint: str, config: IndexConfig, batch: int = BATCH
) -> LatentIndex:
    """A fresh index of every record of `fingerprint` in `store` (trained on a random sample first)."""
    index = LatentIndex(fingerprint, config)
    image_ids = list(store.iter_ids(fingerprint))
    if not index.is_trained and image_ids:
        sample = random.Random(0).sample(image_ids, min(config.train_sample, len(image_ids)))
        index.train(np.concatenate([x for _, x in stored_latents(store, fingerprint, sample, batch)]))
    catch_up(index, store, batch)
    logger.info("built %s index of %s latents for model %s", config.spec, len(index), fingerprint)
    return index


def load_or_rebuild(
    directory: str | os.PathLike[str], store: RecordStore, fingerprint: str, config: IndexConfig
) -> LatentIndex:
    """The saved index in `directory` if it is sound and covers the store, else one rebuilt and saved."""
    if not (Path(directory) / "manifest.json").exists():
        reason = "no saved index"
    else:
        try:
            index = LatentIndex.load(directory, fingerprint, config)
            stored = set(store.iter_ids(fingerprint))
            missing = stored.difference(index.image_ids())
            if not missing:
                if len(index) > len(stored):
                    logger.info("%s indexed images have no stored record (evicted)", len(index) - len(stored))
                return index
            reason = f"stale: {len(missing)} stored records are not indexed"
        except (IndexCorruptError, IndexStaleError) as e:
            reason = str(e)
    logger.warning("rebuilding the index in %s from the store: %s", directory, reason)
    index = build_from_store(store, fingerprint, config)
    index.save(directory)
    return index
