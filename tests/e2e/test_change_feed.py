"""Two workers on one store: what one stores or deletes reaches the other's index through the change feed
within a second, never by scanning the store. Real gRPC servers, real Redis and LMDB."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.keys import RecordKey
from llm_worker.client import OneTokenClient
from tests.htcvlm.helpers import png_bytes as png
from tests.polling import poll_until

from .conftest import ServerThread, worker_config


@pytest.fixture(scope="module")
def workers(model_dir: Path, store_url: tuple, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """Workers A and B: one store, an index directory each, following the feed every 50 ms."""
    url, prefix = store_url
    running = [
        ServerThread(worker_config(model_dir, url, tmp_path_factory.mktemp(f"index-{name}"), prefix,
                                   index_follow_s=0.05))
        for name in "ab"
    ]  # fmt: skip
    clients = [OneTokenClient(w.address, timeout_s=60) for w in running]
    yield running, clients
    for c in clients:
        c.close()
    for w in running:
        w.stop()


def test_an_image_encoded_on_one_worker_is_searchable_on_the_other_within_a_second(workers):
    (_, b), (client_a, client_b) = workers
    started = time.monotonic()
    image_id = client_a.encode(png(2)).image_id
    poll_until(lambda: image_id in b.service.index, timeout_s=1.0)
    assert time.monotonic() - started < 1.0
    assert client_b.search(3, image_id=image_id).hits[0].image_id == image_id


def test_a_delete_on_one_worker_leaves_the_other_workers_index(workers):
    (_, b), (client_a, client_b) = workers
    image_id = client_a.encode(png(3)).image_id
    poll_until(lambda: image_id in b.service.index, timeout_s=1.0)
    assert client_a.delete_image(image_id).deleted
    poll_until(lambda: image_id not in b.service.index, timeout_s=1.0)
    query = client_b.encode(png(1)).image_id
    assert image_id not in {h.image_id for h in client_b.search(50, image_id=query).hits}


def test_records_written_behind_both_workers_reach_both(workers):
    """An ingest run (a third writer) stores records: both indexes follow."""
    from encoder_service.encoder import Encoder

    (a, b), _ = workers
    config = a.service.config
    other = Encoder(config.encoder, config.store)
    try:
        ids = [o.image_id for o in other.encode([png(10 + i) for i in range(4)])]
    finally:
        other.close()
    for worker in (a, b):
        poll_until(lambda w=worker: all(i in w.service.index for i in ids), timeout_s=1.0)
    other_key = RecordKey(a.service.fingerprint, ids[0])
    a.service.store.delete(other_key)  # a delete behind both workers too
    for worker in (a, b):
        poll_until(lambda w=worker: ids[0] not in w.service.index, timeout_s=1.0)
