"""Checkpoints: a folder of config.json + weights in safetensors + tokenizer files. Never a hub download.

    config.json          {"format": FORMAT, "htcvlm": {...}, "provenance": {...} (optional)}
    model.safetensors    or shards and model.safetensors.index.json (htcvlm/shards.py)
    tokenizer files      transformers' own
    fingerprint.json     the fingerprint, and the files it was computed from (see _write_stamp)

A model loads as it would at 7B: built on the meta device (no weight allocated or randomly initialised),
its tensors read straight onto the target device in the checkpoint's dtype and taken over with
`load_state_dict(assign=True)`, then the non-persistent buffers the state dict lacks computed there.

Components of a new model (a CLIP vision tower, a causal LM and its tokenizer) load from local Hugging
Face folders named in the config; an incomplete folder is a `CheckpointError` naming what is missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from htcvlm.config import HTCConfig
from htcvlm.errors import CheckpointError
from htcvlm.model import HTCVLM
from htcvlm.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_FILE,
    WEIGHTS_FILE,
    WeightFiles,
    find_weights,
    read_weights,
    tensor_headers,
    write_weights,
)

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FILE", "WEIGHTS_FILE", "load_pretrained", "save_pretrained"]

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Beside the weights: their fingerprint and the size, mtime and inode of every file it depends on (config,
# shards, index) when it was hashed, so a load of unchanged files skips hashing every weight (a minute at
# 7B), and any rewrite of any of them hashes again.
STAMP_FILE = "fingerprint.json"
FORMAT = "onetoken-htcvlm/1"
_STORED = "stored"  # the stamp's key for the weights as stored; a load cast to a dtype keys by that dtype
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def save_pretrained(
    model: HTCVLM,
    path: str | Path,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """Write `model` into the folder `path`: one model.safetensors while the weights fit in
    `max_shard_size` bytes (an int, or "5GB", "500MB"), else shards and an index. `provenance` says
    where parts came from (e.g. {"llm": "lmsys/vicuna-7b-v1.5", "P_d": "untrained"}); `info` shows it."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # Local component paths are only for building a new model; the checkpoint holds every weight itself.
    config = model.config.to_dict()
    config["vision"]["path"] = config["llm"]["path"] = None
    meta: dict[str, Any] = {"format": FORMAT, "htcvlm": config}
    if provenance is not None:
        meta["provenance"] = _check_provenance(dict(provenance), "provenance")
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    fingerprint = model.fingerprint()  # hashed once here (or known already): loads then trust the stamp
    files = write_weights(
        folder, model.state_dict(), {"format": FORMAT, "fingerprint": fingerprint}, max_shard_size
    )
    _write_stamp(folder, _stat(folder, [CONFIG_FILE, *files]), {_STORED: fingerprint})
    model.tokenizer.save_pretrained(str(folder))
    return folder


def _check_provenance(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CheckpointError(f"{where} must map part names to strings, got {value!r}")
    return value


# ---- the fingerprint stamp ----


def _stat(folder: Path, files: list[str]) -> dict[str, dict[str, int]]:
    stats = {}
    for name in files:
        stat = (folder / name).stat()
        stats[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    return stats


def _write_stamp(folder: Path, files: dict[str, dict[str, int]], fingerprints: dict[str, str]) -> None:
    """Record that the files, as they were (`files`: size, mtime, inode each), give `fingerprints` (by how
    they were loaded): the next load trusts it without hashing every weight. Fingerprints of the same
    files loaded another way are kept. Best effort: a read-only folder just hashes again."""
    old = _read_stamp(folder)
    if old is not None and old["files"] == files:
        fingerprints = {**old["fingerprints"], **fingerprints}
    try:
        (folder / STAMP_FILE).write_text(json.dumps({"fingerprints": fingerprints, "files": files}) + "\n")
    except OSError as e:
        logger.info("cannot write %s (%s): the next load hashes the weights again", folder / STAMP_FILE, e)


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or not isinstance(stamp.get("fingerprints"), dict):
        return None  # absent, or an older stamp's format: hash once and stamp again
    return stamp


def _stamped_fingerprint(folder: Path, files: dict[str, dict[str, int]], key: str) -> str | None:
    """The stamp's fingerprint for loads of kind `key` if every file is unchanged since it was hashed."""
    stamp = _read_stamp(folder)
    if stamp is None or stamp.get("files") != files:
        return None
    fingerprint = stamp["fingerprints"].get(key)
    return fingerprint if isinstance(fingerprint, str) else None


# ---- loading ----


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    folder = Path(path)
    if not (folder / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{folder} is missing {TOKENIZER_FILE}")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def from_components(config: HTCConfig) -> HTCVLM:
    """A new model whose vision tower and LLM (with its tokenizer) load from the local folders in `config`;
    the projectors, MGVQ and voco embeddings start fresh for training."""
    if config.llm.path is None:
        raise CheckpointError("from_components needs config.llm.path: the LLM's folder holds the tokenizer")
    return HTCVLM(config, load_tokenizer(config.llm.path))


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device with its index; "auto" is the current GPU where this process sees one (a Ray actor
    with num_gpus=1 sees only its own), else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or None: the checkpoint's), got {dtype!r}")
    return _DTYPES[dtype]


def _open_folder(path: str | Path) -> tuple[Path, dict[str, Any], WeightFiles]:
    """The folder, its config.json and its weight files, every required file checked to exist."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model directory {folder} does not exist")
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"model directory {folder} is missing {name}")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        format_ = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a OneToken checkpoint (format {format_!r})")
    if "provenance" in meta:
        _check_provenance(meta["provenance"], f"{folder / CONFIG_FILE}: provenance")
    return folder, meta, find_weights(folder)


def _build_on_meta(folder: Path, meta: dict[str, Any]) -> HTCVLM:
    """The model with every weight on the meta device: nothing allocated, nothing initialised."""
    config = HTCConfig.from_dict(meta["htcvlm"])
    tokenizer = load_tokenizer(folder)
    with torch.device("meta"):
        return HTCVLM(config, tokenizer)


def load_pretrained(
    path: str | Path, device: str | torch.device = "cpu", *, dtype: str | torch.dtype | None = None
) -> HTCVLM:
    """Load a OneToken checkpoint onto `device` ("auto": the current GPU where this process sees one,
    else cpu), in `dtype` ("bf16", "fp16", "fp32" or a torch dtype; None: as stored, tensor by tensor).

    The model is built on the meta device and takes over the tensors read from the files, so the weights
    exist once, on `device`, in `dtype`: no fp32 copy, no random init, no host copy of a GPU model."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    folder, meta, weights = _open_folder(path)
    # stat before reading: a file rewritten while it is read is hashed again at the next load
    files = _stat(folder, [CONFIG_FILE, *weights.files])
    model = _build_on_meta(folder, meta)
    state, converted = read_weights(weights, device, dtype)
    where = folder / (INDEX_FILE if weights.index else WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {where} do not fit its config: {exc}") from exc
    model.materialize_buffers(device)
    model.eval()
    key = str(dtype).removeprefix("torch.") if converted else _STORED
    if (known := _stamped_fingerprint(folder, files, key)) is not None:
        model.remember_fingerprint(known)
        return model
    fingerprint = model.fingerprint()  # hashed from the loaded weights: the truth whatever was saved
    saved = weights.metadata().get("fingerprint")
    if saved and not converted and fingerprint != saved:
        logger.warning(
            "weights in %s changed since they were saved: fingerprint %s", folder, fingerprint[:12]
        )
    _write_stamp(folder, files, {key: fingerprint})
    return model


# ---- what `onetoken info` shows ----


@dataclass(frozen=True)
class CheckpointSummary:
    """A checkpoint described from its config and the safetensors headers, no weight read."""

    folder: Path
    model: HTCVLM  # on the meta device: geometry and layout only
    provenance: dict[str, str]  # where parts came from, as config.json says; empty when it does not
    dtypes: dict[str, int]  # stored dtype ("BF16", "F32", ...) -> values of that dtype
    weights_bytes: int  # the weight files' sizes
    n_shards: int  # 1 for a single model.safetensors
    fingerprint: str | None  # the stamp's, when it vouches for the files as they are; else None

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def describe(path: str | Path) -> CheckpointSummary:
    folder, meta, weights = _open_folder(path)
    files = _stat(folder, [CONFIG_FILE, *weights.files])
    model = _build_on_meta(folder, meta)
    dtypes: dict[str, int] = {}
    for dtype, shape in tensor_headers(weights).values():
        dtypes[dtype] = dtypes.get(dtype, 0) + torch.Size(shape).numel()
    return CheckpointSummary(
        folder=folder,
        model=model,
        provenance=dict(meta.get("provenance") or {}),
        dtypes=dtypes,
        weights_bytes=sum((folder / f).stat().st_size for f in weights.tensors),
        n_shards=weights.n_shards,
        fingerprint=_stamped_fingerprint(folder, files, _STORED),
    )
