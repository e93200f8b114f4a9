"""Corpus ingestion on Ray Data (the session's two-CPU local cluster) into LMDB and a FAISS index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cache.index import IndexConfig, LatentIndex
from cache.keys import RecordKey
from cache.records import get_records
from cache.store import open_store
from encoder_service.ingest import expand_inputs, ingest
from htcvlm.checkpoint import load_pretrained
from htcvlm.errors import CheckpointError
from htcvlm.record import image_id_of
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
    """Three good PNGs (one in a subfolder) and three bad files, with the reason each must fail for."""
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    good = {"a.png": png(1), "b.png": png(2), "more/c.png": png(3)}
    for name, data in good.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image: the report lists it\n")
    (folder / "cut.png").write_bytes(truncated_png(4))
    # unreadable even for root (chmod 000 is not): a link to nowhere
    os.symlink(tmp_path / "deleted.png", folder / "gone.png")
    bad = {"notes.txt": "not an image", "cut.png": "truncated", "gone.png": "unreadable"}
    return folder, good, bad


def test_ingest_reports_bad_files_indexes_good_ones_and_resumes(
    corpus: tuple[Path, dict[str, bytes], dict[str, str]], model_dir: Path, tmp_path: Path, ray_cluster: None
) -> None:
    folder, good, bad = corpus
    config = encoder_config(model_dir, str(tmp_path / "store"), num_actors=1)
    report = tmp_path / "report.jsonl"
    index_dir = tmp_path / "index"

    summary = ingest([str(folder)], config, str(index_dir), batch_size=4, report_path=str(report))
    assert (summary.encoded, summary.cached, summary.failed) == (3, 0, 3)
    assert summary.report_path == str(report) and summary.images_per_s > 0
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(Path(n).name for n in bad)
    for row in rows:
        assert row["status"] == "failed"
        assert bad[Path(row["path"]).name] in row["reason"], row

    fingerprint = load_pretrained(model_dir).fingerprint()
    ids = sorted(image_id_of(data) for data in good.values())
    with open_store(config.store_url) as store:
        assert sorted(store.iter_ids(fingerprint)) == ids
        records = get_records(store, [RecordKey(fingerprint, i) for i in ids])
    index = LatentIndex.load(index_dir, fingerprint, IndexConfig(dim=64))
    assert sorted(index.image_ids()) == ids
    for image_id, record in zip(ids, records, strict=True):  # each stored latent finds its own image
        assert record is not None
        assert index.search(record.latent.numpy()[None], k=1)[0][0].image_id == image_id

    again = ingest([str(folder)], config, str(index_dir), batch_size=4, report_path=str(report))
    assert (again.encoded, again.cached, again.failed) == (0, 3, 3)  # resumable: no model work
    assert len(report.read_text().splitlines()) == 3
    assert sorted(LatentIndex.load(index_dir, fingerprint, IndexConfig(dim=64)).image_ids()) == ids

    # a new image on its own: the saved index is topped up, not rebuilt
    (tmp_path / "new.png").write_bytes(png(9))
    more = ingest([str(tmp_path / "new.png")], config, str(index_dir), show_progress=False)
    assert (more.encoded, more.cached, more.failed, more.report_path) == (1, 0, 0, None)
    index = LatentIndex.load(index_dir, fingerprint, IndexConfig(dim=64))
    assert sorted(index.image_ids()) == sorted([*ids, image_id_of(png(9))])


def test_ingest_fails_fast_without_a_model(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png(1))
    config = encoder_config(tmp_path / "no-model", str(tmp_path / "store"))
    with pytest.raises(CheckpointError, match="does not exist"):
        ingest([str(tmp_path / "a.png")], config, show_progress=False)
