"""The unit OneToken caches per image: one compressed `<voco>` token's latent and key/value state.

`compress()` produces records and `decode()` consumes them; everything the service stores about an
image is a `Record`. Serialization lives in `cache.serde` (safetensors, never pickle).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def image_id_of(data: bytes) -> str:
    """The content address of an image: the full SHA-256 hex of its file bytes (never truncated)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, eq=False)
class Record:
    """What survives of one image after the `<voco>` compression pass.

    keys/values are the voco tokens' attention state in every layer, keys as cached (after the
    rotary embedding), so decoding needs nothing else of the image.
    """

    image_id: str  # SHA-256 hex of the image file's bytes
    fingerprint: str  # model fingerprint: records of another model are never used
    latent: torch.Tensor  # (d,) mean of the voco tokens' final hidden states (the one token's, by default)
    keys: torch.Tensor  # (n_layers, n_kv_heads, n_voco, head_dim)
    values: torch.Tensor  # (n_layers, n_kv_heads, n_voco, head_dim)
    voco_position: int  # position of the first voco token: after the shared prefix, V_hy and separator
    source_uri: str = ""
    created_at: float = 0.0  # unix seconds

    def __post_init__(self) -> None:
        if len(self.image_id) != 64 or any(c not in "0123456789abcdef" for c in self.image_id):
            raise ValueError(f"image_id must be a full lowercase SHA-256 hex digest, got {self.image_id!r}")
        if self.keys.shape != self.values.shape or self.keys.ndim != 4:
            raise ValueError(
                f"keys and values must share a 4D shape (layers, kv_heads, n_voco, head_dim), "
                f"got {tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        if self.latent.ndim != 1:
            raise ValueError(f"latent must be 1D (d,), got shape {tuple(self.latent.shape)}")

    @property
    def n_voco(self) -> int:
        return self.keys.shape[2]

    @property
    def kv_nbytes(self) -> int:
        """Bytes of key/value state held in memory (before any serialization codec)."""
        return self.keys.numel() * self.keys.element_size() * 2
