"""Published weight files read into one state dict, and their keys mapped into ours.

Weights come as safetensors or as PyTorch pickles (`.bin`, `.pt`), in one file or in shards listed by an
index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`). Pickles are only ever opened with
`torch.load(weights_only=True)`, which refuses anything that is not tensors in plain containers.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from htcvlm.errors import CheckpointError

# Looked for in this order: an index names its shards; otherwise one file holds every weight.
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or PyTorch weights file -> its tensors (on the CPU)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (safetensors, .bin, .pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:  # refused or corrupt
        raise CheckpointError(f"{path} is not a plain PyTorch weights file: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return state


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a Hugging Face style folder: the shards its index names, or its one weights file.

    A shard must hold exactly the keys the index assigns to it: a key the index promises but no shard has,
    or one a shard has that the index does not list, is a `CheckpointError` naming it.
    """
    for name in INDEXES:
        if (folder / name).is_file():
            return _load_sharded(folder, name)
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return load_weights_file(folder / name)
    raise CheckpointError(f"{folder} holds no weights: none of {[*INDEXES, *SINGLE_FILES]}")


def _load_sharded(folder: Path, index_name: str) -> dict[str, torch.Tensor]:
    try:
        weight_map: dict[str, str] = json.loads((folder / index_name).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / index_name} has no weight_map: {exc}") from exc
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    state: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        path = folder / shard
        if Path(shard).name != shard or not path.is_file():
            raise CheckpointError(f"{index_name} names shard {shard!r}, which is not a file in {folder}")
        part = load_weights_file(path)
        if missing := keys - part.keys():
            raise CheckpointError(f"{path} lacks keys its index assigns to it: {_some(missing)}")
        if extra := part.keys() - keys:
            raise CheckpointError(f"{path} holds keys its index does not list: {_some(extra)}")
        state.update(part)
    return state


def rename_keys(
    state: dict[str, torch.Tensor],
    renames: Sequence[tuple[str, str]],
    drops: Sequence[str],
    source: str,
) -> dict[str, torch.Tensor]:
    """Published keys -> ours. `renames` are (regex, replacement) pairs, the first full match wins;
    `drops` are regexes of keys known to carry nothing we use. Any other key is an error naming it."""
    drop_patterns = [re.compile(p) for p in drops]
    rename_patterns = [(re.compile(p), r) for p, r in renames]
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if any(p.fullmatch(key) for p in drop_patterns):
            continue
        for pattern, replacement in rename_patterns:
            if match := pattern.fullmatch(key):
                new = match.expand(replacement)
                if new in out:
                    raise CheckpointError(f"{source}: two weights map to {new} (one of them {key})")
                out[new] = tensor
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"{source} has unexpected weights: {_some(unexpected)}")
    return out


def _some(keys: Sequence[str] | set[str], shown: int = 12) -> str:
    names = sorted(keys)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
