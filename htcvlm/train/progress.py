"""What the driver of a distributed run shows and keeps of every optimizer step.

`StepLog` takes one entry per step (a dict with "step", "loss", "tokens_per_s" and whatever else the
workers measured) and
- moves a progress bar (tqdm: steps done, ETA from its rate) showing the loss and tokens/s;
- appends the entry as one JSON line to `out/metrics.jsonl`;
- writes its numbers to TensorBoard under `out/tensorboard` when the `tensorboard` package is installed
  (torch.utils.tensorboard needs it; without it nothing is written and nothing fails).

A resumed run starts from its checkpoint's step: the lines of steps after it (written by the run that was
killed, and about to be trained again) are dropped when the log opens, so every step has one line.
Nothing here imports Ray: `distributed` feeds it from the workers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class StepLog:
    def __init__(self, out: Path, start_step: int, steps: int, show_progress: bool = True) -> None:
        self.path = out / METRICS_FILE
        if self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        self.file = self.path.open("a", encoding="utf-8")
        self.bar = tqdm(
            total=steps, initial=start_step, desc="stage 2", unit="step", disable=not show_progress
        )
        self.tensorboard = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1)

    def write(self, entry: dict[str, Any]) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()  # a killed driver keeps every step it saw
        self.bar.update(entry["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry.get('tokens_per_s', 0.0):.0f}")
        if self.tensorboard is not None:
            for name, value in entry.items():
                if name != "step" and isinstance(value, int | float):
                    self.tensorboard.add_scalar(f"stage2/{name}", value, entry["step"])

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
