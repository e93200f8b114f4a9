"""Search over a lossy index through a real gRPC server on real Redis: the worker re-ranks PQ candidates by
exact cosine with the latents in the store, and a record deleted behind its back is never a hit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.factory import StoreConfig, open_store
from cache.keys import RecordKey
from cache.records import put_records
from cache.store import RecordStore
from llm_worker.client import OneTokenClient
from tests.cache.helpers import make_record, purge_prefix

from .conftest import ServerThread, worker_config

N = 600
K = 5
SPEC = "IVF4,PQ8x4"  # 4 bytes of codes per 64-d latent: they find the neighbourhood, not the order


@pytest.fixture(scope="module")
def stored(redis_url: str, small_model) -> Iterator[tuple[str, str, list[str], np.ndarray]]:
    """(url, prefix, ids, latents): N records of the test model, 20 clusters of latents, on real Redis."""
    prefix = f"onetoken-e2e-{uuid.uuid4().hex[:10]}"
    d = small_model.llm.config.hidden_size
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, d))
    x = (centres[rng.integers(20, size=N)] + 0.4 * rng.standard_normal((N, d))).astype(np.float32)
    fingerprint = small_model.fingerprint()
    records = [make_record(n, fingerprint, d=d, latent=torch.from_numpy(row)) for n, row in enumerate(x)]
    store = open_store(StoreConfig(redis_url, key_prefix=prefix))
    put_records(store, records, kv_dtype="fp16")
    store.close()
    yield redis_url, prefix, [r.image_id for r in records], x
    purge_prefix(redis_url, prefix)


@pytest.fixture(scope="module")
def worker(model_dir: Path, stored, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    url, prefix, _, _ = stored
    config = worker_config(model_dir, url, tmp_path_factory.mktemp("index"), prefix, index_spec=SPEC)
    running = ServerThread(config)  # builds the index from the stored records; no feed following
    yield running
    running.stop()


def exact_top_k(x: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    return np.argsort(-scores, kind="stable")[:k].tolist()


def test_search_returns_the_exact_top_k_of_a_lossy_index(worker: ServerThread, stored) -> None:
    _, _, image_ids, x = stored
    assert worker.service.index.config.rerank == 50  # the default for a PQ spec
    queries = x[:: N // 20] + 0.1  # near stored latents, not on them
    recall_raw = recall_reranked = 0.0
    with OneTokenClient(worker.address, timeout_s=60) as client:
        for query in queries:
            truth = [image_ids[n] for n in exact_top_k(x, query, K)]
            hits = client.search(K, latent=query.tolist()).hits
            recall_reranked += len({h.image_id for h in hits} & set(truth)) / K / len(queries)
            raw = worker.service.index.search(query, K)[0]
            recall_raw += len({h.image_id for h in raw} & set(truth)) / K / len(queries)
            assert all(h.source_uri.startswith("file:///corpus/") for h in hits)
    assert recall_raw < 0.8 and recall_reranked >= 0.99, (recall_raw, recall_reranked)


def test_a_record_deleted_behind_the_worker_is_never_a_hit(worker: ServerThread, stored) -> None:
    url, prefix, _, x = stored
    query = x[3]
    with OneTokenClient(worker.address, timeout_s=60) as client:
        before = [h.image_id for h in client.search(K, latent=query.tolist()).hits]
        other: RecordStore = open_store(StoreConfig(url, key_prefix=prefix))  # another process's delete
        try:
            for image_id in before[:2]:
                assert other.delete(RecordKey(worker.service.fingerprint, image_id))
        finally:
            other.close()
        assert before[0] in worker.service.index  # the worker has not read the change feed
        after = [h.image_id for h in client.search(K, latent=query.tolist()).hits]
    assert len(after) == K and not set(before[:2]) & set(after)
    assert after[: K - 2] == before[2:]
