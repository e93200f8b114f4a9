"""FAISS similarity search over voco latents, persisted beside a manifest, rebuilt from the store.

Scores are cosine similarities: latents are L2-normalized on the way in and the metric is inner
product. Each image id maps to an int64 FAISS id (its first 8 bytes); a second image id landing on an
id already taken raises IdCollisionError instead of merging the two.

Id mapping: flat, HNSW and PQ indexes sit inside `IndexIDMap2`. IVF indexes keep their own ids
instead: `IndexIDMap2.remove_ids` compacts its id table assuming the inner index renumbers what is
left, which IVF does not, so after a removal every IVF hit came back under another image's id
(measured: 0 % self-hits). IVF stores arbitrary int64 ids natively, and a hashtable direct map gives
it reconstruction (search by image id) and removal.

On disk a directory holds `index.faiss`, `ids.npy` (n x 32 uint8 SHA-256 digests, loaded with
allow_pickle=False) and `manifest.json` (fingerprint, spec, dim, count, SHA-256 of both files, and
`feed`: the position in the store's change feed that the index reflects), written last and
atomically. The store is the source of truth: `cache.sync.load_or_rebuild` follows the feed from that
position, and rebuilds whenever the files are missing, corrupt, of another model or spec, or behind a
trimmed feed. Deleted records leave the index through the feed; evicted ones (Redis under maxmemory)
are kept, so that `cache.records.lookup` can report them as evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from cache.errors import (
    IdCollisionError,
    IndexCorruptError,
    IndexOperationError,
    IndexStaleError,
    NotIndexedError,
)
from cache.feed import FeedPosition
from cache.keys import check_name

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "onetoken.index"
MANIFEST_VERSION = 1
_FILES = ("index.faiss", "ids.npy")

# Quantized codes (product, scalar, additive, binary): scores are approximate, so hits are re-ranked.
_LOSSY = re.compile(r"PQ|SQ|RQ|LSQ|LSH|RaBitQ")
# Candidates re-ranked per hit wanted when the spec is lossy: on clustered 4096-d latents PQ64 codes alone
# reach recall@10 0.08, re-ranking 10 x k candidates 0.61 and 50 x k 1.000 (docs/BENCHMARKS.md).
DEFAULT_RERANK = 50


def is_lossy(spec: str) -> bool:
    """Whether a factory string stores quantized codes rather than the normalized latents themselves."""
    return _LOSSY.search(spec) is not None


@dataclass(frozen=True)
class IndexConfig:
    dim: int
    spec: str = "Flat"  # a faiss.index_factory string: "Flat", "IVF1024,Flat", "HNSW32", "IVF4096,PQ64"
    nprobe: int = 16  # IVF lists visited per query
    train_sample: int = 100_000  # latents sampled from the store to train IVF/PQ
    use_gpu: bool = True  # move the index to every GPU faiss sees (none with faiss-cpu)
    # Exact re-ranking (`cache.search`): k x rerank candidates from the index are re-scored by exact cosine
    # with their stored latents. 0 = off; None = DEFAULT_RERANK for a lossy spec (PQ, SQ, ...), else 0.
    # A search-time setting: not saved with the index, so it can change without a rebuild.
    rerank: int | None = None

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.nprobe <= 0 or self.train_sample <= 0:
            raise ValueError(f"dim, nprobe and train_sample must be positive, got {self}")
        if self.rerank is None:
            object.__setattr__(self, "rerank", DEFAULT_RERANK if is_lossy(self.spec) else 0)
        elif self.rerank < 0:
            raise ValueError(f"rerank must be >= 0 (0 turns re-ranking off), got {self.rerank}")


@dataclass(frozen=True)
class Hit:
    image_id: str
    score: float  # cosine similarity in [-1, 1]


def faiss_id(image_id: str) -> int:
    """The int64 FAISS id of an image: the first 8 bytes of its SHA-256, signed big-endian."""
    return int.from_bytes(bytes.fromhex(image_id[:16]), "big", signed=True)


def _normalized(latents: np.ndarray, dim: int) -> np.ndarray:
    x = np.array(latents, dtype=np.float32, order="C", ndmin=2)  # (n, d), always a copy
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"latents must have shape (n, {dim}), got {np.shape(latents)}")
    faiss.normalize_L2(x)
    return x


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LatentIndex:
    """Image ids by latent, for one model. Thread-safe: one lock around every FAISS call."""

    def __init__(self, fingerprint: str, config: IndexConfig) -> None:
        self.fingerprint = check_name("fingerprint", fingerprint)
        self.config = config
        try:
            inner = faiss.index_factory(config.dim, config.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot build index spec {config.spec!r}: {e}") from e
        self._set_index(inner)
        self._ids: dict[int, str] = {}
        self._lock = threading.Lock()
        # The store's change feed up to here is in the index (`cache.sync.follow` moves it on); None
        # when unknown (an index saved before the feed existed), which `load_or_rebuild` rebuilds.
        self.feed: FeedPosition | None = None

    def _set_index(self, index: faiss.Index) -> None:
        ivf = _extract_ivf(index)
        if ivf is not None:
            ivf.nprobe = self.config.nprobe
            if ivf.direct_map.type != faiss.DirectMap.Hashtable:
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        elif not isinstance(index, faiss.IndexIDMap2):
            index = faiss.IndexIDMap2(index)
        if self.config.use_gpu and faiss.get_num_gpus() > 0:
            # Untested here (no GPU build); reads and writes go through index_gpu_to_cpu in save().
            index = faiss.index_cpu_to_all_gpus(index)
        self._index = index

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists visited per query (recall against speed); ignored by indexes without IVF."""
        ivf = _extract_ivf(self._index)
        if ivf is not None:
            with self._lock:
                ivf.nprobe = nprobe

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._ids.get(faiss_id(image_id)) == image_id

    def image_ids(self) -> list[str]:
        return list(self._ids.values())

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, latents: np.ndarray) -> None:
        """Train IVF centroids / PQ codebooks on a sample (n, dim); a no-op for flat and HNSW."""
        if self.is_trained:
            return
        x = _normalized(latents, self.config.dim)
        with self._lock:
            try:
                self._index.train(x)
            except RuntimeError as e:
                raise IndexOperationError(
                    f"cannot train {self.config.spec!r} on {len(x)} latents: {e}"
                ) from e

    def add(self, image_ids: Sequence[str], latents: np.ndarray) -> int:
        """Index `latents` (n, dim) under `image_ids`; ids already present are skipped. Returns how many
        were added."""
        x = _normalized(latents, self.config.dim)
        if len(image_ids) != len(x):
            raise ValueError(f"{len(image_ids)} image ids for {len(x)} latents")
        with self._lock:
            if not self._index.is_trained:
                raise IndexOperationError(
                    f"index {self.config.spec!r} is untrained; train it on a sample of latents first"
                )
            new: dict[int, str] = {}
            rows: list[int] = []
            for row, image_id in enumerate(image_ids):
                fid = faiss_id(image_id)
                owner = self._ids.get(fid) or new.get(fid)
                if owner == image_id:
                    continue  # same image again: its latent is the same for this model
                if owner is not None or fid == -1:  # -1 is FAISS's "no result" marker
                    raise IdCollisionError(
                        f"images {owner or '(faiss -1 sentinel)'} and {image_id} share FAISS id {fid}"
                    )
                new[fid] = image_id
                rows.append(row)
            if rows:
                self._index.add_with_ids(x[rows], np.fromiter(new, dtype=np.int64, count=len(new)))
                self._ids.update(new)
            return len(rows)

    def remove(self, image_ids: Sequence[str]) -> int:
        """Drop `image_ids` from the index; unknown ids are ignored. Returns how many were removed."""
        with self._lock:
            wanted = dict.fromkeys(image_ids)  # dedupe, keep order
            fids = np.array([f for i in wanted if self._ids.get(f := faiss_id(i)) == i], dtype=np.int64)
            if len(fids) == 0:
                return 0
            try:
                self._index.remove_ids(faiss.IDSelectorArray(len(fids), faiss.swig_ptr(fids)))
            except RuntimeError as e:
                raise IndexOperationError(
                    f"index {self.config.spec!r} cannot remove entries ({e}); rebuild it from the store"
                ) from e
            for f in fids.tolist():
                del self._ids[f]
            return len(fids)

    def search(self, latents: np.ndarray, k: int) -> list[list[Hit]]:
        """The k most similar indexed images for each query latent (n, dim) or (dim,), best first."""
        x = _normalized(latents, self.config.dim)
        with self._lock:
            scores, fids = self._index.search(x, k)  # (n, k) each; id -1 where fewer than k exist
        return [
            [Hit(self._ids[f], float(s)) for s, f in zip(srow, frow, strict=True) if f in self._ids]
            for srow, frow in zip(scores.tolist(), fids.tolist(), strict=True)
        ]

    def search_by_id(self, image_id: str, k: int) -> list[Hit]:
        """The k indexed images most similar to an indexed one, itself excluded."""
        if image_id not in self:
            raise NotIndexedError(f"image {image_id} is not indexed for model {self.fingerprint}")
        with self._lock:
            query = self._index.reconstruct(faiss_id(image_id))  # (dim,), already normalized
        hits = self.search(query, k + 1)[0]
        return [h for h in hits if h.image_id != image_id][:k]

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index, its ids and then its manifest, each atomically (temp file + rename)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            index = self._index
            if faiss.get_num_gpus() > 0 and self.config.use_gpu:
                index = faiss.index_gpu_to_cpu(index)
            digests = np.array([bytes.fromhex(i) for i in self._ids.values()], dtype="S32")
            tmp = {name: d / f".{name}.tmp" for name in (*_FILES, "manifest.json")}
            faiss.write_index(index, str(tmp["index.faiss"]))
            # (n, 32) uint8: a plain array, so loading never needs pickle
            with open(tmp["ids.npy"], "wb") as f:  # a file object: np.save would append ".npy" to a path
                np.save(f, digests.view(np.uint8).reshape(len(digests), 32), allow_pickle=False)
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "fingerprint": self.fingerprint,
                "spec": self.config.spec,
                "dim": self.config.dim,
                "count": len(self._ids),
                **{f"{name}_sha256": _sha256_file(tmp[name]) for name in _FILES},
            }
            if self.feed is not None:
                manifest["feed"] = self.feed.to_dict()
            tmp["manifest.json"].write_text(json.dumps(manifest, indent=2))
            # the manifest moves last: a crash in between leaves a checksum mismatch, seen as corrupt
            for name in (*_FILES, "manifest.json"):
                os.replace(tmp[name], d / name)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], fingerprint: str, config: IndexConfig) -> LatentIndex:
        """Read a saved index; IndexCorruptError if unreadable, IndexStaleError if of another model/spec."""
        d = Path(directory)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
                raise IndexCorruptError(f"unknown manifest format in {d}")
            count = int(manifest["count"])
            feed = FeedPosition.from_dict(manifest["feed"]) if "feed" in manifest else None
            for name in _FILES:
                if _sha256_file(d / name) != manifest[f"{name}_sha256"]:
                    raise IndexCorruptError(f"{d / name} does not match its manifest checksum")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # any malformed JSON shape
            raise IndexCorruptError(f"cannot read index manifest in {d}: {e}") from e
        want = {"fingerprint": fingerprint, "spec": config.spec, "dim": config.dim}
        have = {name: manifest.get(name) for name in want}
        if have != want:
            raise IndexStaleError(f"index in {d} was built for {have}, expected {want}")
        try:
            index = faiss.read_index(str(d / "index.faiss"))
            digests = np.load(d / "ids.npy", allow_pickle=False)  # (n, 32) uint8
        except (RuntimeError, OSError, ValueError) as e:
            raise IndexCorruptError(f"cannot read index files in {d}: {e}") from e
        if index.ntotal != count or digests.shape != (count, 32):
            raise IndexCorruptError(
                f"index in {d} holds {index.ntotal} vectors and ids of shape {digests.shape}, "
                f"manifest says {count}"
            )
        self = cls(fingerprint, config)
        self._set_index(index)
        self._ids = {faiss_id(h): h for h in (row.tobytes().hex() for row in digests)}
        self.feed = feed
        return self


def _extract_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # raised for every index that holds no IVF
        return None
