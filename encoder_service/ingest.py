"""Corpus ingestion on Ray Data: files -> bytes -> an actor pool of encoders -> the store and the index.

    onetoken ingest ~/photos 'shots/*.jpg' paths.txt

Resumable by construction: an image already in the store costs no model work (the encoder reads its
latent back), so a rerun after a crash only encodes what is missing. A file that cannot be read or is
not an image goes into the report with its reason and never stops the run. A store outage does stop
it, raised as the project's own error (`StoreUnavailableError`), not as Ray's wrapper around it; so
does a crashed encoder actor (Ray's error). Either way, the same call resumes.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from cache.errors import CacheError, IndexCorruptError, IndexStaleError
from cache.factory import StoreConfig, open_store
from cache.index import IndexConfig, LatentIndex
from cache.sync import build_from_store, follow_or_rebuild
from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.errors import EncoderError
from encoder_service.pool import actor_count, actor_resources, init_ray
from htcvlm.errors import CheckpointError, HTCError

logger = logging.getLogger(__name__)


# Errors of this project that an encoder raises inside Ray; `ingest` hands them on as themselves.
OWN_ERRORS = (CacheError, EncoderError, HTCError)


@dataclass
class IngestSummary:
    encoded: int
    cached: int
    failed: int
    seconds: float
    report_path: str | None  # where this run's failures were written; None if none failed or no report
    run_id: str = ""

    @property
    def images_per_s(self) -> float:
        return (self.encoded + self.cached) / self.seconds if self.seconds > 0 else 0.0


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Absolute paths of every file named by `inputs`, sorted and deduplicated.

    Each input is a folder (walked recursively), a glob pattern (`**` allowed), a `.txt` file listing one
    path per line (blank lines and `#` comments skipped; relative paths are relative to the list's
    folder), or a file. Every file found is kept, image or not: the encoder judges, and the report says
    why one failed. A named path that does not exist is kept too, so the report lists it.
    """
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [str(p) for p in path.rglob("*") if not p.is_dir()]
        elif path.suffix == ".txt" and path.is_file():
            lines = (line.strip() for line in path.read_text().splitlines())
            found += [str(path.parent / line) for line in lines if line and not line.startswith("#")]
        elif any(c in item for c in "*?[") and not path.exists():
            found += [p for p in glob.glob(item, recursive=True) if not os.path.isdir(p)]
        else:
            found.append(item)
    return sorted({os.path.abspath(p) for p in found})


def new_run_id() -> str:
    """One ingest run's name in reports: its UTC start time and process id, e.g. 20261201T024612Z-7409."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


def default_report_path(folder: str | Path, run_id: str) -> str:
    """A report of its own for each run, so that no run overwrites an earlier one's list of failures."""
    return str(Path(folder) / f"ingest-{run_id}.jsonl")


def prepare_report(path: str) -> None:
    """Make the report's folder now: a bad path fails before Ray starts, not at the first failed file."""
    report = Path(path)
    if report.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the report must be a file, not a folder", path)
    report.parent.mkdir(parents=True, exist_ok=True)


class Report:
    """Failed files as JSON lines appended to `path`, each naming its run; the file is opened at the first."""

    def __init__(self, path: str | None, run_id: str) -> None:
        self.path, self.run_id = path, run_id
        self.file: TextIO | None = None

    def write(self, path: str, image_id: str, reason: str) -> None:
        if self.path is None:
            return
        if self.file is None:
            self.file = open(self.path, "a")  # appended: an earlier run's lines stay; closed in close()
        row = {"run": self.run_id, "path": path, "image_id": image_id, "status": "failed", "reason": reason}
        self.file.write(json.dumps(row) + "\n")

    @property
    def written(self) -> str | None:
        """The path, once this run has written to it."""
        return self.path if self.file is not None else None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def own_error(error: BaseException) -> Exception | None:
    """The project's error (`OWN_ERRORS`) that Ray wrapped into `error`, or None.

    A `RayTaskError` carries the remote exception as `.cause`, itself possibly a `RayTaskError` when the
    failure crossed more than one task.
    """
    import ray

    while isinstance(error, ray.exceptions.RayTaskError):
        error = error.cause
    return error if isinstance(error, OWN_ERRORS) else None


class _BelowError(logging.Filter):
    """Passes records under ERROR: Ray Data logs a failed execution before raising it, and the raised
    error is what the caller reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def configure_ray_data() -> None:
    """Set Ray Data up for a run whose progress and errors this process reports itself.

    - Its progress bars are off (ours counts images, not blocks), and so is the warning it logs about
      that on its progress logger.
    - Its console handler, which it installs at INFO whatever this process's level (a line per
      execution), follows the root logger's level instead, and leaves errors to the caller (ERROR
      lines only at DEBUG). Its log file in the Ray session (logs/ray-data/) still gets everything.
    - An exception of the encoder stage reaches us as itself inside Ray's `RayTaskError`, not as a
      `UserCodeException` whose pickled form has lost the original error.
    """
    import ray.data  # configures its loggers on import: before they are changed here

    level = logging.getLogger().getEffectiveLevel()
    logging.getLogger("ray.data._internal.progress").setLevel(max(level, logging.ERROR))
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":
            handler.setLevel(level)
            if level > logging.DEBUG and not any(isinstance(f, _BelowError) for f in handler.filters):
                handler.addFilter(_BelowError())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.raise_original_map_exception = True


def read_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage: paths -> file bytes, or the reason a file could not be read or is empty."""
    data, errors = [], []
    for path in batch["path"]:
        try:
            with open(path, "rb") as f:
                data.append(f.read())
            errors.append("" if data[-1] else "empty file (0 bytes)")
        except OSError as e:
            data.append(b"")
            errors.append(f"unreadable: {e.strerror or e}")
    return {
        "path": batch["path"],
        "data": np.array(data, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def ingest(
    inputs: Sequence[str],
    config: EncoderConfig,
    store: StoreConfig,
    index_dir: str | None = None,
    index_spec: str = "Flat",
    batch_size: int = 32,
    report_path: str | None = None,
    show_progress: bool = True,
    run_id: str | None = None,
) -> IngestSummary:
    """Encode every file named by `inputs` (see `expand_inputs`) into `store`, and index the latents.

    Ray Data pipeline: paths -> `read_files` tasks -> `Encoder` actors (`actor_count(config)` of them, one
    GPU each where the cluster has GPUs) in batches of `batch_size` -> rows streamed back to this process,
    counted under a progress bar. With `index_dir`, the encoded and cached latents go into the
    `LatentIndex` there (see `IndexSink`: a saved one is topped up, else one is built from the store).
    `report_path` gets one JSON line per failed file, appended (its folder is made first): run (`run_id`,
    default `new_run_id()`), path, image_id ("" if unread), status, reason.
    Failed files never stop the run. A store outage or an encoder's own error stops it and is raised as
    itself (`StoreUnavailableError`, ...; Ray's wrapper is its `__cause__`); a dead actor or cluster
    stops it with Ray's error. Rerunning the same call resumes: stored images cost no model work.
    """
    import ray

    started = time.perf_counter()
    run_id = run_id or new_run_id()
    paths = expand_inputs(inputs)
    if not paths:
        logger.warning("nothing to ingest: %s names no file", list(inputs))
        return IngestSummary(0, 0, 0, time.perf_counter() - started, None, run_id)
    if report_path is not None:
        prepare_report(report_path)
    if config.ray_address is None and not Path(config.model_dir).is_dir():
        # a local cluster reads the model from this machine: say so now, not in an actor's stack trace
        raise CheckpointError(f"model directory {config.model_dir} does not exist; pass a checkpoint folder")
    init_ray(config.ray_address)
    configure_ray_data()
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote options but has no named parameter for max_restarts yet
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        results = (
            ray.data.from_items([{"path": p} for p in paths])
            .map_batches(read_files, batch_size=batch_size)
            .map_batches(
                Encoder,
                fn_constructor_args=(config, store),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=actor_count(config)),
                # Not Ray Data's default of restarting actors forever: its actors' constructor arguments
                # live in the object store, so Ray warns on every run that a restart may fail
                # (ray-project/ray#53727). A crashed encoder stops the run instead; rerunning resumes it.
                max_restarts=0,
                **actor_resources(config),
            )
        )
    counts = {"encoded": 0, "cached": 0, "failed": 0}
    sink = IndexSink(store, index_dir, index_spec) if index_dir is not None else None
    report = Report(report_path, run_id)
    bar = tqdm(total=len(paths), unit="img", desc="ingest", disable=not show_progress)
    try:
        for batch in results.iter_batches(batch_size=batch_size, batch_format="numpy"):
            statuses = [str(s) for s in batch["status"]]
            for n, status in enumerate(statuses):
                counts[status] += 1
                if status == "failed":
                    report.write(str(batch["path"][n]), str(batch["image_id"][n]), str(batch["reason"][n]))
            good = [n for n, status in enumerate(statuses) if status != "failed"]
            if sink is not None and good:
                sink.add(
                    str(batch["fingerprint"][0]),
                    [str(batch["image_id"][n]) for n in good],
                    batch["latent"][good],
                )
            bar.update(len(statuses))
            bar.set_postfix(encoded=counts["encoded"], cached=counts["cached"], failed=counts["failed"])
    except ray.exceptions.RayTaskError as e:
        cause = own_error(e)
        if cause is None:
            raise
        raise cause from e
    finally:
        bar.close()
        report.close()
    if sink is not None:
        sink.finish()
    seconds = time.perf_counter() - started
    summary = IngestSummary(**counts, seconds=seconds, report_path=report.written, run_id=run_id)
    logger.info("ingest done: %s", summary)
    return summary


class IndexSink:
    """Adds ingested latents to the index in `index_dir` as they stream in, in bounded memory.

    A saved index of this model and spec is loaded and topped up batch by batch (resumed runs add the
    cached images too, so records a crashed run stored are indexed now). With no usable saved index
    (missing, corrupt, another model or spec), nothing is held: `finish()` builds the index from the
    store, which by then holds every ingested record, trained on a sample where the spec needs it.
    """

    def __init__(self, store: StoreConfig, index_dir: str, spec: str) -> None:
        self.store, self.index_dir, self.spec = store, index_dir, spec
        self.index: LatentIndex | None = None
        self.fingerprint = ""
        self.dim = 0

    def add(self, fingerprint: str, image_ids: list[str], latents: np.ndarray) -> None:
        """`latents` (n, d) of `image_ids`, all encoded or cached by model `fingerprint`."""
        if not self.fingerprint:
            self.fingerprint, self.dim = fingerprint, latents.shape[1]
            try:
                index = LatentIndex.load(self.index_dir, fingerprint, IndexConfig(self.dim, self.spec))
                self.index = index if index.is_trained else None
            except (IndexCorruptError, IndexStaleError) as e:
                logger.info(
                    "no usable saved index in %s (%s): it is built from the store at the end",
                    self.index_dir,
                    e,
                )
        if self.index is not None:
            self.index.add(image_ids, latents)

    def finish(self) -> None:
        """Save the topped-up index, or build one from the store (nothing ingested: nothing to do)."""
        if not self.fingerprint:
            return
        if self.index is not None:
            if self.index.feed is not None:
                # move its feed position past this run's writes (and apply other writers' changes), so
                # the worker that loads it next reads only what came after
                with open_store(self.store) as store:
                    self.index, _ = follow_or_rebuild(self.index, store)
            self.index.save(self.index_dir)
            return
        # add() found no usable saved index: build one (an INFO line), not load_or_rebuild's warning
        # meant for a server finding its index gone
        with open_store(self.store) as store:
            index = build_from_store(store, self.fingerprint, IndexConfig(self.dim, self.spec))
        index.save(self.index_dir)
