"""Ray: encoder actors encode through the batcher, survive a killed actor, and ingest a corpus on Ray
Data with bad files in it, resumably, into the store and the index (embedded store and Redis)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray

from cache.index import IndexConfig, LatentIndex
from cache.store import open_store
from encoder_service.config import EncoderConfig
from encoder_service.ingest import expand_inputs, ingest
from encoder_service.pool import RayEncoderPool
from htcvlm.checkpoint import load_pretrained
from htcvlm.record import image_id_of
from tests.cache.helpers import purge_prefix
from tests.htcvlm.helpers import png_bytes

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_actors_encode_and_a_killed_actor_loses_no_request(config: EncoderConfig):
    async def main():
        pool = await RayEncoderPool.start(replace(config, backend="ray", max_wait_ms=1))
        try:
            first = await pool.encode(png_bytes(1))
            # kill the actor while a batch is on it: Ray restarts it and retries the batch there
            pending = asyncio.ensure_future(pool.encode(png_bytes(2)))
            await asyncio.sleep(0.005)
            ray.kill(pool.actors[0], no_restart=False)
            second = await pending
            third = await pool.encode(png_bytes(3))  # the restarted actor serves on
            cached = await pool.encode(png_bytes(1))
            return first, second, third, cached
        finally:
            await pool.close()

    first, second, third, cached = asyncio.run(main())
    assert [o.status for o in (first, second, third)] == ["encoded"] * 3
    assert cached.status == "cached" and np.array_equal(cached.latent, first.latent)


def write_corpus(folder: Path) -> list[bytes]:
    folder.mkdir()
    (folder / "sub").mkdir()
    images = [png_bytes(10 + i) for i in range(5)]
    for i, data in enumerate(images):
        (folder / ("sub" if i % 2 else ".") / f"img{i}.png").write_bytes(data)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(images[0][:120])
    os.symlink(folder / "does-not-exist.png", folder / "dangling.png")  # cannot be read, even by root
    return images


@pytest.fixture(params=["lmdb", "redis"])
def store_url(request, tmp_path: Path):
    if request.param == "lmdb":
        yield str(tmp_path / "records"), "onetoken"
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"onetoken-ingest-{uuid.uuid4().hex[:10]}"
    yield url, prefix
    purge_prefix(url, prefix)


def test_ingest_reports_bad_files_indexes_good_ones_and_resumes(config, store_url, tmp_path: Path):
    url, prefix = store_url
    config = replace(config, store_url=url, key_prefix=prefix)
    images = write_corpus(tmp_path / "corpus")
    report = tmp_path / "report.jsonl"
    index_dir = tmp_path / "index"
    summary = ingest(
        [str(tmp_path / "corpus")],
        config,
        str(index_dir),
        report_path=str(report),
        batch_size=4,
        show_progress=False,
    )
    assert (summary.encoded, summary.cached, summary.failed) == (5, 0, 3)
    reasons = {Path(r["path"]).name: r["reason"] for r in map(json.loads, report.read_text().splitlines())}
    assert set(reasons) == {"notes.txt", "broken.png", "dangling.png"}
    assert "not an image" in reasons["notes.txt"] and "corrupt or truncated" in reasons["broken.png"]
    assert "unreadable" in reasons["dangling.png"]

    model = load_pretrained(config.model_dir)
    index = LatentIndex.load(index_dir, model.fingerprint(), IndexConfig(dim=model.llm.config.hidden_size))
    assert sorted(index.image_ids()) == sorted(image_id_of(i) for i in images)
    with open_store(url, key_prefix=prefix) as store:
        assert store.count(model.fingerprint()) == 5

    again = ingest([str(tmp_path / "corpus")], config, str(index_dir), batch_size=4, show_progress=False)
    assert (again.encoded, again.cached, again.failed) == (0, 5, 3)


def test_expand_inputs_takes_folders_globs_and_lists(tmp_path: Path):
    for name in ("a.png", "b.jpg", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{tmp_path / 'b.jpg'}\n\n")
    got = expand_inputs([str(tmp_path / "*.png"), str(listing), str(tmp_path / "a.png")])
    assert got == [str(tmp_path / "a.png"), str(tmp_path / "c.png"), str(tmp_path / "b.jpg")]
