"""Running `onetoken` as a user does: a subprocess of this interpreter, on the code under test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def onetoken(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`onetoken ARGS...` to completion, its output captured (`env`: the whole environment; default ours)."""
    return subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", *args],
        env=os.environ.copy() if env is None else env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bar_and_other_lines(stderr: str) -> tuple[list[str], list[str]]:
    """stderr split into the progress bar's redraws (tqdm: "ingest: ..." separated by \\r) and the rest."""
    pieces = [p.strip() for line in stderr.split("\n") for p in line.split("\r")]
    pieces = [p for p in pieces if p]
    return [p for p in pieces if p.startswith("ingest:")], [p for p in pieces if not p.startswith("ingest:")]
