"""HTC-VLM model core: dual-channel encoder, `<voco>` compression and exact cached decoding."""
