"""The worker's domain layer: records, encoders, the index and the decode scheduler behind one object.

No gRPC here: methods take and return plain values and raise the typed errors of `htcvlm`, `cache`,
`encoder_service` and `llm_worker.errors`; `llm_worker.handlers` maps those to status codes. Store and
index calls block, so they run in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cache.errors import CorruptRecordError, NotIndexedError
from cache.factory import open_store
from cache.feed import FeedTrimmedError
from cache.index import IndexConfig, LatentIndex
from cache.keys import RecordKey
from cache.records import LookupStatus, delete_record, get_records, lookup
from cache.search import search_stored
from cache.serde import check_source_uri, read_metadata
from cache.store import RecordStore
from cache.sync import Followed, build_from_store, follow, load_or_rebuild
from encoder_service.pool import EncoderPool, open_pool
from htcvlm.checkpoint import load_pretrained
from htcvlm.decode import Answer, check_records, encode_questions, max_images
from htcvlm.errors import CheckpointError, ImageTooLargeError, InvalidImageError, TooManyImagesError
from htcvlm.generation import GenerationOptions, StepEvent
from htcvlm.model import HTCVLM
from htcvlm.record import Record
from llm_worker.config import WorkerConfig
from llm_worker.errors import ImageNotFoundError, InvalidRequestError
from llm_worker.scheduler import AskJob, DecodeScheduler

logger = logging.getLogger(__name__)

MAX_K = 1000


@dataclass(frozen=True)
class Encoded:
    image_id: str
    cached: bool
    latent: np.ndarray  # (d,) float32


@dataclass
class Timings:
    queue_ms: float = 0.0
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    first_token_ms: float | None = None  # None until the first token arrives


@dataclass
class AskCall:
    """One question in flight: iterate `events()`; `timings` is complete afterwards."""

    image_ids: list[str]  # the images the question is about, in context order
    job: AskJob
    queue: asyncio.Queue[StepEvent | BaseException | None]
    started: float
    timings: Timings = field(default_factory=Timings)

    @property
    def image_id(self) -> str:
        return self.image_ids[0]

    async def answer(self) -> Answer:
        """Wait for the whole answer (the events' text joined; EOS is not part of it)."""
        answer = Answer(text="", token_ids=[], prompt_tokens=0, finish_reason="length")
        async for event in self.events():
            answer.text += event.text
            answer.prompt_tokens = event.prompt_tokens
            if event.finished != "eos":  # the EOS token is the event that finishes with "eos"
                answer.token_ids.append(event.token_id)
            answer.finish_reason = event.finished or answer.finish_reason
        answer.text = answer.text.strip()
        return answer

    async def events(self) -> AsyncIterator[StepEvent]:
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if self.timings.first_token_ms is None:
                    self.timings.first_token_ms = (time.perf_counter() - self.started) * 1e3
                yield item
            end = time.perf_counter()
            if self.job.started_at:
                self.timings.queue_ms = (self.job.started_at - self.job.enqueued_at) * 1e3
                self.timings.decode_ms = (end - self.job.started_at) * 1e3
            self.timings.total_ms = (end - self.started) * 1e3
        finally:
            self.job.cancel()  # a caller that stops listening (cancelled, deadline) stops the decoding


@dataclass(frozen=True)
class ImageRef:
    """An image to ask about: by the id of a cached one, or by its bytes (encoded first)."""

    image_id: str | None = None
    image_bytes: bytes | None = None


@dataclass(frozen=True)
class SearchHit:
    image_id: str
    score: float
    source_uri: str


@dataclass(frozen=True)
class ImageInfo:
    image_id: str
    fingerprint: str
    source_uri: str
    created_at: float
    voco_position: int
    n_voco: int
    latent_dim: int
    kv_bytes: int
    indexed: bool


class OneTokenService:
    def __init__(
        self,
        config: WorkerConfig,
        model: HTCVLM,
        store: RecordStore,
        index: LatentIndex,
        encoders: EncoderPool,
    ) -> None:
        self.config = config
        self.model = model
        self.fingerprint = model.fingerprint()
        self.store = store
        self.index = index
        self.encoders = encoders
        self.scheduler = DecodeScheduler(model, config.max_decode_batch, config.max_pending_asks)
        self.scheduler.start()
        self._index_dirty = False
        self.damaged_hits = 0  # search hits dropped because their record is damaged (logged with ids)
        # Told of every index sync: ("follow" or "rebuild", seconds, the feed changes it applied).
        self.on_index_sync: Callable[[str, float, Followed], None] | None = None
        self._follower: asyncio.Task[None] | None = None
        if config.index_follow_s > 0:
            self._follower = asyncio.get_running_loop().create_task(self._follow_loop())

    @classmethod
    async def open(cls, config: WorkerConfig) -> OneTokenService:
        """Load the model, open the store and the encoders, and load (or rebuild) the index."""
        model = await asyncio.to_thread(load_pretrained, config.encoder.model_dir, config.device)
        encoders = await open_pool(config.encoder, config.store)
        if encoders.fingerprint != model.fingerprint():
            await encoders.close()
            raise CheckpointError(
                f"the encoders run model {encoders.fingerprint[:12]}…, the decoder "
                f"{model.fingerprint()[:12]}…; point both at the same checkpoint"
            )
        store = open_store(config.store)
        index_config = IndexConfig(
            dim=model.llm.config.hidden_size, spec=config.index_spec, rerank=config.index_rerank
        )
        index = await asyncio.to_thread(
            load_or_rebuild, config.index_dir, store, model.fingerprint(), index_config
        )
        logger.info("serving model %s with %d indexed images", model.fingerprint()[:12], len(index))
        return cls(config, model, store, index, encoders)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        self.scheduler.stop()
        await self.encoders.close()
        await self.save_index()
        self.store.close()

    # ---- images ----

    async def encode(self, image: bytes, source_uri: str = "") -> Encoded:
        """Compress an image once (a cached one costs no model work) and index its latent."""
        if not image:
            raise InvalidImageError("empty image: 0 bytes received")
        try:
            check_source_uri(source_uri)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        outcome = await self.encoders.encode(image, source_uri)
        if outcome.status == "failed":
            raise (ImageTooLargeError if outcome.too_large else InvalidImageError)(outcome.error)
        assert outcome.latent is not None, f"{outcome.status} outcome without a latent"
        if outcome.image_id not in self.index:
            await asyncio.to_thread(self.index.add, [outcome.image_id], outcome.latent[None])
            self._index_dirty = True
        return Encoded(outcome.image_id, outcome.status == "cached", outcome.latent)

    async def record(self, image_id: str | None = None, image_bytes: bytes | None = None) -> Record:
        """The record of an image named by id, or by bytes (encoded first when not cached)."""
        if image_bytes is not None:
            image_id = (await self.encode(image_bytes)).image_id
        elif not image_id:
            raise InvalidRequestError("name the image: set image_id or image_bytes")
        return await self._stored(self._key(image_id))

    async def _stored(self, key: RecordKey) -> Record:
        found = await asyncio.to_thread(lookup, self.store, self.index, key)
        if found.status is LookupStatus.FOUND:
            assert found.record is not None
            return found.record
        raise ImageNotFoundError(key.image_id, evicted=found.status is LookupStatus.EVICTED)

    def _key(self, image_id: str) -> RecordKey:
        """The key of an image id as clients send it: hex in either case (ids are stored lower-case)."""
        if not image_id:
            raise InvalidRequestError("set image_id: the SHA-256 hex of the image bytes")
        try:
            return RecordKey(self.fingerprint, image_id.lower())
        except ValueError as e:
            raise InvalidRequestError(f"{e}; image ids are the SHA-256 hex of the image bytes") from e

    # ---- questions ----

    def generation_options(
        self, max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0, seed: int | None = None
    ) -> GenerationOptions:
        """Options with the API's zero-means-default convention; InvalidRequestError if out of range."""
        try:
            return GenerationOptions(
                max_new_tokens=max_new_tokens or self.config.default_max_new_tokens,
                temperature=temperature,
                top_p=top_p or 1.0,
                seed=seed,
            )
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e

    async def ask(
        self,
        question: str,
        options: GenerationOptions,
        image_id: str | None = None,
        image_bytes: bytes | None = None,
        images: Sequence[ImageRef] = (),
    ) -> AskCall:
        """Resolve the image (or `images`, several in one context, in order) and queue the question; the
        returned call streams its tokens."""
        started = time.perf_counter()
        if images and (image_id or image_bytes is not None):
            raise InvalidRequestError("name the images one way: image_id/image_bytes, or images")
        refs = list(images) or [ImageRef(image_id, image_bytes)]
        if len(refs) > (limit := max_images(self.model)):  # before any of them is looked up
            raise TooManyImagesError(
                f"{len(refs)} images do not fit the model's context: at most {limit} images fit, with a "
                "one-token question and answer; ask about fewer images"
            )
        # off the event loop: tokenizing takes CPU time that other calls must not wait behind
        prompts = await asyncio.to_thread(
            encode_questions, self.model, [question], options.max_new_tokens, len(refs)
        )
        records = list(await asyncio.gather(*(self.record(r.image_id, r.image_bytes) for r in refs)))
        check_records(self.model, records)
        encode_ms = (time.perf_counter() - started) * 1e3
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StepEvent | BaseException | None] = asyncio.Queue()

        def emit(item: StepEvent | BaseException | None) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, item)

        job = AskJob(records, prompts[0], options, emit)
        self.scheduler.submit(job)
        return AskCall([r.image_id for r in records], job, events, started, Timings(encode_ms=encode_ms))

    async def ask_search(
        self,
        question: str,
        options: GenerationOptions,
        k: int,
        image_id: str | None = None,
        image_bytes: bytes | None = None,
        latent: Sequence[float] | None = None,
    ) -> tuple[AskCall, list[SearchHit]]:
        """Search, then ask one question over the hits (most similar first): the call and the hits."""
        hits = await self.search(k, image_id=image_id, image_bytes=image_bytes, latent=latent)
        if not hits:
            raise NotIndexedError("the search found no image to ask about: encode images first")
        call = await self.ask(question, options, images=[ImageRef(image_id=h.image_id) for h in hits])
        return call, hits

    # ---- search ----

    async def search(
        self,
        k: int,
        image_id: str | None = None,
        image_bytes: bytes | None = None,
        latent: Sequence[float] | None = None,
    ) -> list[SearchHit]:
        """The k most similar indexed images (the query image itself first when it is indexed)."""
        if not 1 <= k <= MAX_K:
            raise InvalidRequestError(f"k must be in [1, {MAX_K}], got {k}")
        dim = self.index.config.dim
        if latent is not None:
            query = np.asarray(latent, dtype=np.float32)
            # the index normalizes the query: its norm must be finite (3e38 in every place overflows) and > 0
            with np.errstate(over="ignore"):  # an overflow is exactly what is refused below
                norm = np.linalg.norm(query) if query.shape == (dim,) else 0.0
            if not (np.isfinite(query).all() and np.isfinite(norm) and norm > 0):
                raise InvalidRequestError(
                    f"latent must be {dim} finite values with a finite, non-zero norm; got {query.size} "
                    f"values of norm {norm:g}"
                )
        elif image_bytes is not None:
            query = (await self.encode(image_bytes)).latent
        elif image_id:
            key = self._key(image_id)
            if key.image_id not in self.index:
                raise NotIndexedError(f"image {key.image_id} is not indexed; encode it first")
            record = (await asyncio.to_thread(get_records, self.store, [key]))[0]
            if record is None:
                raise ImageNotFoundError(key.image_id, evicted=True)
            query = record.latent.float().numpy()
        else:
            raise InvalidRequestError("set one query: image_id, image_bytes or latent")
        # re-ranked by exact cosine with stored latents for a lossy index (IndexConfig.rerank)
        hits = await asyncio.to_thread(search_stored, self.index, self.store, query, k)
        blobs = await asyncio.to_thread(self.store.get_many, [self._key(h.image_id) for h in hits])
        found = []
        for hit, blob in zip(hits, blobs, strict=True):
            if blob is None:  # deleted or evicted since it was indexed (here or by another process)
                logger.info("search left out image %s: its record is gone from the store", hit.image_id)
                continue
            try:
                source_uri = read_metadata(blob)["source_uri"]
            except CorruptRecordError as e:  # one damaged record must not fail every search near it
                self.damaged_hits += 1
                logger.warning("search dropped image %s: its stored record is damaged (%s)", hit.image_id, e)
                continue
            found.append(SearchHit(hit.image_id, hit.score, source_uri))
        return found

    # ---- metadata and deletion ----

    async def get_image(self, image_id: str) -> ImageInfo:
        record = await self._stored(self._key(image_id))
        return ImageInfo(
            image_id=record.image_id,
            fingerprint=record.fingerprint,
            source_uri=record.source_uri,
            created_at=record.created_at,
            voco_position=record.voco_position,
            n_voco=record.n_voco,
            latent_dim=record.latent.numel(),
            kv_bytes=record.kv_nbytes,
            indexed=record.image_id in self.index,
        )

    async def delete_image(self, image_id: str) -> bool:
        """Remove an image's record and index entry; False (not an error) if it was not there."""
        deleted = await asyncio.to_thread(delete_record, self.store, self.index, self._key(image_id))
        self._index_dirty = True
        return deleted

    # ---- health ----

    async def health(self) -> str | None:
        """None while the worker can answer; else why it cannot. A dead decoding loop is restarted here
        (the next check sees it back); the store is probed with one read, after its bounded retries."""
        if not self.scheduler.alive:
            logger.error("the decoding loop is not running; restarting it")
            self.scheduler.start()
            return "the decoding loop was not running (restarted)"
        probe = RecordKey(self.fingerprint, "0" * 64)
        try:
            await asyncio.to_thread(self.store.contains, probe)
        except Exception as e:  # any failure to read means the worker cannot answer
            return f"the store does not answer: {e}"
        return None

    # ---- the index ----

    async def follow_index(self) -> Followed:
        """Apply the store's change feed since the index's position: records that other processes (other
        workers, ingest) stored are indexed, deleted ones removed. An index that fell behind a trimmed
        feed is rebuilt from the store (searches meanwhile use the old one)."""
        started = time.perf_counter()
        try:
            followed = await asyncio.to_thread(follow, self.index, self.store)
            kind = "follow"
        except FeedTrimmedError as e:
            logger.warning("rebuilding the index from the store: %s", e)
            self.index = await asyncio.to_thread(
                build_from_store, self.store, self.fingerprint, self.index.config
            )
            followed, kind = Followed(len(self.index), 0, 0), "rebuild"
        if kind == "rebuild":
            logger.info("rebuilt the index from the store: %d images", len(self.index))
        elif followed.added or followed.removed:
            logger.info("index followed the store: %d added, %d removed", followed.added, followed.removed)
        self._index_dirty |= kind == "rebuild" or bool(followed.added or followed.removed)
        if self.on_index_sync is not None:
            self.on_index_sync(kind, time.perf_counter() - started, followed)
        return followed

    async def save_index(self) -> None:
        if self._index_dirty:
            self._index_dirty = False
            await asyncio.to_thread(self.index.save, self.config.index_dir)

    async def _follow_loop(self) -> None:
        last_save = time.monotonic()
        while True:
            await asyncio.sleep(self.config.index_follow_s)
            try:
                await self.follow_index()
                if time.monotonic() - last_save >= self.config.index_save_s:
                    last_save = time.monotonic()
                    await self.save_index()
            except Exception:  # the next round retries; a store outage must not end the loop
                logger.exception("following the change feed failed")
