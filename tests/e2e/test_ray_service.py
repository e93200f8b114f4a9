"""The deployment path on a real local Ray: ingest a corpus with bad files on Ray Data, then serve it
with Ray encoder actors; a killed actor costs no request."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cache.keys import RecordKey
from cache.records import get_record
from htcvlm.decode import decode
from htcvlm.generation import GenerationOptions
from llm_worker.client import OneTokenClient
from tests.conftest import QUESTION
from tests.htcvlm.helpers import png_bytes as png

from .conftest import ServerThread, worker_config

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_ingest_then_serve_with_ray_encoders(model_dir: Path, tmp_path: Path):
    import ray

    from encoder_service.ingest import ingest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    images = {f"img{i}.png": png(200 + i) for i in range(6)}
    for name, data in images.items():
        (corpus / name).write_bytes(data)
    (corpus / "notes.txt").write_text("not an image")
    (corpus / "cut.png").write_bytes(images["img0.png"][:90])
    config = worker_config(model_dir, str(tmp_path / "db"), tmp_path / "index", "onetoken")
    config = replace(config, encoder=replace(config.encoder, backend="ray", num_actors=1, max_wait_ms=1))
    report = tmp_path / "report.jsonl"
    summary = ingest(
        [str(corpus)],
        config.encoder,
        config.store,
        str(config.index_dir),
        report_path=str(report),
        show_progress=False,
    )
    assert (summary.encoded, summary.cached, summary.failed) == (6, 0, 2)
    failed = {Path(json.loads(line)["path"]).name for line in report.read_text().splitlines()}
    assert failed == {"notes.txt", "cut.png"}

    server = ServerThread(config)
    try:
        assert len(server.service.index) == 6  # the server loaded what ingestion indexed
        with OneTokenClient(server.address) as client:
            hits = client.search(2, image=images["img3.png"]).hits
            assert Path(hits[0].source_uri).name == "img3.png" and hits[0].score == pytest.approx(1, abs=1e-4)
            assert client.encode(images["img1.png"]).cached  # ingested: no model work
            reply = client.ask(QUESTION, image_id=hits[0].image_id, max_new_tokens=6)
            model = server.service.model
            record = get_record(server.service.store, RecordKey(server.service.fingerprint, hits[0].image_id))
            assert (
                list(reply.token_ids)
                == decode(model, [record], [QUESTION], GenerationOptions(6))[0].token_ids
            )
            ray.kill(server.service.encoders.actors[0], no_restart=False)  # a crash: Ray restarts it
            fresh = client.encode(png(300))
            assert not fresh.cached and len(fresh.image_id) == 64
    finally:
        server.stop()
