"""Record serialization, record stores (Redis, embedded LMDB) and the FAISS index over voco latents.

Entry points: `cache.factory` (`StoreConfig`, `open_store`), `cache.records` (put/get/lookup of
`Record`s), `cache.serde` (Record <-> bytes), `cache.index` (`LatentIndex`) and `cache.sync` (the
store -> index path: `load_or_rebuild`, `follow`, `stored_latents`), `cache.feed` (the change feed).
"""
