"""Corpus ingestion on Ray Data: files -> bytes -> an actor pool of encoders -> the store and the index.

    onetoken ingest ~/photos 'shots/*.jpg' paths.txt

Resumable by construction: an image already in the store costs no model work (the encoder reads its
latent back), so a rerun after a crash only encodes what is missing. A file that cannot be read or is
not an image goes into the report with its reason and never stops the run.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache.errors import IndexCorruptError, IndexStaleError
from cache.index import IndexConfig, LatentIndex
from cache.store import open_store
from cache.sync import load_or_rebuild
from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.pool import actor_resources, init_ray
from htcvlm.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class IngestSummary:
    encoded: int
    cached: int
    failed: int
    seconds: float
    report_path: str | None

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


def read_files(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage: paths -> file bytes, or the reason a file could not be read."""
    data, errors = [], []
    for path in batch["path"]:
        try:
            with open(path, "rb") as f:
                data.append(f.read())
            errors.append("")
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
    index_dir: str | None = None,
    index_spec: str = "Flat",
    batch_size: int = 32,
    report_path: str | None = None,
    show_progress: bool = True,
) -> IngestSummary:
    """Encode every file named by `inputs` (see `expand_inputs`) into the store, and index the latents.

    Ray Data pipeline: paths -> `read_files` tasks -> `Encoder` actors (`config.num_actors` of them, one
    GPU each where the cluster has GPUs) in batches of `batch_size` -> rows streamed back to this process,
    counted under a progress bar. With `index_dir`, the encoded and cached latents go into the
    `LatentIndex` there (see `IndexSink`: a saved one is topped up, else one is built from the store).
    `report_path` gets one JSON line per failed file: path, image_id ("" if unread), status, reason.
    Failed files never stop the run; a store outage (StoreUnavailableError) or a cluster failure does.
    """
    import ray

    started = time.perf_counter()
    paths = expand_inputs(inputs)
    if not paths:
        logger.warning("nothing to ingest: %s names no file", list(inputs))
        return IngestSummary(0, 0, 0, time.perf_counter() - started, None)
    if config.ray_address is None and not Path(config.model_dir).is_dir():
        # a local cluster reads the model from this machine: say so now, not in an actor's stack trace
        raise CheckpointError(f"model directory {config.model_dir} does not exist; pass a checkpoint folder")
    init_ray(config.ray_address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images, not blocks
    context.print_on_execution_start = False
    results = (
        ray.data.from_items([{"path": p} for p in paths])
        .map_batches(read_files, batch_size=batch_size)
        .map_batches(
            Encoder,
            fn_constructor_args=(config,),
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=config.num_actors),
            **actor_resources(config),
        )
    )
    counts = {"encoded": 0, "cached": 0, "failed": 0}
    sink = IndexSink(config, index_dir, index_spec) if index_dir is not None else None
    report = open(report_path, "w") if report_path else None  # closed in finally
    bar = tqdm(total=len(paths), unit="img", desc="ingest", disable=not show_progress)
    try:
        for batch in results.iter_batches(batch_size=batch_size, batch_format="numpy"):
            statuses = [str(s) for s in batch["status"]]
            for n, status in enumerate(statuses):
                counts[status] += 1
                if status == "failed" and report is not None:
                    row = {"path": str(batch["path"][n]), "image_id": str(batch["image_id"][n])}
                    row |= {"status": status, "reason": str(batch["reason"][n])}
                    report.write(json.dumps(row) + "\n")
            good = [n for n, status in enumerate(statuses) if status != "failed"]
            if sink is not None and good:
                sink.add(
                    str(batch["fingerprint"][0]),
                    [str(batch["image_id"][n]) for n in good],
                    batch["latent"][good],
                )
            bar.update(len(statuses))
            bar.set_postfix(encoded=counts["encoded"], cached=counts["cached"], failed=counts["failed"])
    finally:
        bar.close()
        if report is not None:
            report.close()
    if sink is not None:
        sink.finish()
    summary = IngestSummary(**counts, seconds=time.perf_counter() - started, report_path=report_path)
    logger.info("ingest done: %s", summary)
    return summary


class IndexSink:
    """Adds ingested latents to the index in `index_dir` as they stream in, in bounded memory.

    A saved index of this model and spec is loaded and topped up batch by batch (resumed runs add the
    cached images too, so records a crashed run stored are indexed now). With no usable saved index
    (missing, corrupt, another model or spec), nothing is held: `finish()` builds the index from the
    store, which by then holds every ingested record, trained on a sample where the spec needs it.
    """

    def __init__(self, config: EncoderConfig, index_dir: str, spec: str) -> None:
        self.config, self.index_dir, self.spec = config, index_dir, spec
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
            self.index.save(self.index_dir)
            return
        with open_store(self.config.store_url, key_prefix=self.config.key_prefix) as store:
            load_or_rebuild(self.index_dir, store, self.fingerprint, IndexConfig(self.dim, self.spec))
