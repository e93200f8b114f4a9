"""The dynamic batcher: batches fill up to max_batch, identical requests share one computation,
a full queue refuses, and a failing batch fails only its own waiters."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from encoder_service.batcher import DynamicBatcher
from encoder_service.encoder import EncodeOutcome
from encoder_service.errors import QueueFullError


class FakeEncoder:
    """Stands in for the model only: records what each batch held; images starting b'boom' fail it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[bytes]] = []
        self.delay = delay

    async def __call__(self, images, uris) -> list[EncodeOutcome]:
        self.batches.append(list(images))
        await asyncio.sleep(self.delay)
        if any(i.startswith(b"boom") for i in images):
            raise RuntimeError("encoder exploded")
        return [
            EncodeOutcome(hashlib.sha256(i).hexdigest(), "encoded", np.full(4, len(i), np.float32))
            for i in images
        ]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_up_to_max_batch():
    async def main():
        fake = FakeEncoder()
        batcher = DynamicBatcher(fake, max_batch=4, max_wait_ms=20)
        outcomes = await asyncio.gather(*(batcher.submit(bytes([i]) * 3) for i in range(10)))
        await batcher.close()
        return fake, batcher, outcomes

    _, batcher, outcomes = run(main())
    assert batcher.batch_sizes == [4, 4, 2]
    assert [o.image_id for o in outcomes] == [hashlib.sha256(bytes([i]) * 3).hexdigest() for i in range(10)]


def test_identical_concurrent_requests_share_one_computation():
    async def main():
        fake = FakeEncoder(delay=0.05)
        batcher = DynamicBatcher(fake, max_batch=8, max_wait_ms=10)
        outcomes = await asyncio.gather(*(batcher.submit(b"same image") for _ in range(5)))
        await batcher.close()
        return fake, outcomes

    fake, outcomes = run(main())
    assert fake.batches == [[b"same image"]]
    assert len({o.image_id for o in outcomes}) == 1


def test_a_full_queue_refuses():
    async def main():
        fake = FakeEncoder(delay=0.2)
        batcher = DynamicBatcher(fake, max_batch=1, max_wait_ms=0, max_queue=2)
        first = asyncio.ensure_future(batcher.submit(b"a"))
        await asyncio.sleep(0.05)  # "a" is running; two more may wait
        waiting = [asyncio.ensure_future(batcher.submit(x)) for x in (b"b", b"c")]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="retry with backoff"):
            await batcher.submit(b"d")
        done = await asyncio.gather(first, *waiting)
        await batcher.close()
        return done

    assert len(run(main())) == 3


def test_a_failing_batch_fails_only_its_waiters():
    async def main():
        fake = FakeEncoder()
        batcher = DynamicBatcher(fake, max_batch=2, max_wait_ms=20)
        results = await asyncio.gather(
            batcher.submit(b"boom!"), batcher.submit(b"x"), batcher.submit(b"y"), return_exceptions=True
        )
        later = await batcher.submit(b"z")  # the batcher goes on
        await batcher.close()
        return results, later

    results, later = run(main())
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)
    assert isinstance(results[2], EncodeOutcome) and later.status == "encoded"
