"""Continuous batching of Asks: one forward per decode step for every active request.

One thread owns the model. Each turn it admits waiting requests (their prompts are prefilled together
against their injected voco state and join the running batch), samples one token for every active row,
drops the rows that finished or were cancelled, and runs one forward for the rest. Requests never wait
for a whole batch to finish, and a cancelled or timed-out call stops costing compute at the next step.

Callers live on an asyncio loop: each `AskJob` carries an `emit` callback that the scheduler thread calls
with every `StepEvent` and finally with `None` (done) or an exception (the job failed).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from htcvlm.decode import DecodeBatch, GenerationOptions, RowState, StepEvent
from htcvlm.model import HTCVLM
from htcvlm.record import Record
from llm_worker.errors import DecodeQueueFullError, DecoderUnavailableError

logger = logging.getLogger(__name__)

Emit = Callable[[StepEvent | BaseException | None], None]


@dataclass(eq=False)
class AskJob:
    record: Record
    prompt: list[int]
    options: GenerationOptions
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0  # when its prefill ran

    def cancel(self) -> None:
        self.cancelled.set()


class DecodeScheduler:
    """Owns the model's decoding thread. Nothing raised while serving a row ends the loop: a failing row
    fails its own caller (INTERNAL), a failing prefill its own jobs, a failing step the rows in it, and
    the loop goes on with the next turn. `alive` says whether the loop runs (the worker's health)."""

    def __init__(self, model: HTCVLM, max_batch: int = 32, max_pending: int = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self._pending: queue.Queue[AskJob] = queue.Queue(maxsize=max_pending)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._batch: DecodeBatch | None = None
        self._logits = torch.empty(0)  # (B, vocab): the next-token logits of the running rows
        self._jobs: list[AskJob] = []
        self._rows: list[RowState] = []
        self.steps = 0  # forwards run, prefills excluded (for tests and metrics)
        self.max_rows_seen = 0  # the largest batch one forward has carried
        self.active = 0  # rows being decoded now

    def start(self) -> None:
        """Start the decoding thread, or a fresh one if the last one died (its rows were failed)."""
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: AskJob) -> None:
        """Queue a job; raises DecodeQueueFullError when `max_pending` jobs already wait."""
        try:
            self._pending.put_nowait(job)
        except queue.Full:
            raise DecodeQueueFullError(
                f"{self._pending.maxsize} questions are already waiting for a decode slot; retry with backoff"
            ) from None

    @property
    def pending(self) -> int:
        return self._pending.qsize()

    def _take(self, room: int, block: bool) -> list[AskJob]:
        jobs: list[AskJob] = []
        while len(jobs) < room:
            try:
                job = self._pending.get(block=block and not jobs, timeout=0.1)
            except queue.Empty:
                break
            if job.cancelled.is_set():
                _end([job], None)
                continue
            jobs.append(job)
        return jobs

    def _admit(self, jobs: Sequence[AskJob]) -> None:
        """Prefill new jobs together and join them to the running rows; a failure fails those jobs only."""
        try:
            rows = [RowState(j.options, len(j.prompt), self.model.device) for j in jobs]
            joined = DecodeBatch(self.model, [j.record for j in jobs], [j.prompt for j in jobs])
            logits = joined.last_logits()
            if self._batch is not None:
                logits = torch.cat([self._logits, logits])
                self._batch.extend(joined)
        except Exception as exc:  # reported to these callers; the running rows go on
            logger.exception("prefill of %d questions failed", len(jobs))
            _end(jobs, exc)
            return
        now = time.perf_counter()
        for job in jobs:
            job.started_at = now
        self._batch = self._batch if self._batch is not None else joined
        self._logits = logits
        self._jobs += jobs
        self._rows += rows

    def _advance(self) -> list[int]:
        """Sample every running row's next token and emit it; returns the tokens of the rows that go on
        (leaving rows are dropped from the batch)."""
        tokenizer = self.model.tokenizer
        keep, tokens = [], []
        for i, (job, state) in enumerate(zip(self._jobs, self._rows, strict=True)):
            if job.cancelled.is_set():
                _end([job], None)
                continue
            try:
                event = state.advance(i, self._logits[i], tokenizer)
                job.emit(event)
            except Exception as exc:  # this row's failure is its caller's alone
                logger.exception("decoding one row failed")
                _end([job], exc)
                continue
            if event.finished:
                _end([job], None)
            else:
                keep.append(i)
                tokens.append(event.token_id)
        if len(keep) < len(self._jobs):
            self._jobs = [self._jobs[i] for i in keep]
            self._rows = [self._rows[i] for i in keep]
            if not keep:
                self._batch = None
            elif self._batch is not None:
                self._batch.select(keep)
        return tokens

    def _turn(self) -> None:
        """One turn: admit waiting jobs, emit one token per row, run one forward for the rows that go on."""
        new = self._take(self.max_batch - len(self._jobs), block=not self._jobs)
        if new:
            self._admit(new)
        self.active = len(self._jobs)
        if self._batch is None:
            return
        tokens = self._advance()
        self.active = len(self._jobs)
        if self._batch is None:
            return
        self.max_rows_seen = max(self.max_rows_seen, len(self._jobs))
        self._logits = self._batch.step(torch.tensor(tokens, device=self.model.device))
        self.steps += 1

    def _drop_all(self, error: BaseException | None) -> None:
        _end(self._jobs, error)
        self._batch, self._jobs, self._rows = None, [], []
        self.active = 0

    @torch.inference_mode()
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._turn()
                except Exception as exc:  # fail the rows in flight, keep the loop alive
                    logger.exception("decode step failed for %d rows", len(self._jobs))
                    self._drop_all(exc)
        finally:  # stopping (or dying): nobody may wait for tokens that will never come
            stopped = DecoderUnavailableError("the decoder stopped (the worker is shutting down); retry")
            self._drop_all(stopped)
            while self._stop.is_set():  # queued jobs stay queued for a restarted loop, unless stopping
                try:
                    _end([self._pending.get_nowait()], stopped)
                except queue.Empty:
                    break


def _end(jobs: Sequence[AskJob], error: BaseException | None) -> None:
    """End each job's stream: `None` when it finished or was cancelled, else the error. A callback that
    itself fails (its event loop closed) must not stop the others."""
    for job in jobs:
        try:
            job.emit(error)
        except Exception:
            logger.exception("could not deliver the end of a decode stream")
