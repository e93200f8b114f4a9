"""What every training loop shares: the learning-rate schedule, and the state saved for resuming
(model, optimizer and log as safetensors + JSON, never pickled)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from htcvlm.checkpoint import save_pretrained
from htcvlm.model import HTCVLM
from htcvlm.train.recipe import TrainConfig


def lr_at(step: int, cfg: TrainConfig, base_lr: float, total: int) -> float:
    """Linear warm-up, then cosine decay to base_lr * min_lr_ratio."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (safetensors) and JSON: never pickled."""
    state = opt.state_dict()
    tensors = {
        f"{pid}.{name}": value.detach().cpu()
        for pid, slot in state["state"].items()
        for name, value in slot.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": state["param_groups"]}


def _load_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(out: Path, model: HTCVLM, opt: torch.optim.Optimizer, step: int, log: list) -> None:
    save_pretrained(model, out)
    tensors, meta = _state_tensors(opt)
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "train_state.json").write_text(json.dumps({"step": step, "log": log, **meta}, indent=1))
