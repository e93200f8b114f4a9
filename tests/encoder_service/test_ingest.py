"""Corpus ingestion on Ray Data (the session's two-CPU local cluster) into LMDB and a FAISS index."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import ray
import redis

from cache.errors import StoreUnavailableError
from cache.factory import StoreConfig, open_store
from cache.index import IndexConfig, LatentIndex
from cache.keys import RecordKey
from cache.records import get_records
from encoder_service.ingest import expand_inputs, ingest
from htcvlm.checkpoint import load_pretrained
from htcvlm.errors import CheckpointError
from htcvlm.record import image_id_of
from tests.cache.helpers import RedisServer
from tests.encoder_service.helpers import encoder_config, png, truncated_png


def test_expand_inputs_walks_folders_globs_and_path_lists(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "sub/notes.md"):
        (corpus / name).write_bytes(b"x")
    (tmp_path / "c.png").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# chosen files\nc.png\n\ncorpus/a.png\n")
    found = expand_inputs(
        [str(corpus), str(tmp_path / "*.png"), str(tmp_path / "list.txt"), str(tmp_path / "missing.png")]
    )
    expected = [tmp_path / n for n in ("c.png", "corpus/a.png", "corpus/sub/b.jpg", "corpus/sub/notes.md")]
    assert found == sorted(str(p) for p in [*expected, tmp_path / "missing.png"])  # deduplicated, sorted
    assert expand_inputs([]) == []


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, bytes], dict[str, str]]:
    """Three good PNGs (one in a subfolder) and four bad files, with the reason each must fail for."""
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    good = {"a.png": png(1), "b.png": png(2), "more/c.png": png(3)}
    for name, data in good.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image: the report lists it\n")
    (folder / "cut.png").write_bytes(truncated_png(4))
    (folder / "empty.png").write_bytes(b"")
    # unreadable even for root (chmod 000 is not): a link to nowhere
    os.symlink(tmp_path / "deleted.png", folder / "gone.png")
    bad = {
        "notes.txt": "not an image",
        "cut.png": "truncated",
        "gone.png": "unreadable",
        "empty.png": "empty file",
    }
    return folder, good, bad


def test_ingest_reports_bad_files_indexes_good_ones_and_resumes(
    corpus: tuple[Path, dict[str, bytes], dict[str, str]], model_dir: Path, tmp_path: Path, ray_cluster: None
) -> None:
    folder, good, bad = corpus
    config, store = encoder_config(model_dir, num_actors=1), StoreConfig(str(tmp_path / "store"))
    report = tmp_path / "reports" / "report.jsonl"  # its folder does not exist yet: ingest makes it
    index_dir = tmp_path / "index"

    summary = ingest([str(folder)], config, store, str(index_dir), batch_size=4, report_path=str(report))
    assert (summary.encoded, summary.cached, summary.failed) == (3, 0, 4)
    assert summary.report_path == str(report) and summary.images_per_s > 0
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(Path(n).name for n in bad)
    for row in rows:
        assert row["status"] == "failed" and row["run"] == summary.run_id
        assert bad[Path(row["path"]).name] in row["reason"], row

    fingerprint = load_pretrained(model_dir).fingerprint()
    ids = sorted(image_id_of(data) for data in good.values())
    with open_store(store) as opened:
        assert sorted(opened.iter_ids(fingerprint)) == ids
        records = get_records(opened, [RecordKey(fingerprint, i) for i in ids])
    index = LatentIndex.load(index_dir, fingerprint, IndexConfig(dim=64))
    assert sorted(index.image_ids()) == ids
    for image_id, record in zip(ids, records, strict=True):  # each stored latent finds its own image
        assert record is not None
        assert index.search(record.latent.numpy()[None], k=1)[0][0].image_id == image_id

    again = ingest([str(folder)], config, store, str(index_dir), batch_size=4, report_path=str(report))
    assert (again.encoded, again.cached, again.failed) == (0, 3, 4)  # resumable: no model work
    assert again.run_id != summary.run_id
    runs = [json.loads(line)["run"] for line in report.read_text().splitlines()]
    assert runs == [summary.run_id] * 4 + [again.run_id] * 4  # appended: the first run's lines stay
    assert sorted(LatentIndex.load(index_dir, fingerprint, IndexConfig(dim=64)).image_ids()) == ids

    # a new image on its own: the saved index is topped up, not rebuilt
    (tmp_path / "new.png").write_bytes(png(9))
    more = ingest([str(tmp_path / "new.png")], config, store, str(index_dir), show_progress=False)
    assert (more.encoded, more.cached, more.failed, more.report_path) == (1, 0, 0, None)
    index = LatentIndex.load(index_dir, fingerprint, IndexConfig(dim=64))
    assert sorted(index.image_ids()) == sorted([*ids, image_id_of(png(9))])
    with open_store(store) as opened:  # saved at the feed's end: a worker loading it reads nothing again
        assert index.feed == opened.feed_position(fingerprint)


def test_a_report_of_a_run_without_failures_is_not_written(
    model_dir: Path, tmp_path: Path, ray_cluster: None
):
    (tmp_path / "a.png").write_bytes(png(1))
    config, store = encoder_config(model_dir), StoreConfig(str(tmp_path / "store"))
    report = tmp_path / "reports" / "report.jsonl"
    summary = ingest([str(tmp_path / "a.png")], config, store, report_path=str(report), show_progress=False)
    assert (summary.encoded, summary.failed, summary.report_path) == (1, 0, None)
    assert not report.exists()


def test_a_store_outage_stops_ingest_with_the_stores_own_error(
    model_dir: Path, tmp_path: Path, ray_cluster: None
) -> None:
    """A private redis-server killed mid-run: the error raised is StoreUnavailableError itself, not Ray's
    wrapper, which is kept as its cause."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(100):
        (corpus / f"{i:03d}.png").write_bytes(png(i, size=32))
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    private = RedisServer(redis_dir)
    private.start()
    killer = threading.Thread(target=kill_after_first_write, args=(private,), daemon=True)
    killer.start()
    config, store = encoder_config(model_dir), StoreConfig(private.url, retry_s=1.0)
    try:
        with pytest.raises(StoreUnavailableError, match="is the store running") as err:
            ingest([str(corpus)], config, store, batch_size=2, show_progress=False)
    finally:
        killer.join(timeout=10)
        private.kill()
    assert type(err.value) is StoreUnavailableError
    assert isinstance(err.value.__cause__, ray.exceptions.RayTaskError)


def kill_after_first_write(server: RedisServer, timeout_s: float = 120) -> None:
    """SIGKILL `server` as soon as it holds a key: an outage part way through a run."""
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.dbsize() > 0:
            break
        time.sleep(0.02)
    server.kill()


def test_ingest_fails_fast_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(1))
    config, store = encoder_config(tmp_path / "no-model"), StoreConfig(str(tmp_path / "store"))
    with pytest.raises(CheckpointError, match="does not exist"):
        ingest([str(tmp_path / "a.png")], config, store, show_progress=False)
