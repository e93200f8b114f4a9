"""Errors of the encoder service. Bad images are not errors here: they come back as failed outcomes.

- `QueueFullError`: more images wait for an encoder than `max_queue`; the gRPC handler layer returns
  RESOURCE_EXHAUSTED and the client backs off.
- `EncoderUnavailableError`: no encoder could run a batch within `batch_timeout_s` (actors dead and
  not coming back, the cluster gone); the handler layer returns UNAVAILABLE.
"""

from __future__ import annotations


class EncoderError(Exception):
    """Base of the errors the encoder service raises on purpose."""


class QueueFullError(EncoderError):
    """The batcher's queue is full."""


class EncoderUnavailableError(EncoderError):
    """No encoder answered in time."""
