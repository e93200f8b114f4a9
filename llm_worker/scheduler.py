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
from llm_worker.errors import DecodeQueueFullError

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
    def __init__(self, model: HTCVLM, max_batch: int = 32, max_pending: int = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self._pending: queue.Queue[AskJob] = queue.Queue(maxsize=max_pending)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
        self.steps = 0  # forwards run, prefills excluded (for tests and metrics)
        self.max_rows_seen = 0  # the largest batch one forward has carried
        self.active = 0  # rows being decoded now

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

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
                job.emit(None)
                continue
            jobs.append(job)
        return jobs

    def _prefill(self, jobs: Sequence[AskJob]) -> tuple[DecodeBatch, torch.Tensor] | None:
        """Prefill new jobs together; a failure fails those jobs only, never the running ones."""
        try:
            batch = DecodeBatch(self.model, [j.record for j in jobs], [j.prompt for j in jobs])
        except Exception as exc:  # reported to these callers; the running rows go on
            logger.exception("prefill of %d questions failed", len(jobs))
            for job in jobs:
                job.emit(exc)
            return None
        now = time.perf_counter()
        for job in jobs:
            job.started_at = now
        return batch, batch.last_logits()

    @torch.inference_mode()
    def _run(self) -> None:
        batch: DecodeBatch | None = None
        logits = torch.empty(0)
        jobs: list[AskJob] = []
        rows: list[RowState] = []
        tokenizer = self.model.tokenizer
        while not self._stop.is_set():
            new = self._take(self.max_batch - len(jobs), block=not jobs)
            if new:
                joined = self._prefill(new)
                if joined is not None:
                    if batch is None:
                        batch, logits = joined
                    else:
                        batch.extend(joined[0])
                        logits = torch.cat([logits, joined[1]])
                    jobs += new
                    rows += [RowState(j.options, len(j.prompt), self.model.device) for j in new]
            self.active = len(jobs)
            if not jobs or batch is None:
                continue
            keep, tokens = [], []
            for i, (job, state) in enumerate(zip(jobs, rows, strict=True)):
                if job.cancelled.is_set():
                    job.emit(None)
                    continue
                event = state.advance(i, logits[i], tokenizer)
                job.emit(event)
                if event.finished:
                    job.emit(None)
                else:
                    keep.append(i)
                    tokens.append(event.token_id)
            if len(keep) < len(jobs):
                jobs, rows = [jobs[i] for i in keep], [rows[i] for i in keep]
                self.active = len(jobs)
                if not jobs:
                    batch = None
                    continue
                batch.select(keep)
            self.max_rows_seen = max(self.max_rows_seen, len(jobs))
            try:
                logits = batch.step(torch.tensor(tokens, device=self.model.device))
            except Exception as exc:  # fail this batch's callers, keep the loop alive
                logger.exception("decode step failed for %d rows", len(jobs))
                for job in jobs:
                    job.emit(exc)
                batch, jobs, rows = None, [], []
                self.active = 0
            self.steps += 1
        for job in jobs:
            job.emit(None)
