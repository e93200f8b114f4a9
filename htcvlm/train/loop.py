"""The one training loop every stage runs, and the state saved for resuming.

- `run_steps`: per step, the scheduled learning rate (`lr_at`), the stage's loss, backward, optional
  gradient clipping, the optimizer step, a progress bar; the stage says what happens between steps
- `save_training_state` / `load_training_state`: model, optimizer and log as safetensors + JSON, never
  pickled, so a rerun continues where the last one saved
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from htcvlm.checkpoint import save_pretrained
from htcvlm.model import HTCVLM
from htcvlm.train.recipe import TrainConfig

logger = logging.getLogger(__name__)

# A stage's step: the loss of that step's batch, and what the progress bar shows of it.
StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, str]]]


def lr_at(step: int, cfg: TrainConfig, base_lr: float, total: int) -> float:
    """Linear warm-up, then cosine decay to base_lr * min_lr_ratio."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_steps(
    opt: torch.optim.Optimizer,
    loss_at: StepLoss,
    *,
    cfg: TrainConfig,
    lr: float,
    steps: int,
    desc: str,
    clip: Sequence[torch.nn.Parameter] | None = None,
    start: int = 0,
    after_step: Callable[[int, torch.Tensor], None] | None = None,
    show_progress: bool = True,
) -> torch.Tensor | None:
    """Steps start..steps-1 of one stage; returns the last step's loss (None if there was none).

    The learning rate is `lr_at(step, cfg, lr, steps)` (warm-up, then cosine); `clip`: these
    parameters' gradient norm is clipped to cfg.grad_clip; `after_step(step, loss)` runs after each
    optimizer step (evaluation, checkpoints).
    """
    loss = None
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, disable=not show_progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, lr, steps)
        loss, shown = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, cfg.grad_clip)
        opt.step()
        bar.set_postfix(shown)
        if after_step is not None:
            after_step(step, loss)
    return loss


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
    """The model, the optimizer state, and how far training got with its log: what a rerun resumes from."""
    save_pretrained(model, out)
    tensors, meta = _state_tensors(opt)
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "train_state.json").write_text(json.dumps({"step": step, "log": log, **meta}, indent=1))


def load_training_state(out: Path, model: HTCVLM, opt: torch.optim.Optimizer) -> tuple[int, list]:
    """Restore the model and optimizer that `out` saved; returns (its step, its log). (0, []) with
    nothing restored when `out` holds no training state."""
    if not (out / "train_state.json").is_file():
        return 0, []
    state = json.loads((out / "train_state.json").read_text())
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    _load_state(opt, load_file(str(out / "optimizer.safetensors")), state)
    logger.info("resuming %s from step %d", out, state["step"])
    return state["step"], state["log"]
