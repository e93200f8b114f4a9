"""The whole service on a real Redis Cluster (6 private nodes: 3 primaries, 3 replicas): ingest (Ray
Data) with a primary killed part way, failover, a rerun that ends with every record present, then a
gRPC worker over the cluster answering Ask, Search and DeleteImage."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from cache.factory import StoreConfig, open_store
from encoder_service.ingest import ingest
from htcvlm.checkpoint import load_pretrained
from htcvlm.record import image_id_of
from llm_worker.client import OneTokenClient
from tests.cache.helpers import RedisClusterNodes
from tests.conftest import QUESTION
from tests.e2e.conftest import ServerThread, worker_config
from tests.encoder_service.helpers import encoder_config, png

IMAGES = 60


def kill_a_primary_once_records_arrive(
    cluster: RedisClusterNodes, store: StoreConfig, fingerprint: str, killed_at: list[float]
) -> None:
    """SIGKILL the primary of the model's feed (the busiest key) once a few records are stored."""
    with open_store(store) as opened:
        deadline = time.monotonic() + 120
        while opened.count(fingerprint) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    cluster.primary_of(f"onetoken:{fingerprint}:feed").kill()
    killed_at.append(time.monotonic())


def test_ingest_survives_a_failover_and_the_worker_serves_from_the_cluster(
    redis_cluster: RedisClusterNodes, model_dir: Path, tmp_path: Path, ray_cluster: None
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    images = [png(i, size=32) for i in range(IMAGES)]
    for i, data in enumerate(images):
        (corpus / f"{i:03d}.png").write_bytes(data)
    ids = sorted(image_id_of(data) for data in images)
    fingerprint = load_pretrained(model_dir).fingerprint()
    store = StoreConfig(redis_cluster.url, retry_s=30)
    config = encoder_config(model_dir)

    killed_at: list[float] = []
    killer = threading.Thread(
        target=kill_a_primary_once_records_arrive, args=(redis_cluster, store, fingerprint, killed_at)
    )
    killer.start()
    first = ingest([str(corpus)], config, store, str(tmp_path / "index"), batch_size=2, show_progress=False)
    finished_at = time.monotonic()
    killer.join(timeout=120)
    assert (
        sum(n.proc is None for n in redis_cluster.nodes) == 1 and killed_at[0] < finished_at
    )  # during the run
    assert first.failed == 0 and first.encoded + first.cached == IMAGES  # retried through the failover
    again = ingest([str(corpus)], config, store, str(tmp_path / "index"), batch_size=8, show_progress=False)
    assert again.failed == 0 and again.encoded + again.cached == IMAGES
    with open_store(store) as opened:
        assert sorted(opened.iter_ids(fingerprint)) == ids  # every record present after the rerun

    worker = ServerThread(
        worker_config(
            model_dir, redis_cluster.url, tmp_path / "worker-index", "onetoken", index_follow_s=0.05
        )
    )
    try:
        with OneTokenClient(worker.address, timeout_s=60) as client:
            answer = client.ask(QUESTION, image_id=ids[0], max_new_tokens=4)
            assert answer.usage.completion_tokens > 0
            assert client.search(1, image_id=ids[1]).hits[0].image_id == ids[1]
            assert client.delete_image(ids[2]).deleted
            assert ids[2] not in {h.image_id for h in client.search(IMAGES, image_id=ids[1]).hits}
        with open_store(store) as opened:
            assert opened.count(fingerprint) == IMAGES - 1
    finally:
        worker.stop()
