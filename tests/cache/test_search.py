"""Exact re-ranking of a lossy index's candidates with the latents in the store (`cache.search`): real
FAISS, real LMDB and Redis. 3,000 clustered 256-d latents under IVF16,PQ8x4 (4 bytes an image), whose
codes alone order neighbours poorly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.index import DEFAULT_RERANK, IndexConfig, LatentIndex
from cache.keys import RecordKey
from cache.lmdb_store import LmdbConfig, LmdbStore
from cache.records import delete_record, put_records
from cache.search import search_stored
from cache.store import RecordStore
from cache.sync import build_from_store, read_latents

from .helpers import FINGERPRINT, make_record

D = 256
N = 3000
K = 10
SPEC = "IVF16,PQ8x4"


def clustered(n: int, seed: int) -> np.ndarray:
    """(n, D) float32 around 30 shared centres (seed 0 places them), like latents of similar images."""
    centres = np.random.default_rng(0).standard_normal((30, D))
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(30, size=n)] + 0.5 * rng.standard_normal((n, D))).astype(np.float32)


def exact_top_k(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) rows of `x` by exact cosine, best first."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


def stored(store: RecordStore, x: np.ndarray) -> list[str]:
    """Records with latents `x` (tiny K/V, stored as fp16: the latent comes first) put in `store`."""
    records = [
        make_record(seed, shape=(1, 1, 1, 8), d=D, latent=torch.from_numpy(row)) for seed, row in enumerate(x)
    ]
    for start in range(0, len(records), 500):
        put_records(store, records[start : start + 500], kv_dtype="fp16")
    return [r.image_id for r in records]


def built(store: RecordStore, rerank: int | None = None) -> LatentIndex:
    return build_from_store(store, FINGERPRINT, IndexConfig(dim=D, spec=SPEC, nprobe=16, rerank=rerank))


@pytest.fixture(scope="module")
def collection(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LmdbStore, LatentIndex, list[str], np.ndarray]]:
    """N records in LMDB and their index (built from the store as the worker builds it); read-only."""
    store = LmdbStore(LmdbConfig(path=str(tmp_path_factory.mktemp("lmdb")), sync=False))
    x = clustered(N, seed=1)
    image_ids = stored(store, x)
    yield store, built(store), image_ids, x
    store.close()


def recall(hits: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(h) & set(t)) / len(t) for h, t in zip(hits, truth, strict=True)]))


def test_rerank_is_on_by_default_for_lossy_specs_only() -> None:
    assert IndexConfig(dim=D, spec="IVF4096,PQ64").rerank == DEFAULT_RERANK
    assert IndexConfig(dim=D, spec="HNSW32,SQ8").rerank == DEFAULT_RERANK
    assert IndexConfig(dim=D, spec="OPQ16,IVF256,PQ16").rerank == DEFAULT_RERANK
    for exact in ("Flat", "IVF1024,Flat", "HNSW32"):
        assert IndexConfig(dim=D, spec=exact).rerank == 0
    assert IndexConfig(dim=D, spec="IVF16,PQ8", rerank=0).rerank == 0
    assert IndexConfig(dim=D, spec="Flat", rerank=5).rerank == 5
    with pytest.raises(ValueError, match="rerank must be >= 0"):
        IndexConfig(dim=D, rerank=-1)


def test_reranked_hits_are_the_exact_top_k_where_codes_alone_are_not(collection) -> None:
    store, index, image_ids, x = collection
    queries = clustered(50, seed=2)
    truth = [[image_ids[n] for n in row] for row in exact_top_k(x, queries, K).tolist()]
    raw = recall([[h.image_id for h in hits] for hits in index.search(queries, K)], truth)
    reranked_hits = [search_stored(index, store, q, K) for q in queries]
    reranked = recall([[h.image_id for h in hits] for hits in reranked_hits], truth)
    assert raw < 0.6 < 0.99 <= reranked, f"recall@{K}: codes alone {raw:.3f}, re-ranked {reranked:.3f}"
    # scores are exact cosines, best first, as a flat index would give them
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    row = {i: n for n, i in enumerate(image_ids)}
    for q, hits in zip(queries, reranked_hits, strict=True):
        exact = xn[[row[h.image_id] for h in hits]] @ (q / np.linalg.norm(q))
        np.testing.assert_allclose([h.score for h in hits], exact, rtol=0, atol=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_reranking_survives_save_and_load(collection, tmp_path: Path) -> None:
    store, index, _, _ = collection
    queries = clustered(20, seed=3)
    before = [search_stored(index, store, q, K) for q in queries]
    index.save(tmp_path)
    loaded = LatentIndex.load(tmp_path, FINGERPRINT, index.config)
    assert loaded.config.rerank == DEFAULT_RERANK
    assert [search_stored(loaded, store, q, K) for q in queries] == before
    # re-ranking is a search-time setting: the same files serve with it off, as the codes rank
    off = LatentIndex.load(tmp_path, FINGERPRINT, replace(index.config, rerank=0))
    assert [search_stored(off, store, q, K) for q in queries] == index.search(queries, K)


def test_a_candidate_whose_record_is_gone_is_never_a_hit(tmp_path: Path) -> None:
    store = LmdbStore(LmdbConfig(path=str(tmp_path / "lmdb"), sync=False))
    try:
        x = clustered(1000, seed=4)
        stored(store, x)
        index = built(store)
        query = x[7]
        first = search_stored(index, store, query, K)
        gone_here = first[0].image_id  # removed from the index and the store (this worker's DeleteImage)
        gone_elsewhere = [
            h.image_id for h in first[1:4]
        ]  # from the store alone: another process, feed unread
        delete_record(store, index, key_of_id(gone_here))
        for image_id in gone_elsewhere:
            store.delete(key_of_id(image_id))
        assert all(i in index for i in gone_elsewhere)
        after = search_stored(index, store, query, K)
        assert len(after) == K  # other candidates fill the places
        assert not {gone_here, *gone_elsewhere} & {h.image_id for h in after}
        assert [h.image_id for h in after[:6]] == [h.image_id for h in first[4:]]
    finally:
        store.close()


def key_of_id(image_id: str) -> RecordKey:
    return RecordKey(FINGERPRINT, image_id)


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "bf16", "int8"])
def test_latents_are_read_without_the_kv_from_every_backend(store: RecordStore, kv_dtype: str) -> None:
    """Every backend, every K/V layout (fp32 puts the latent after the keys: a second, longer read), a
    long source URI (a header past the first read), a miss and another model's record."""
    records = [make_record(seed, shape=(2, 2, 1, 64), d=D) for seed in range(3)]
    long_uri = replace(records[1], source_uri="file:///" + "x" * 8000)
    other = make_record(9, fingerprint="another-model", d=D)
    put_records(store, [records[0], long_uri, records[2]], kv_dtype=kv_dtype)
    put_records(store, [other], kv_dtype=kv_dtype)
    ids = [r.image_id for r in records] + [make_record(5).image_id, other.image_id]
    got = read_latents(store, FINGERPRINT, ids, D)
    for record, latent in zip(records, got[:3], strict=True):
        assert latent is not None and latent.dtype == np.float32
        np.testing.assert_array_equal(latent, record.latent.numpy())
    assert got[3:] == [None, None]  # never stored; stored for another model only
