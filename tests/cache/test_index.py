import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.errors import (
    IdCollisionError,
    IndexCorruptError,
    IndexOperationError,
    IndexStaleError,
    NotIndexedError,
)
from cache.index import Hit, IndexConfig, LatentIndex, faiss_id
from cache.lmdb_store import LmdbStore
from cache.records import delete_record, key_of, put_records
from cache.sync import load_or_rebuild
from htcvlm.record import image_id_of

from .helpers import FINGERPRINT, make_record

D = 64
SPECS = ["Flat", "IVF16,Flat", "HNSW16", "IVF8,PQ8x4"]


def clustered(n: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """(n, D) float32 around `clusters` centres, like latents of similar images."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D))
    return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, D))).astype(np.float32)


def ids(n: int, start: int = 0) -> list[str]:
    return [image_id_of(f"image-{i}".encode()) for i in range(start, start + n)]


def self_hit_rate(hits: list[list[Hit]], image_ids: list[str], spec: str) -> float:
    """How often an indexed latent finds its own image: first for exact codes, in the top k for PQ
    (lossy codes blur neighbours within one cluster)."""
    found = [
        (h[0].image_id == i) if "PQ" not in spec else (i in {hit.image_id for hit in h})
        for h, i in zip(hits, image_ids, strict=True)
    ]
    return float(np.mean(found))


def built(spec: str, n: int = 2000) -> tuple[LatentIndex, list[str], np.ndarray]:
    x = clustered(n)
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=D, spec=spec, nprobe=8))
    index.train(x)
    image_ids = ids(n)
    assert index.add(image_ids, x) == n
    return index, image_ids, x


@pytest.mark.parametrize("spec", SPECS)
def test_each_latent_finds_its_own_image(spec: str) -> None:
    index, image_ids, x = built(spec)
    hits = index.search(x[:200], k=10)
    assert len(hits) == 200 and all(len(h) == 10 for h in hits)
    # PQ at 4 bits is coarse (and its training is slow here); it shows the path, not the recall
    self_hits = self_hit_rate(hits, image_ids[:200], spec)
    assert self_hits >= {"Flat": 1.0, "IVF8,PQ8x4": 0.5}.get(spec, 0.9), self_hits
    for h in hits:
        scores = [hit.score for hit in h]
        assert scores == sorted(scores, reverse=True)
        assert "PQ" in spec or all(-1.001 <= s <= 1.001 for s in scores)  # exact codes: cosine


def test_scores_are_cosine_similarities() -> None:
    index, image_ids, x = built("Flat", 50)
    hit = index.search(x[3] * 42.0, k=1)[0][0]  # the scale of a query does not matter
    assert hit.image_id == image_ids[3] and hit.score == pytest.approx(1.0, abs=1e-5)
    a, b = x[3] / np.linalg.norm(x[3]), x[7] / np.linalg.norm(x[7])
    score_7 = {h.image_id: h.score for h in index.search(x[3], k=50)[0]}[image_ids[7]]
    assert score_7 == pytest.approx(float(a @ b), abs=1e-5)


def test_fewer_than_k_and_empty() -> None:
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=D))
    assert index.search(clustered(2), k=5) == [[], []]
    index.add(ids(3), clustered(3))
    assert len(index.search(clustered(1)[0], k=5)[0]) == 3


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat"])
def test_search_by_image_id_excludes_the_image_itself(spec: str) -> None:
    index, image_ids, x = built(spec)
    hits = index.search_by_id(image_ids[5], k=5)
    assert len(hits) == 5 and image_ids[5] not in {h.image_id for h in hits}
    if spec == "Flat":  # exact: the neighbours of its latent, minus itself
        assert hits == index.search(x[5], k=6)[0][1:]
    with pytest.raises(NotIndexedError):
        index.search_by_id(ids(1, start=10**6)[0], k=5)


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat"])
def test_removal_keeps_every_other_id_right(spec: str) -> None:
    # regression: IndexIDMap2 over IVF mislabels every hit after a removal, so IVF keeps its own ids
    index, image_ids, x = built(spec)
    assert index.remove(image_ids[:1000] + image_ids[:3] + ids(2, start=10**6)) == 1000
    assert len(index) == 1000 and image_ids[0] not in index and image_ids[1500] in index
    hits = index.search(x[1000:1200], k=10)
    self_hits = self_hit_rate(hits, image_ids[1000:1200], spec)
    assert self_hits >= (1.0 if spec == "Flat" else 0.9), self_hits
    assert not {h.image_id for row in hits for h in row} & set(image_ids[:1000])
    assert {h.image_id for h in index.search_by_id(image_ids[1500], k=20)} <= set(image_ids[1000:])
    assert index.add(image_ids[:10], x[:10]) == 10  # removed ids can come back


def test_hnsw_cannot_remove_and_says_so() -> None:
    index, image_ids, _ = built("HNSW16", 100)
    with pytest.raises(IndexOperationError, match="rebuild"):
        index.remove(image_ids[:1])
    assert len(index) == 100


def test_adding_an_image_twice_is_a_no_op() -> None:
    index, image_ids, x = built("Flat", 10)
    assert index.add(image_ids[:5] + image_ids[:5], x[:10]) == 0
    assert len(index) == 10 and len(index.search(x[0], k=20)[0]) == 10


def test_an_id_collision_is_refused_not_merged() -> None:
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=D))
    first = "ab" * 8 + "0" * 48
    twin = "ab" * 8 + "f" * 48  # same first 8 bytes, another image
    assert faiss_id(first) == faiss_id(twin)
    index.add([first], clustered(1))
    with pytest.raises(IdCollisionError, match=twin):
        index.add([ids(1)[0], twin], clustered(2))
    assert len(index) == 1 and twin not in index and ids(1)[0] not in index  # nothing half-added
    with pytest.raises(IdCollisionError):
        index.add(["ff" * 8 + "0" * 48], clustered(1))  # id -1 is FAISS's "no result"


def test_untrained_and_malformed_input_is_refused() -> None:
    index = LatentIndex(FINGERPRINT, IndexConfig(dim=D, spec="IVF16,Flat"))
    with pytest.raises(IndexOperationError, match="untrained"):
        index.add(ids(1), clustered(1))
    with pytest.raises(IndexOperationError, match="cannot train"):
        LatentIndex(FINGERPRINT, IndexConfig(dim=D, spec="IVF64,Flat")).train(clustered(10))
    with pytest.raises(ValueError, match="shape"):
        index.search(np.zeros((2, D + 1), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="faiss cannot build"):
        LatentIndex(FINGERPRINT, IndexConfig(dim=D, spec="NoSuchIndex"))


@pytest.mark.parametrize("spec", ["Flat", "IVF16,Flat"])
def test_save_and_load_give_the_same_answers(spec: str, tmp_path: Path) -> None:
    index, image_ids, x = built(spec, 500)
    index.remove(image_ids[:50])
    index.save(tmp_path)
    loaded = LatentIndex.load(tmp_path, FINGERPRINT, index.config)
    assert sorted(loaded.image_ids()) == sorted(image_ids[50:])
    assert loaded.search(x[:100], k=5) == index.search(x[:100], k=5)
    assert loaded.search_by_id(image_ids[60], k=3) == index.search_by_id(image_ids[60], k=3)
    with pytest.raises(IndexStaleError, match="other-model"):
        LatentIndex.load(tmp_path, "other-model", index.config)
    with pytest.raises(IndexStaleError, match="HNSW16"):
        LatentIndex.load(tmp_path, FINGERPRINT, IndexConfig(dim=D, spec="HNSW16"))


# --- rebuilding from the store, the source of truth ---


@pytest.fixture
def filled(lmdb_store: LmdbStore) -> LmdbStore:
    x = torch.from_numpy(clustered(60))
    put_records(lmdb_store, [make_record(i, latent=x[i]) for i in range(60)])
    return lmdb_store


def rebuilt(directory: Path, store: LmdbStore, caplog: pytest.LogCaptureFixture) -> tuple[LatentIndex, str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cache.index"):
        index = load_or_rebuild(directory, store, FINGERPRINT, IndexConfig(dim=D))
    return index, " ".join(r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage())


def test_missing_index_is_built_and_saved(
    tmp_path: Path, filled: LmdbStore, caplog: pytest.LogCaptureFixture
) -> None:
    index, why = rebuilt(tmp_path / "idx", filled, caplog)
    assert "no saved index" in why and len(index) == 60
    assert (tmp_path / "idx" / "manifest.json").exists()
    again, why = rebuilt(tmp_path / "idx", filled, caplog)
    assert why == "" and sorted(again.image_ids()) == sorted(index.image_ids())  # loaded, not rebuilt


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "index.faiss").unlink(), "No such file"),
        (lambda d: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:100]), "checksum"),
        (lambda d: (d / "ids.npy").write_bytes(b"\x93NUMPY garbage"), "checksum"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "cannot read index manifest"),
        (lambda d: (d / "manifest.json").write_text('{"format": "other"}'), "unknown manifest format"),
        (lambda d: (d / "manifest.json").write_text("[1, 2]"), "cannot read index manifest"),
    ],
    ids=[
        "index-deleted",
        "index-truncated",
        "ids-garbled",
        "manifest-garbled",
        "manifest-foreign",
        "manifest-list",
    ],
)
def test_damaged_index_is_rebuilt(
    tmp_path: Path, filled: LmdbStore, caplog: pytest.LogCaptureFixture, damage, reason: str
) -> None:
    rebuilt(tmp_path, filled, caplog)
    damage(tmp_path)
    index, why = rebuilt(tmp_path, filled, caplog)
    assert reason in why and len(index) == 60
    assert index.search_by_id(make_record(0).image_id, k=1)  # usable
    assert LatentIndex.load(tmp_path, FINGERPRINT, IndexConfig(dim=D)).image_ids()  # and saved sound


def test_records_written_or_deleted_while_the_index_was_down_are_followed_not_rebuilt(
    tmp_path: Path, filled: LmdbStore, caplog: pytest.LogCaptureFixture
) -> None:
    rebuilt(tmp_path, filled, caplog)
    put_records(filled, [make_record(100 + i) for i in range(5)])  # written while the index was down
    filled.delete(key_of(make_record(0)))
    index, why = rebuilt(tmp_path, filled, caplog)
    assert why == "" and len(index) == 64 and make_record(0).image_id not in index


def test_an_index_of_another_model_or_spec_is_rebuilt(
    tmp_path: Path, filled: LmdbStore, caplog: pytest.LogCaptureFixture
) -> None:
    LatentIndex("other-model", IndexConfig(dim=D)).save(tmp_path)
    index, why = rebuilt(tmp_path, filled, caplog)
    assert "other-model" in why and index.fingerprint == FINGERPRINT and len(index) == 60
    with pytest.raises(IndexCorruptError):
        LatentIndex.load(tmp_path / "nowhere", FINGERPRINT, IndexConfig(dim=D))


def test_indexed_ids_without_a_record_are_kept_as_evicted(
    tmp_path: Path, filled: LmdbStore, caplog: pytest.LogCaptureFixture
) -> None:
    rebuilt(tmp_path, filled, caplog)
    with filled._env.begin(write=True) as txn:  # an eviction: the record vanishes, the feed says nothing
        txn.delete(filled._k(key_of(make_record(3))))
    index, why = rebuilt(tmp_path, filled, caplog)
    assert why == "" and make_record(3).image_id in index and len(index) == 60
    assert not delete_record(filled, index, key_of(make_record(3)))  # already gone from the store
    assert make_record(3).image_id not in index


def test_rebuild_trains_ivf_and_skips_unreadable_records(
    tmp_path: Path, filled: LmdbStore, caplog: pytest.LogCaptureFixture
) -> None:
    filled.put(key_of(make_record(7)), b"not a record")
    with caplog.at_level(logging.WARNING, logger="cache.sync"):
        index = load_or_rebuild(tmp_path, filled, FINGERPRINT, IndexConfig(dim=D, spec="IVF4,Flat"))
    assert len(index) == 59 and make_record(7).image_id not in index
    assert any("passing over image" in r.getMessage() for r in caplog.records)
