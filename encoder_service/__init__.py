"""Encoders: Ray actors that run `compress()` once per image, a dynamic batcher in front, and corpus
ingestion on Ray Data. Entry points: `open_pool(EncoderConfig, StoreConfig)` and
`ingest(inputs, EncoderConfig, StoreConfig, ...)`."""
