"""Errors of the model core. The service's handler layer maps each to one gRPC status code.

- `InvalidImageError` (and `ImageTooLargeError`): the caller sent bytes that are not a usable image;
  caught by the encoder front and returned as INVALID_ARGUMENT.
- `InvalidQuestionError`: an empty question or one over the context limit; INVALID_ARGUMENT. Its
  subclass `TooManyImagesError`: more images in one question than the context holds; the same.
- `RecordMismatchError`: a record made by another model (fingerprint) or another geometry; the caller
  re-encodes the image with this model; FAILED_PRECONDITION.
- `PlacementError`: several images asked about together under a rotary embedding whose keys cannot be
  moved exactly (dynamic NTK, LongRoPE): the model cannot do it, asking again will not help. No RPC
  asks about several images yet, so no handler maps it; FAILED_PRECONDITION would fit.
- `CheckpointError`: a model directory is incomplete or inconsistent; raised at start-up, never caught.
"""

from __future__ import annotations


class HTCError(Exception):
    """Base of every error the model core raises on purpose."""


class InvalidImageError(HTCError, ValueError):
    """The bytes are not a decodable image (truncated, corrupt, not an image, zero-size)."""


class ImageTooLargeError(InvalidImageError):
    """The image has more pixels than the configured limit (a decompression-bomb guard)."""


class InvalidQuestionError(HTCError, ValueError):
    """The question is empty or longer than the model's context allows."""


class TooManyImagesError(InvalidQuestionError):
    """More records in one question than the model's context holds beside the prompt and the answer."""


class RecordMismatchError(HTCError, ValueError):
    """A record that this model cannot decode from: another fingerprint, voco count or position."""


class PlacementError(HTCError, ValueError):
    """The model's rotary embedding is not a fixed rotation per position: a cached key cannot be moved."""


class CheckpointError(HTCError, FileNotFoundError):
    """A model directory is missing a file or holds weights that do not fit its config."""
