"""Errors of the LLM worker's domain layer. Only `llm_worker.handlers` turns errors into status codes.

- `InvalidRequestError`: a malformed request (no image, bad k, a latent of the wrong size, bad options);
  INVALID_ARGUMENT. Model-core errors (`InvalidImageError`, `InvalidQuestionError`) map there too.
- `ImageNotFoundError`: no record of the image for this model; NOT_FOUND. `evicted` says whether the image
  was encoded once and its record has since been dropped by the store (send the bytes again).
- `DecoderUnavailableError`: the decoding loop stopped (shutdown) before the Ask finished; UNAVAILABLE.
- `DecodeQueueFullError`: more Asks are waiting for a decode slot than the worker admits;
  RESOURCE_EXHAUSTED (the client backs off and retries).
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the errors the LLM worker raises on purpose."""


class InvalidRequestError(WorkerError, ValueError):
    """The request itself is malformed."""


class ImageNotFoundError(WorkerError, KeyError):
    """No record of the image for this model."""

    def __init__(self, image_id: str, evicted: bool = False) -> None:
        self.image_id, self.evicted = image_id, evicted
        if evicted:
            message = (
                f"the record of image {image_id} was evicted from the store; "
                "send the image bytes again (EncodeImage, or Ask with image_bytes)"
            )
        else:
            message = f"image {image_id} is not encoded for this model; call EncodeImage with its bytes first"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DecodeQueueFullError(WorkerError):
    """The decode queue is full."""


class DecoderUnavailableError(WorkerError):
    """The decoding loop stopped before a question was answered."""
