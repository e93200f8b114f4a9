"""DynamicBatcher on a real event loop with an injected `run_batch` that records what it was given."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from encoder_service.batcher import DynamicBatcher
from encoder_service.encoder import EncodeOutcome
from encoder_service.errors import EncoderUnavailableError, QueueFullError
from htcvlm.record import image_id_of

pytestmark = pytest.mark.anyio  # async tests run on asyncio (anyio's pytest plugin; see conftest)


class FakeEncoder:
    """Stands in for the model: one latent per image, `gate` holds batches until a test opens it."""

    def __init__(self, poison: bytes = b"") -> None:
        self.batches: list[list[bytes]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.poison = poison

    async def run_batch(self, images: Sequence[bytes], uris: Sequence[str]) -> list[EncodeOutcome]:
        self.batches.append(list(images))
        await self.gate.wait()
        if self.poison in images:
            raise RuntimeError("encoder crashed on this batch")
        return [EncodeOutcome(image_id_of(b), "encoded", np.full(4, len(b), np.float32)) for b in images]


def image(n: int) -> bytes:
    return f"image-{n:03d}".encode()


async def poll_until(condition, timeout_s: float = 5.0) -> None:
    """Yield to the loop until `condition()` holds: ordering by state, never by sleeping a guess."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


async def test_concurrent_requests_share_batches_of_at_most_max_batch() -> None:
    fake = FakeEncoder()
    fake.gate.clear()  # the first batch blocks, so the rest queue up behind it
    batcher = DynamicBatcher(fake.run_batch, max_batch=4, max_wait_ms=20, max_inflight=1)
    waiters = [asyncio.create_task(batcher.submit(image(n), f"uri-{n}")) for n in range(10)]
    await poll_until(lambda: fake.batches)
    fake.gate.set()
    outcomes = await asyncio.gather(*waiters)
    assert [o.image_id for o in outcomes] == [image_id_of(image(n)) for n in range(10)]
    assert batcher.batch_sizes == [len(b) for b in fake.batches]
    # all ten arrive before the first batch closes; the rest wait for the one in-flight slot
    assert batcher.batch_sizes == [4, 4, 2]
    assert sorted(b for batch in fake.batches for b in batch) == [image(n) for n in range(10)]
    assert batcher.pending == 0
    await batcher.close()


async def test_a_lone_request_leaves_after_max_wait() -> None:
    fake = FakeEncoder()
    batcher = DynamicBatcher(fake.run_batch, max_batch=8, max_wait_ms=5)
    outcome = await asyncio.wait_for(batcher.submit(image(1)), 5)
    assert outcome.status == "encoded" and batcher.batch_sizes == [1]
    await batcher.close()


async def test_identical_concurrent_requests_share_one_computation() -> None:
    fake = FakeEncoder()
    fake.gate.clear()
    batcher = DynamicBatcher(fake.run_batch, max_batch=8, max_wait_ms=5)
    early = [asyncio.create_task(batcher.submit(image(7))) for _ in range(5)]
    await poll_until(lambda: fake.batches)
    late = asyncio.create_task(batcher.submit(image(7)))  # arrives while the computation runs
    # a small image is hashed inline, so one turn of the loop runs `late` up to its wait on the future
    await asyncio.sleep(0)
    assert not late.done() and batcher.pending == 1
    fake.gate.set()
    outcomes = await asyncio.gather(*early, late)
    assert fake.batches == [[image(7)]]
    assert all(o is outcomes[0] for o in outcomes)
    await batcher.close()


async def test_queue_full_past_max_queue_but_duplicates_still_join() -> None:
    fake = FakeEncoder()
    fake.gate.clear()
    batcher = DynamicBatcher(fake.run_batch, max_batch=2, max_wait_ms=1, max_queue=3)
    waiters = [asyncio.create_task(batcher.submit(image(n))) for n in range(3)]
    await poll_until(lambda: batcher.pending == 3)
    with pytest.raises(QueueFullError, match="max_queue=3"):
        await batcher.submit(image(99))
    duplicate = asyncio.create_task(batcher.submit(image(2)))  # shares a pending future: no new slot
    fake.gate.set()
    await asyncio.gather(*waiters, duplicate)
    assert (await batcher.submit(image(99))).status == "encoded"  # room again once drained
    await batcher.close()


async def test_a_failed_batch_fails_exactly_its_waiters() -> None:
    poison = image(666)
    fake = FakeEncoder(poison=poison)
    fake.gate.clear()
    batcher = DynamicBatcher(fake.run_batch, max_batch=2, max_wait_ms=1, max_inflight=1)
    ok_first = [asyncio.create_task(batcher.submit(image(n))) for n in (1, 2)]
    await poll_until(lambda: len(fake.batches) == 1)  # [1, 2] is running; the next two wait for the slot
    doomed = [asyncio.create_task(batcher.submit(b)) for b in (poison, image(3))]
    await poll_until(lambda: batcher.pending == 4)  # queued before the last two arrive
    ok_last = [asyncio.create_task(batcher.submit(image(n))) for n in (4, 5)]
    fake.gate.set()
    results = await asyncio.gather(*ok_first, *doomed, *ok_last, return_exceptions=True)
    assert fake.batches == [[image(1), image(2)], [poison, image(3)], [image(4), image(5)]]
    assert [type(r).__name__ for r in results] == [
        "EncodeOutcome", "EncodeOutcome", "RuntimeError", "RuntimeError", "EncodeOutcome", "EncodeOutcome"
    ]  # fmt: skip
    assert (await batcher.submit(image(3))).status == "encoded"  # a retry of a failed image runs again
    await batcher.close()


async def test_a_cancelled_caller_does_not_cancel_the_shared_work() -> None:
    fake = FakeEncoder()
    fake.gate.clear()
    batcher = DynamicBatcher(fake.run_batch, max_batch=4, max_wait_ms=1)
    impatient = asyncio.create_task(batcher.submit(image(1)))
    patient = asyncio.create_task(batcher.submit(image(1)))
    await poll_until(lambda: fake.batches)  # both joined the one computation, which now runs
    impatient.cancel()
    fake.gate.set()
    assert (await patient).status == "encoded"
    assert impatient.cancelled()
    await batcher.close()


async def test_close_fails_pending_requests_and_refuses_new_ones() -> None:
    fake = FakeEncoder()
    fake.gate.clear()
    batcher = DynamicBatcher(fake.run_batch, max_batch=1, max_wait_ms=1, max_inflight=1)
    waiters = [asyncio.create_task(batcher.submit(image(n))) for n in range(3)]  # 1 running, 2 queued
    await poll_until(lambda: len(fake.batches) == 1 and batcher.pending == 3)
    await batcher.close()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, EncoderUnavailableError) for r in results), results
    with pytest.raises(EncoderUnavailableError, match="closed"):
        await batcher.submit(image(9))


async def test_large_images_are_hashed_off_the_loop() -> None:
    fake = FakeEncoder()
    batcher = DynamicBatcher(fake.run_batch, max_batch=2, max_wait_ms=1)
    big = bytes(3 << 20)
    assert (await batcher.submit(big)).image_id == image_id_of(big)
    await batcher.close()
