"""Wall time of a short stage 2 of the tiny recipe: this process alone against Ray Train with 1 and 2
workers (`onetoken train --workers N`), all from one prepared start (stages 1 and 0 made once).

Every run is the `onetoken train` command as a user types it, timed from launch to exit (Ray's start,
the workers' start and the data stages included), beside the stage-2 minutes the run itself logs. The
single process renders its pool up front and runs the frozen tower and MGVQ over it once; the Ray runs
render each step's samples on the fly in Ray Data and run the frozen parts on every micro-batch.

    python bench/bench_distributed.py [--steps 50] [--pool 8192] [--easy 1024] [--out runs/bench-distributed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = {  # name: (folder, extra flags)
    "single process, 2 threads": ("single", ["--threads", "2"]),
    "Ray Train, 1 worker × 2 threads": ("ray-1", ["--workers", "1", "--threads", "2"]),
    "Ray Train, 2 workers × 1 thread": ("ray-2", ["--workers", "2", "--threads", "1"]),
}


def onetoken(*args: str) -> float:
    """Seconds `onetoken ARGS` ran; it must succeed."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "llm_worker.cli", *args]
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "ONETOKEN_LOG_LEVEL": "WARNING"}
    )
    return time.perf_counter() - started


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--steps", type=int, default=50, help="stage-2 steps of every run")
    parser.add_argument("--pool", type=int, default=8192, help="procedural training scenes")
    parser.add_argument("--easy", type=int, default=1024, help="single-object scenes beside them")
    parser.add_argument("--out", default="runs/bench-distributed")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    data = ["--pool", str(args.pool), "--easy", str(args.easy), "--val-size", "8", "--eval-every", "1000"]
    prep = root / "prep"
    onetoken("train", "--out", str(prep), "--steps", "0", "--mgvq-steps", "1", "--vision-steps", "1", *data)
    print(f"stage 2 of the tiny recipe: {args.steps} steps of 128 images × 4 questions")
    print(f"pool {args.pool} + {args.easy} single-object scenes; prepared stages 1 and 0 (--init-from)")
    print(f"{'run':36} {'command s':>10} {'stage-2 min':>12}")
    for name, (folder, flags) in RUNS.items():
        out = root / folder
        common = ["--steps", str(args.steps), "--vision-steps", "0", *data, *flags]
        seconds = onetoken("train", "--out", str(out), "--init-from", str(prep), *common)
        log = json.loads((out / "train_state.json").read_text())["log"]
        print(f"{name:36} {seconds:10.1f} {log[-1]['minutes']:12.2f}", flush=True)


if __name__ == "__main__":
    main()
