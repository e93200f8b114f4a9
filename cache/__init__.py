"""Record serialization, record stores (Redis, embedded LMDB) and the FAISS index over voco latents.

Entry points: `open_store(url)`, `cache.records` (put/get/lookup of `Record`s), `cache.serde`
(Record <-> bytes) and `cache.index` (`LatentIndex`, `load_or_rebuild`).
"""
