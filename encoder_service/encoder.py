"""The encoder: a plain class that loads the model once and turns image bytes into stored records.

It runs unchanged in-process (`LocalEncoderPool`), as a Ray actor (`RayEncoderPool`) and as a Ray Data
`map_batches` stage (`__call__`, for corpus ingestion). Per image it does the least work possible: an
image already in the store costs one batched store read and no model work; a bad image becomes a
failed outcome with its reason and never fails the batch; the rest are compressed in one batched pass
and written to the store in one batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cache.factory import StoreConfig, open_store
from cache.records import put_records
from cache.serde import check_source_uri
from cache.sync import stored_latents
from cache.timed import StoreCall, StoreCalls, TimedStore
from encoder_service.config import EncoderConfig
from htcvlm.checkpoint import load_pretrained
from htcvlm.errors import ImageTooLargeError
from htcvlm.images import pixels_from_bytes
from htcvlm.record import image_id_of

logger = logging.getLogger(__name__)

Status = Literal["encoded", "cached", "failed"]


@dataclass(frozen=True)
class EncodeOutcome:
    image_id: str  # full SHA-256 hex of the bytes
    status: Status
    latent: np.ndarray | None  # (d,) float32 for encoded and cached; None for failed
    error: str = ""  # failed: why
    too_large: bool = False  # failed because of the pixel limit


@dataclass(frozen=True)
class EncodedBatch:
    outcomes: list[EncodeOutcome]  # one per image, in order
    store_calls: list[StoreCall]  # the encoder's store calls since its last batch, timed where they ran


class Encoder:
    """Loads the model once (`load_pretrained`) and opens the store; `encode` does the rest.

    `images_compressed` counts images that went through the model: the evidence that cached images cost
    no model work. Every store call is timed; `encode_batch` hands the timings back with the outcomes.
    """

    def __init__(self, config: EncoderConfig, store: StoreConfig) -> None:
        self.config = config
        self.model = load_pretrained(config.model_dir, config.device)
        self.store_calls = StoreCalls()
        self.store = TimedStore(open_store(store), self.store_calls)
        self.images_compressed = 0  # model work done, for tests and metrics
        logger.info("encoder ready: model %s on %s", self.fingerprint[:12], self.model.device)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint()

    @property
    def latent_dim(self) -> int:
        return int(self.model.llm.config.hidden_size)

    def info(self) -> tuple[str, int]:
        """(fingerprint, latent_dim): one round trip for a Ray caller."""
        return self.fingerprint, self.latent_dim

    def _cached(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Latents of the images already stored for this model (an unusable record is re-encoded)."""
        found: dict[str, np.ndarray] = {}
        for image_ids, latents in stored_latents(self.store, self.fingerprint, ids):
            found.update(zip(image_ids, latents, strict=True))
        return found

    def encode(
        self, images: Sequence[bytes], source_uris: Sequence[str] | None = None
    ) -> list[EncodeOutcome]:
        """One outcome per image, in the order given.

        - already stored for this model: "cached", latent read back from the record, no model work;
        - not a usable image, or a source URI over MAX_SOURCE_URI_BYTES: "failed" with the reason (the
          rest of the batch goes on);
        - otherwise "encoded": compressed in one batched pass and written to the store in one batch.
        Identical images in one call are compressed once. `StoreUnavailableError` propagates.
        """
        uris = list(source_uris) if source_uris is not None else [""] * len(images)
        if len(uris) != len(images):
            raise ValueError(f"{len(images)} images but {len(uris)} source URIs")
        ids = [image_id_of(b) for b in images]
        unique = list(dict.fromkeys(ids))  # identical images in one batch are compressed once
        outcomes: dict[str, EncodeOutcome] = {
            i: EncodeOutcome(i, "cached", latent) for i, latent in self._cached(unique).items()
        }
        first = {image_id: n for n, image_id in reversed(list(enumerate(ids)))}
        todo, pixels = [], []
        for image_id in unique:
            if image_id in outcomes:
                continue
            n = first[image_id]
            try:
                check_source_uri(uris[n])
                model_config = self.model.config
                pixels.append(
                    pixels_from_bytes(
                        images[n], model_config.image_size, self.config.max_pixels, model_config.preprocess
                    )
                )
                todo.append(image_id)
            except ValueError as e:  # InvalidImageError, or a source URI no record can keep
                outcomes[image_id] = EncodeOutcome(
                    image_id, "failed", None, str(e), isinstance(e, ImageTooLargeError)
                )
        if todo:
            with torch.inference_mode():  # (B, 3, S, S) -> B records, one batched pass
                records = self.model.compress_pixels(
                    torch.stack(pixels), todo, [uris[first[i]] for i in todo]
                )
            put_records(self.store, records, self.config.kv_dtype)
            self.images_compressed += len(records)
            for record in records:
                outcomes[record.image_id] = EncodeOutcome(record.image_id, "encoded", record.latent.numpy())
        return [outcomes[i] for i in ids]

    def encode_batch(self, images: Sequence[bytes], source_uris: Sequence[str] | None = None) -> EncodedBatch:
        """`encode`, with the store calls it made (and any made since the last batch) for metrics."""
        outcomes = self.encode(images, source_uris)
        return EncodedBatch(outcomes, self.store_calls.take())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data stage: rows of (path, data, error) from the reader -> one row of results each.

        Rows the reader could not read pass through as failed; latents of failed rows are zeros.
        """
        paths = [str(p) for p in batch["path"]]
        readable = [n for n, err in enumerate(batch["error"]) if not err]
        outcomes = self.encode([bytes(batch["data"][n]) for n in readable], [paths[n] for n in readable])
        by_row = dict(zip(readable, outcomes, strict=True))
        status, image_id, reason = [], [], []
        latents = np.zeros((len(paths), self.latent_dim), dtype=np.float32)
        for n in range(len(paths)):
            outcome = by_row.get(n)
            if outcome is None:
                status.append("failed")
                image_id.append("")
                reason.append(str(batch["error"][n]))
                continue
            status.append(outcome.status)
            image_id.append(outcome.image_id)
            reason.append(outcome.error)
            if outcome.latent is not None:
                latents[n] = outcome.latent
        return {
            "path": np.array(paths, dtype=object),
            "image_id": np.array(image_id, dtype=object),
            "status": np.array(status, dtype=object),
            "reason": np.array(reason, dtype=object),
            "latent": latents,
            "fingerprint": np.array([self.fingerprint] * len(paths), dtype=object),
        }

    def stats(self) -> dict[str, int]:
        """Work done by this encoder and the process it runs in (a Ray caller sees restarts by pid)."""
        return {"images_compressed": self.images_compressed, "pid": os.getpid()}

    def close(self) -> None:
        self.store.close()
