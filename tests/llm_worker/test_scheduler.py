"""The continuous-batching scheduler: same answers as decode(), one forward for many rows, cancellation."""

from __future__ import annotations

import threading

import pytest

from htcvlm.decode import decode, encode_questions
from htcvlm.generation import GenerationOptions, RowState
from llm_worker.errors import DecodeQueueFullError, DecoderUnavailableError
from llm_worker.scheduler import AskJob, DecodeScheduler
from tests.htcvlm.helpers import QUESTIONS, png_bytes
from tests.polling import poll_until


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


@pytest.fixture(scope="module")
def records(model):
    return model.compress([png_bytes(s) for s in range(6)])


class Collector:
    """What a job's emit callback received, and when it was done."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, item) -> None:
        if item is None:
            self.done.set()
        elif isinstance(item, BaseException):
            self.error = item
            self.done.set()
        else:
            self.tokens.append(item.token_id)


def job(model, record, question, max_new_tokens=8):
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    prompt = encode_questions(model, [question], max_new_tokens)[0]
    collector = Collector()
    return AskJob([record], prompt, options, collector), collector


def test_concurrent_asks_share_forwards_and_match_decode(model, records):
    questions = [QUESTIONS[i % 3] for i in range(6)]
    lengths = [8, 3, 12, 5, 8, 2]
    expected = [
        decode(model, [r], [q], GenerationOptions(max_new_tokens=n))[0].token_ids
        for r, q, n in zip(records, questions, lengths, strict=True)
    ]
    scheduler = DecodeScheduler(model, max_batch=4, max_pending=16)
    jobs = [job(model, r, q, n) for r, q, n in zip(records, questions, lengths, strict=True)]
    for j, _ in jobs:  # queued before the loop starts, so they are admitted together
        scheduler.submit(j)
    scheduler.start()
    try:
        for _, c in jobs:
            assert c.done.wait(30)
    finally:
        scheduler.stop()
    assert [c.tokens for _, c in jobs] == expected
    assert scheduler.max_rows_seen == 4  # rows shared forwards, never more than max_batch
    # 6 rows of 38 tokens in all, one at a time, would take 38 - 6 = 32 forwards after the prefills
    assert scheduler.steps < sum(lengths) - len(lengths)


def test_cancelled_ask_stops_generating(model, records):
    scheduler = DecodeScheduler(model, max_batch=4)
    scheduler.start()
    try:
        long_job, long_c = job(model, records[0], QUESTIONS[0], max_new_tokens=200)
        scheduler.submit(long_job)
        poll_until(lambda: len(long_c.tokens) >= 3)
        long_job.cancel()
        assert long_c.done.wait(10)
        assert 3 <= len(long_c.tokens) < 200
        # the scheduler keeps serving after a cancellation
        next_job, next_c = job(model, records[1], QUESTIONS[1], max_new_tokens=4)
        scheduler.submit(next_job)
        assert next_c.done.wait(10) and len(next_c.tokens) == 4
    finally:
        scheduler.stop()


def test_full_queue_is_refused(model, records):
    scheduler = DecodeScheduler(model, max_batch=1, max_pending=2)  # not started: nothing drains
    scheduler.submit(job(model, records[0], QUESTIONS[0])[0])
    scheduler.submit(job(model, records[1], QUESTIONS[0])[0])
    with pytest.raises(DecodeQueueFullError, match="retry with backoff"):
        scheduler.submit(job(model, records[2], QUESTIONS[0])[0])


def test_a_failing_prefill_fails_only_its_own_job(model, records):
    scheduler = DecodeScheduler(model, max_batch=4)
    scheduler.start()
    try:
        bad_job, bad_c = job(model, records[0], QUESTIONS[0])
        bad_job.prompt = [10**6]  # a token id past the vocabulary: the embedding lookup fails
        scheduler.submit(bad_job)
        assert bad_c.done.wait(10) and bad_c.error is not None
        good_job, good_c = job(model, records[1], QUESTIONS[1], max_new_tokens=3)
        scheduler.submit(good_job)
        assert good_c.done.wait(10) and good_c.error is None and len(good_c.tokens) == 3
    finally:
        scheduler.stop()


def test_a_row_that_fails_fails_alone_and_the_loop_goes_on(model, records, monkeypatch):
    """Any exception while serving one row fails that row's caller; the others and later jobs go on."""
    original = RowState.advance

    def advance(self, row, token, tokenizer):
        if self.options.max_new_tokens == 7 and self.generated == 2:  # the marked row, mid-answer
            raise RuntimeError("injected failure in one row's step")
        return original(self, row, token, tokenizer)

    monkeypatch.setattr(RowState, "advance", advance)
    scheduler = DecodeScheduler(model, max_batch=4)
    scheduler.start()
    try:
        bad_job, bad = job(model, records[0], QUESTIONS[0], max_new_tokens=7)
        good_job, good = job(model, records[1], QUESTIONS[1], max_new_tokens=12)
        scheduler.submit(good_job)
        scheduler.submit(bad_job)
        assert bad.done.wait(10) and isinstance(bad.error, RuntimeError) and len(bad.tokens) == 2
        assert good.done.wait(10) and good.error is None and len(good.tokens) == 12
        later_job, later = job(model, records[2], QUESTIONS[2], max_new_tokens=3)
        scheduler.submit(later_job)
        assert later.done.wait(10) and later.error is None and len(later.tokens) == 3
        assert scheduler.alive
    finally:
        scheduler.stop()


def test_a_failing_callback_does_not_stop_the_loop(model, records):
    scheduler = DecodeScheduler(model, max_batch=4)
    scheduler.start()
    try:
        broken, _ = job(model, records[0], QUESTIONS[0])

        def closed_loop(item):
            raise RuntimeError("Event loop is closed")

        broken.emit = closed_loop
        scheduler.submit(broken)
        good_job, good = job(model, records[1], QUESTIONS[1], max_new_tokens=3)
        scheduler.submit(good_job)
        assert good.done.wait(10) and good.error is None and len(good.tokens) == 3
        assert scheduler.alive
    finally:
        scheduler.stop()


def test_stopping_fails_running_and_waiting_jobs_instead_of_leaving_them_hanging(model, records):
    scheduler = DecodeScheduler(model, max_batch=1)
    running_job, running = job(model, records[0], QUESTIONS[0], max_new_tokens=200)
    waiting_job, waiting = job(model, records[1], QUESTIONS[1])
    scheduler.start()
    scheduler.submit(running_job)
    poll_until(lambda: scheduler.active == 1)
    scheduler.submit(waiting_job)  # max_batch=1: it waits in the queue
    scheduler.stop()
    assert not scheduler.alive
    for collector in (running, waiting):
        assert collector.done.wait(10) and isinstance(collector.error, DecoderUnavailableError)


def test_a_dead_loop_is_reported_and_can_be_started_again(model, records):
    scheduler = DecodeScheduler(model, max_batch=2)
    assert not scheduler.alive
    scheduler.start()
    assert scheduler.alive
    scheduler.stop()
    assert not scheduler.alive
    scheduler.start()  # a fresh thread
    try:
        again, collector = job(model, records[0], QUESTIONS[0], max_new_tokens=2)
        scheduler.submit(again)
        assert collector.done.wait(10) and collector.error is None and len(collector.tokens) == 2
    finally:
        scheduler.stop()
