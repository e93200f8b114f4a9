"""CPU that Ray Data's scheduling loop takes from the process reading a long stream, with and without
`htcvlm.train.pacing` (what each Ray Train worker is to its training data).

A stream of `--rows` row numbers goes through one Ray Data actor that turns each batch of 128 into a
row of features (as `stream.SampleRows` does, at no cost), read by this process at `--rate` batches a
second, then as fast as it can. Printed: this process's CPU (cores) while it reads slowly, which is
the loop's own cost since reading is nearly free, and the seconds it waited on the stream for its
batches (pacing must not make a reader wait). Each setting runs in a fresh Python process and Ray.

    python bench/bench_ray_data_pacing.py [--rows 256000] [--rate 2] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ONE = r"""
import json, resource, sys, time
import numpy as np, ray
from ray.data import ActorPoolStrategy

paced, rows, rate, batches = sys.argv[1] == "1", int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
if paced:
    from htcvlm.train.pacing import pace_ray_data
    pace_ray_data()

class Rows:
    def __call__(self, batch):
        return {"data": batch["data"], "features": np.zeros((len(batch["data"]), 8192), np.float32)}

ds = ray.data.from_numpy(np.arange(rows)).map_batches(
    Rows, batch_size=128, compute=ActorPoolStrategy(size=1), num_cpus=1
)
it = iter(ds.iter_batches(batch_size=128, batch_format="numpy", prefetch_batches=1))
next(it)
time.sleep(3)  # the stream runs ahead of its reader, as it does of a training step
out = {}
for name, pause in (("slow", 1 / rate), ("fast", 0.0)):
    t0, c0, waited = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), 0.0
    for _ in range(batches):
        w = time.perf_counter()
        next(it)
        waited += time.perf_counter() - w
        time.sleep(pause)
    t1, c1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    cpu = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    out[name] = {"cores": cpu / (t1 - t0), "waited_s": waited}
print(json.dumps(out))
"""


def measure(paced: bool, rows: int, rate: float, batches: int) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.getcwd()}
    args = [sys.executable, "-c", ONE, "1" if paced else "0", str(rows), str(rate), str(batches)]
    done = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256_000, help="rows in the stream (the tiny recipe's)")
    parser.add_argument("--rate", type=float, default=2.0, help="batches a second the slow reader reads")
    parser.add_argument("--batches", type=int, default=20, help="batches read in each phase")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {paced: measure(paced, args.rows, args.rate, args.batches) for paced in (False, True)}
    print(f"a {args.rows:,}-row Ray Data stream through one actor, read by this process (2 CPUs)")
    print(f"{'scheduling loop':<18}{'slow reader: cores':>20}{'waited s':>10}{'fast reader: waited s':>23}")
    for paced, label in ((False, "as Ray runs it"), (True, "paced (50 ms)")):
        r = results[paced]
        print(
            f"{label:<18}{r['slow']['cores']:>20.2f}{r['slow']['waited_s']:>10.2f}{r['fast']['waited_s']:>23.2f}"
        )
    ratio = results[False]["slow"]["cores"] / max(results[True]["slow"]["cores"], 1e-3)
    print(f"the loop's CPU, unpaced / paced: {ratio:.1f}x  ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
