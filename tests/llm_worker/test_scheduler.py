"""The continuous-batching scheduler: same answers as decode(), one forward for many rows, cancellation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from htcvlm.decode import GenerationOptions, decode, encode_questions
from htcvlm.tokenizer import train_tokenizer
from llm_worker.errors import DecodeQueueFullError
from llm_worker.scheduler import AskJob, DecodeScheduler
from tests.htcvlm.helpers import QUESTIONS, make_model, png_bytes


@pytest.fixture(scope="module")
def model():
    tokenizer = train_tokenizer([q.lower() for q in QUESTIONS] * 4, vocab_size=300)
    m = make_model(tokenizer, seed=5)
    with torch.no_grad():
        m.llm.lm_head.weight[tokenizer.eos_token_id] = 0.0  # no early EOS: every row runs its full length
    m.invalidate_fingerprint()
    return m


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
    return AskJob(record, prompt, options, collector), collector


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
        deadline = time.monotonic() + 10
        while len(long_c.tokens) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
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
