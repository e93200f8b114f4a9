"""Readers of published checkpoint formats: each maps a format's keys and settings onto OneToken's modules
and config, so the model classes never know where their weights came from."""
