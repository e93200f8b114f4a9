"""Typed keys of stored records and their string form, shared by every backend.

A record key reads `onetoken:<fingerprint>:rec:{<image_id>}`. The Redis Cluster hash tag (the part in
braces, which alone decides the slot) is the image id, not the fingerprint: tagging by fingerprint would
put every record of a model (1M images x 512 KiB = 512 GB at paper size) on a single shard. Tagging by
image id spreads records over the cluster while every key about one image shares a slot, so future
per-image keys can be updated together. Batches therefore span slots; they are sent as non-transactional
pipelines of single-key commands (never MGET/MSET or MULTI), which a cluster client splits per node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "onetoken"

# Fingerprints and prefixes become parts of keys and file names: no separators, no braces, no globs.
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid key component (fingerprint or prefix), else raise ValueError."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{kind} must match {_NAME.pattern}, got {value!r}")
    return value


@dataclass(frozen=True)
class RecordKey:
    """Where one image's record lives: the model fingerprint and the image's full SHA-256 hex."""

    fingerprint: str
    image_id: str

    def __post_init__(self) -> None:
        check_name("fingerprint", self.fingerprint)
        if not _IMAGE_ID.fullmatch(self.image_id):
            raise ValueError(f"image_id must be a full lowercase SHA-256 hex digest, got {self.image_id!r}")

    def to_str(self, prefix: str = DEFAULT_PREFIX) -> str:
        return f"{prefix}:{self.fingerprint}:rec:{{{self.image_id}}}"

    def __str__(self) -> str:
        return self.to_str()

    @classmethod
    def parse(cls, text: str, prefix: str = DEFAULT_PREFIX) -> RecordKey:
        """Inverse of `to_str`; raises ValueError on anything that is not a record key under `prefix`."""
        head = f"{prefix}:"
        parts = text[len(head) :].split(":") if text.startswith(head) else []
        if len(parts) != 3 or parts[1] != "rec" or not (parts[2].startswith("{") and parts[2].endswith("}")):
            raise ValueError(f"not a record key under prefix {prefix!r}: {text!r}")
        return cls(fingerprint=parts[0], image_id=parts[2][1:-1])


def record_key_prefix(fingerprint: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The common start of every record key of one model (for range scans and SCAN MATCH)."""
    return f"{check_name('prefix', prefix)}:{check_name('fingerprint', fingerprint)}:rec:{{"
