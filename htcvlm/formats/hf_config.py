"""A Hugging Face folder's config.json, read raw and into transformers' config classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig

from htcvlm.errors import CheckpointError

C = TypeVar("C", bound=PretrainedConfig)


def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json (is it a downloaded model folder?)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return raw


def parse_config(cls: type[C], raw: dict[str, Any], source: str) -> C:
    """`raw` as a transformers config (its defaults fill what the file leaves out, as published LLaVA
    configs expect); a config transformers refuses is a `CheckpointError`."""
    try:
        return cls.from_dict(raw)
    except (ValueError, TypeError, StrictDataclassError) as exc:
        raise CheckpointError(f"{source}: transformers refuses its {cls.__name__}: {exc}") from exc
