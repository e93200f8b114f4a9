"""A checkpoint's weights on disk: one `model.safetensors`, or shards and an index as transformers writes.

    model.safetensors                                  when the weights fit in one shard
    model-00001-of-00003.safetensors ... + model.safetensors.index.json
        {"metadata": {"total_size": bytes, ...}, "weight_map": {tensor name: shard file name}}

Tensors are read one by one straight onto the target device (safetensors' `safe_open(device=...)`), in
their stored dtype unless a caller asks for another, so no full copy of the model ever sits in host memory
when the target is a GPU. Problems with the files are `CheckpointError`s naming the file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from htcvlm.errors import CheckpointError
from htcvlm.sizes import parse_size

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' long-standing default: files that every file system takes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(state: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_shard_size` bytes, in state-dict order; a tensor
    larger than that alone fills a shard of its own (tensors are never split)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(tensor)
    return shards


def write_weights(
    folder: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], max_shard_size: int | str
) -> list[str]:
    """Write `state` into `folder` (one file, or shards and their index) and return the file names written.

    Weight files of an earlier save that this one does not overwrite are removed, so the folder never holds
    a stale single file beside an index, or shards of an old count."""
    shards = plan_shards(state, parse_size(max_shard_size))
    if len(shards) == 1:
        names = [WEIGHTS_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stale = [p for p in _weight_files_present(folder) if p.name not in names]
    for shard, file in zip(shards, names, strict=True):
        # one shard at a time: a GPU model is copied to host memory a shard (at most max_shard_size) at once
        tensors = {name: state[name].detach().contiguous().cpu() for name in shard}
        save_file(tensors, str(folder / file), metadata=metadata)
        del tensors
    if len(shards) > 1:
        index = {
            "metadata": {**metadata, "total_size": sum(_nbytes(t) for t in state.values())},
            "weight_map": {name: file for shard, file in zip(shards, names, strict=True) for name in shard},
        }
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX_FILE)
    for path in stale:
        path.unlink()
    return names


def _weight_files_present(folder: Path) -> list[Path]:
    found = [folder / WEIGHTS_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]
    return [
        p
        for p in found
        if p.is_file() and (p.name in (WEIGHTS_FILE, INDEX_FILE) or SHARD_PATTERN.fullmatch(p.name))
    ]


@dataclass(frozen=True)
class WeightFiles:
    """Which files of a checkpoint folder hold its weights, and which tensors each holds."""

    folder: Path
    index: Path | None  # model.safetensors.index.json, or None for a single model.safetensors
    tensors: dict[str, list[str]]  # file name -> tensor names it holds, in the order files are read

    @property
    def files(self) -> list[str]:
        """Every file the weights depend on: the shards and the index (what a fingerprint stamp covers)."""
        return [*self.tensors, *([self.index.name] if self.index else [])]

    @property
    def n_shards(self) -> int:
        return len(self.tensors)

    def metadata(self) -> dict[str, str]:
        """The string metadata saved with the weights (format, fingerprint): the index's or the file's."""
        if self.index is not None:
            meta = json.loads(self.index.read_text()).get("metadata") or {}
            return {k: v for k, v in meta.items() if isinstance(v, str)}
        with _open(self.folder / WEIGHTS_FILE) as f:
            return f.metadata() or {}


def find_weights(folder: Path) -> WeightFiles:
    """The weight files of `folder`: the index's shards if it has model.safetensors.index.json, else
    model.safetensors. A missing file or an index that is not transformers' format is a CheckpointError."""
    index = folder / INDEX_FILE
    if not index.is_file():
        if not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"model directory {folder} is missing {WEIGHTS_FILE} (or {INDEX_FILE})")
        with _open(folder / WEIGHTS_FILE) as f:
            return WeightFiles(folder, None, {WEIGHTS_FILE: list(f.keys())})
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a safetensors index ({{'weight_map': ...}}): {exc!r}") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    tensors: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        if Path(file).name != file:
            raise CheckpointError(f"{index} names shard {file!r} outside its folder")
        tensors.setdefault(file, []).append(name)
    for file in tensors:
        if not (folder / file).is_file():
            raise CheckpointError(
                f"model directory {folder} is missing shard {file} (listed in {INDEX_FILE})"
            )
    return WeightFiles(folder, index, tensors)


def _open(path: Path, device: str = "cpu") -> Any:  # safetensors' handle has no public type
    try:
        # On the CPU, pread(2) rather than safetensors' default mmap: a tensor then owns its memory instead
        # of mapping the file, so a checkpoint overwritten in place under a running process (cp over it)
        # can neither change its weights behind the fingerprint nor crash it (SIGBUS) at a first touch.
        # A GPU tensor is copied off the mapping as it is read.
        backend = "pread" if torch.device(device).type == "cpu" else "mmap"
        return safe_open(str(path), framework="pt", device=device, backend=backend)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc


def tensor_headers(weights: WeightFiles) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's safetensors dtype ("BF16", "F32", ...) and shape, read from the headers alone."""
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in weights.tensors:
        with _open(weights.folder / file) as f:
            for name in f.keys():
                part = f.get_slice(name)
                headers[name] = (part.get_dtype(), tuple(part.get_shape()))
    return headers


def read_weights(
    weights: WeightFiles, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], bool]:
    """Every tensor, shard by shard, read straight onto `device`, and whether any was cast: floating
    tensors are cast to `dtype` when given, one at a time, so a cast never holds two copies of the model."""
    state: dict[str, torch.Tensor] = {}
    converted = False
    for file, names in weights.tensors.items():
        with _open(weights.folder / file, str(device)) as f:
            held = set(f.keys())
            absent = [n for n in names if n not in held]
            if absent:
                raise CheckpointError(
                    f"{weights.folder / file} lacks {len(absent)} tensors its index lists, e.g. {absent[0]!r}"
                )
            for name in names:
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor, converted = tensor.to(dtype), True
                state[name] = tensor
    return state, converted
