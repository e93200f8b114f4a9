"""Checkpoints: a folder of config.json + model.safetensors + tokenizer files. Never a hub download.

Components of a new model (a CLIP vision tower, a causal LM and its tokenizer) load from local Hugging
Face folders named in the config; an incomplete folder is a `CheckpointError` naming what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from htcvlm.config import HTCConfig
from htcvlm.errors import CheckpointError
from htcvlm.model import HTCVLM

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# Beside the weights: their fingerprint and the file's size, mtime and inode when it was hashed, so a
# load of unchanged weights skips hashing them (minutes at 7B), and any rewrite of the file re-hashes.
STAMP_FILE = "fingerprint.json"
FORMAT = "onetoken-htcvlm/1"


def save_pretrained(model: HTCVLM, path: str | Path) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # Local component paths are only for building a new model; the checkpoint holds every weight itself.
    config = model.config.to_dict()
    config["vision"]["path"] = config["llm"]["path"] = None
    (folder / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "htcvlm": config}, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fingerprint = model.fingerprint()
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT, "fingerprint": fingerprint})
    _write_stamp(folder, fingerprint)
    model.tokenizer.save_pretrained(str(folder))
    return folder


def _weights_stat(folder: Path) -> dict[str, int]:
    stat = (folder / WEIGHTS_FILE).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _write_stamp(folder: Path, fingerprint: str) -> None:
    """Record that the weights file, as it is now (size, mtime, inode), has `fingerprint`: the next
    load trusts it without hashing every weight. Best effort: a read-only folder just hashes again."""
    stamp = {"fingerprint": fingerprint, "weights": _weights_stat(folder)}
    try:
        (folder / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
    except OSError as e:
        logger.info("cannot write %s (%s): the next load hashes the weights again", folder / STAMP_FILE, e)


def _stamped_fingerprint(folder: Path) -> str | None:
    """The stamp's fingerprint if the weights file is unchanged since it was hashed, else None."""
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    fingerprint = stamp.get("fingerprint") if isinstance(stamp, dict) else None
    if isinstance(fingerprint, str) and stamp.get("weights") == _weights_stat(folder):
        return fingerprint
    return None


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


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> HTCVLM:
    """Load a OneToken checkpoint onto `device` ("auto": cuda where this process sees a GPU, else cpu)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model directory {folder} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"model directory {folder} is missing {name}")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder / CONFIG_FILE} is not a OneToken checkpoint (format {meta.get('format')!r})"
        )
    config = HTCConfig.from_dict(meta["htcvlm"])
    model = HTCVLM(config, load_tokenizer(folder)).to(device)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {folder / WEIGHTS_FILE} do not fit its config: {exc}") from exc
    model.eval()
    if (known := _stamped_fingerprint(folder)) is not None:
        model.remember_fingerprint(known)
        return model
    fingerprint = model.fingerprint()  # hashed from the loaded weights: the truth whatever was saved
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
        saved = (weights.metadata() or {}).get("fingerprint")
    if saved and fingerprint != saved:
        logger.warning(
            "weights in %s changed since they were saved: fingerprint %s", folder, fingerprint[:12]
        )
    _write_stamp(folder, fingerprint)
    return model
