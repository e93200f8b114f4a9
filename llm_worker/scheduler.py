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

from htcvlm.decode import RunningBatch
from htcvlm.generation import GenerationOptions, StepEvent
from htcvlm.model import HTCVLM
from htcvlm.record import Record
from llm_worker.errors import DecodeQueueFullError, DecoderUnavailableError

logger = logging.getLogger(__name__)

Emit = Callable[[StepEvent | BaseException | None], None]


@dataclass(eq=False)
class AskJob:
    records: Sequence[Record]  # the images the question is about, in context order (usually one)
    prompt: list[int]
    options: GenerationOptions
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0  # when its prefill ran

    def cancel(self) -> None:
        self.cancelled.set()


class DecodeScheduler:
    """Owns the model's decoding thread: a queue of Asks in front of one `RunningBatch`.

    Nothing raised while serving a row ends the loop: a failing row fails its own caller (INTERNAL), a
    failing prefill its own jobs, a failing step the rows in it, and the loop goes on with the next turn.
    `alive` says whether the loop runs (the worker's health)."""

    def __init__(self, model: HTCVLM, max_batch: int = 32, max_pending: int = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self._pending: queue.Queue[AskJob] = queue.Queue(maxsize=max_pending)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = RunningBatch(model)
        self._jobs: dict[int, AskJob] = {}  # by row id in the running batch
        self.steps = 0  # forwards run, prefills excluded (for tests and metrics)
        self.max_rows_seen = 0  # the largest batch one forward has carried
        self.active = 0  # rows being decoded now
        self.batches = 0  # turns that decoded: one token for every running row (metrics)
        self.rows_decoded = 0  # rows summed over those turns: rows_decoded / batches is the mean batch
        self.tokens_generated = 0  # tokens handed to callers, EOS excluded: their answers' lengths (metrics)

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

    def _admit(self, jobs: list[AskJob]) -> None:
        """Prefill new jobs together into the running batch; a failure fails those jobs only."""
        try:
            ids = self._running.admit(
                [j.records for j in jobs], [j.prompt for j in jobs], [j.options for j in jobs]
            )
        except Exception as exc:  # reported to these callers; the running rows go on
            logger.exception("prefill of %d questions failed", len(jobs))
            _end(jobs, exc)
            return
        now = time.perf_counter()
        for row_id, job in zip(ids, jobs, strict=True):
            job.started_at = now
            self._jobs[row_id] = job

    def _turn(self) -> None:
        """One turn: admit waiting jobs, drop cancelled ones, then one step for every running row."""
        new = self._take(self.max_batch - len(self._jobs), block=not self._jobs)
        if new:
            self._admit(new)
        cancelled = [row_id for row_id, job in self._jobs.items() if job.cancelled.is_set()]
        if cancelled:
            self._running.drop(cancelled)
            _end([self._jobs.pop(row_id) for row_id in cancelled], None)
        self.active = len(self._jobs)
        if not self._jobs:
            return
        self.max_rows_seen = max(self.max_rows_seen, len(self._jobs))
        self.batches += 1
        self.rows_decoded += len(self._jobs)
        events, failed = self._running.step()
        self.steps += len(self._running) > 0  # the step ran a forward for the rows that go on
        for event in events:
            job = self._jobs[event.row]
            try:
                job.emit(event)
            except Exception as exc:  # a caller that cannot take its tokens stops being decoded
                failed[event.row] = exc
                continue
            self.tokens_generated += event.finished != "eos"  # the EOS token is not part of the answer
            if event.finished:
                _end([self._jobs.pop(event.row)], None)
        for row_id, exc in failed.items():
            logger.error("decoding one row failed: %s", exc, exc_info=exc)
            self._running.drop([row_id])
            _end([self._jobs.pop(row_id)], exc)
        self.active = len(self._jobs)

    def _drop_all(self, error: BaseException | None) -> None:
        _end(list(self._jobs.values()), error)
        self._jobs.clear()
        self._running.clear()
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
