"""Dynamic batching in front of the encoders, on the caller's asyncio loop.

    batcher = DynamicBatcher(run_batch, max_batch=16, max_wait_ms=5.0, max_queue=1024, max_inflight=2)
    outcome = await batcher.submit(image_bytes, source_uri)

Contract:
- A batch closes when it holds `max_batch` images or its oldest image has waited `max_wait_ms`; it is then
  handed to `run_batch(images, uris)`, which returns one `EncodeOutcome` per image, in order. Up to
  `max_inflight` batches run at once (one per encoder actor keeps every actor busy); while all slots are
  taken, images keep queueing and leave in full batches.
- Concurrent requests for the same image (same SHA-256) share one future, hence one computation, whether
  the first request is still queued or already running.
- `submit` raises `QueueFullError` when `max_queue` distinct images are already pending (queued or
  running): the caller backs off instead of piling up memory.
- A `run_batch` that raises fails exactly the waiters of that batch, with that exception; the batcher goes
  on with the next batch.
- A cancelled caller does not cancel the shared work (others may wait on it).
- `close()` stops batching: running batches are cancelled, and every waiter still pending fails with
  `EncoderUnavailableError`; `submit` after `close()` raises it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from encoder_service.encoder import EncodeOutcome
from encoder_service.errors import EncoderUnavailableError, QueueFullError

logger = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[bytes], Sequence[str]], Awaitable[list[EncodeOutcome]]]

# Hashing more than this on the loop (≈ 1 ms per MB) would stall other requests: do it in a thread.
_HASH_INLINE_BYTES = 1 << 20


def _consume(future: asyncio.Future[EncodeOutcome]) -> None:
    """Mark a shared future's exception as seen: its waiters may all have gone (cancelled callers)."""
    if not future.cancelled():
        future.exception()


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        max_inflight: int = 1,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_inflight < 1 or max_wait_ms < 0:
            raise ValueError(
                f"need max_batch, max_queue, max_inflight >= 1 and max_wait_ms >= 0, got {max_batch}, "
                f"{max_queue}, {max_inflight}, {max_wait_ms}"
            )
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self.max_inflight = max_inflight
        # image id -> (bytes, uri, loop time queued); dicts keep arrival order, so the oldest is first
        self._waiting: dict[str, tuple[bytes, str, float]] = {}
        self._futures: dict[str, asyncio.Future[EncodeOutcome]] = {}  # queued or running, by image id
        self._slots: asyncio.Semaphore | None = None  # made on the loop that runs the batcher
        self._arrived: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self.batch_sizes: list[int] = []  # what run_batch was given, in order: for tests and metrics

    @property
    def pending(self) -> int:
        """Distinct images queued or running."""
        return len(self._futures)

    async def submit(self, image: bytes, source_uri: str = "") -> EncodeOutcome:
        """The outcome for `image`, computed in a batch (shared with identical concurrent requests)."""
        if self._closed:
            raise EncoderUnavailableError("the encoder pool is closed")
        if len(image) > _HASH_INLINE_BYTES:
            image_id = await asyncio.to_thread(lambda: hashlib.sha256(image).hexdigest())
        else:
            image_id = hashlib.sha256(image).hexdigest()
        future = self._futures.get(image_id)
        if future is None:
            if len(self._futures) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._futures)} images are already waiting for an encoder (max_queue="
                    f"{self.max_queue}); retry with backoff"
                )
            loop = asyncio.get_running_loop()
            self._start(loop)
            future = loop.create_future()
            future.add_done_callback(_consume)
            self._futures[image_id] = future
            self._waiting[image_id] = (image, source_uri, loop.time())
            assert self._arrived is not None
            self._arrived.set()
        return await asyncio.shield(future)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop_task is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._run())
            self._loop_task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The batching loop only ends by `close()`; if a bug ends it, fail the waiters, don't hang them."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("the encoder batching loop died: %r", task.exception())
        self._loop_task = None  # the next submit starts a fresh loop
        for image_id in list(self._waiting):
            future = self._futures.pop(image_id)
            if not future.done():
                future.set_exception(EncoderUnavailableError(f"the batcher failed: {task.exception()!r}"))
        self._waiting.clear()

    async def _run(self) -> None:
        assert self._slots is not None and self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            oldest = next(iter(self._waiting.values()))[2]
            remaining = oldest + self.max_wait_s - loop.time()
            if len(self._waiting) < self.max_batch and remaining > 0:
                self._arrived.clear()
                try:  # wake on the next arrival (the batch may now be full) or at the deadline
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            await self._slots.acquire()
            batch = {i: self._waiting[i][:2] for i in list(self._waiting)[: self.max_batch]}
            for image_id in batch:
                del self._waiting[image_id]
            task = loop.create_task(self._dispatch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, batch: dict[str, tuple[bytes, str]]) -> None:
        assert self._slots is not None
        ids = list(batch)
        self.batch_sizes.append(len(ids))
        results: list[EncodeOutcome] | None = None
        error: BaseException | None = None
        try:
            results = list(await self.run_batch([batch[i][0] for i in ids], [batch[i][1] for i in ids]))
            if len(results) != len(ids):
                raise RuntimeError(f"run_batch returned {len(results)} outcomes for {len(ids)} images")
        except asyncio.CancelledError:
            error = EncoderUnavailableError("the encoder pool closed while the batch ran")
            raise
        except Exception as exc:  # handed to exactly this batch's waiters
            logger.warning("encoder batch of %d images failed: %s", len(ids), exc)
            error = exc
        finally:
            self._slots.release()
            for n, image_id in enumerate(ids):
                future = self._futures.pop(image_id, None)
                if future is None or future.done():
                    continue
                if error is not None or results is None:
                    future.set_exception(error or EncoderUnavailableError("the batch was abandoned"))
                else:
                    future.set_result(results[n])

    async def close(self) -> None:
        """Stop batching; every request still pending fails with `EncoderUnavailableError`."""
        self._closed = True
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(EncoderUnavailableError("the encoder pool closed before the image ran"))
        self._futures.clear()
        self._waiting.clear()
