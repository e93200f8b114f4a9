"""Search through the index and the store: candidates from the index, exact scores from stored latents.

A lossy index (PQ, SQ codes: `cache.index.is_lossy`) keeps a few dozen bytes per image, which find an
image's neighbourhood but not the order within it (recall@10 0.08 with PQ64 on 4096-d latents). With
`IndexConfig.rerank` = r > 0, `search_stored` asks the index for k x r candidates, reads their latents
from the store (`cache.sync.read_latents`: the header and latent of each record, never its K/V) and
orders them by exact cosine, the scores a flat index would give.

Why the store and not a copy of the latents beside the index: the store already holds every latent, so
the worker's memory stays at the codes (64 B an image with PQ64, against 16 KiB for a 4096-d fp32
latent); nothing more is saved, loaded or rebuilt with the index; and what the store says is current for
every process: a record deleted or evicted by anyone, even before this worker's index follows the change
feed, reads as missing and is never a hit. The price is one store round trip per search (two with fp32
K/V), ~20 KiB read per candidate at 4096 dims.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from cache.index import Hit, LatentIndex
from cache.store import RecordStore
from cache.sync import read_latents

logger = logging.getLogger(__name__)

# Candidates re-ranked per search at most, whatever k x rerank asks for: ~200 MB of reads at 4096 dims.
MAX_CANDIDATES = 10_000


def search_stored(index: LatentIndex, store: RecordStore, query: np.ndarray, k: int) -> list[Hit]:
    """The k indexed images most similar to `query` (dim,), best first. Re-ranked when the index's config
    asks for it: then every hit's record was in the store when it was scored, and scores are exact."""
    rerank = index.config.rerank or 0
    if rerank == 0:
        return index.search(query, k)[0]
    candidates = index.search(query, min(k * rerank, max(k, MAX_CANDIDATES)))[0]
    if not candidates:
        return []
    latents = read_latents(store, index.fingerprint, [h.image_id for h in candidates], index.config.dim)
    kept = [n for n, latent in enumerate(latents) if latent is not None]
    if len(kept) < len(candidates):
        logger.info("re-ranking left out %d candidates: their records are gone", len(candidates) - len(kept))
    if not kept:
        return []
    x = np.stack([latents[n] for n in kept])  # (c, dim) float32, as stored
    q = np.array(query, dtype=np.float32, ndmin=2)  # (1, dim)
    faiss.normalize_L2(x)
    faiss.normalize_L2(q)
    scores = x @ q[0]  # (c,) exact cosine
    order = np.argsort(-scores, kind="stable")[:k]  # ties keep the index's order
    return [Hit(candidates[kept[n]].image_id, float(scores[n])) for n in order.tolist()]
