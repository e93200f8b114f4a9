"""The driver's per-step log (htcvlm/train/progress.py): one JSON line per step, kept across a resume."""

from __future__ import annotations

import json

from htcvlm.train.progress import METRICS_FILE, StepLog


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()]


def test_a_resumed_run_replaces_the_lines_after_its_checkpoint(tmp_path):
    """A killed run logged steps 1..6 and checkpointed at 4; the rerun starts at 4, drops 5 and 6 and logs
    them again: every step has one line, the rerun's."""
    with StepLog(tmp_path, 0, 8, show_progress=False) as log:
        for step in range(1, 7):
            log.write({"step": step, "loss": 1.0 / step, "tokens_per_s": 10.0})
    with StepLog(tmp_path, 4, 8) as log:  # a bar shown (a disabled tqdm counts nothing)
        assert log.bar.n == 4
        for step in range(5, 9):
            log.write({"step": step, "loss": 2.0, "tokens_per_s": 10.0})
        assert log.bar.n == 8
    assert _steps(tmp_path) == list(range(1, 9))
    losses = [json.loads(line)["loss"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert losses[3] == 0.25 and losses[4:] == [2.0] * 4
