"""How long `onetoken train` with its defaults takes on this machine, stage by stage.

Each stage runs a few steps (or a sample of the pool) and is timed; the wall time of the whole recipe
is then projected from the recipe `onetoken train` trains by default, `TrainConfig.from_name("tiny")`
(pool, steps per stage, evaluations), on the tiny hybrid. Run it on an otherwise idle machine: the
README promises the recipe in 45 minutes on 2 CPU cores.

    python bench/bench_train.py [--threads 2] [--sample 8192] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from htcvlm.config import HTCConfig
from htcvlm.evaluate import accuracy
from htcvlm.model import new_model
from htcvlm.pool import procedural_pool
from htcvlm.train.data import procedural_tokenizer
from htcvlm.train.recipe import TrainConfig, variant_config
from htcvlm.train.stages import train_mgvq, train_vision, train_vlm


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample", type=int, default=8192, help="pool samples rendered and encoded")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per training stage")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = TrainConfig.from_name("tiny")  # what `onetoken train` trains without flags
    n, k = args.sample, args.steps

    start = time.perf_counter()
    tokenizer = procedural_tokenizer()
    tokenizer_s = time.perf_counter() - start
    model = new_model(variant_config(HTCConfig.from_name("tiny"), "hybrid"), tokenizer)
    cfg = replace(r, steps=k, mgvq_steps=k, vision_steps=k, warmup=1, easy_steps=0, eval_every=10**9)
    per: dict[str, float] = {}  # seconds per sample or per step
    pool = None

    def render() -> None:
        nonlocal pool
        pool = procedural_pool(model, "train", n, questions=r.questions)

    per["render"] = timed(render) / n
    assert pool is not None
    per["mgvq_step"] = timed(lambda: train_mgvq(model, pool.pixels, cfg, show_progress=False)) / k
    per["quantize"] = timed(lambda: pool.quantize(model)) / n
    per["stage0_step"] = timed(lambda: train_vision(model, pool, cfg, show_progress=False)) / k
    if r.freeze_vision:
        per["patches"] = timed(lambda: pool.encode_patches(model)) / n
    per["stage2_step"] = timed(lambda: train_vlm(model, pool, cfg, "hybrid", show_progress=False)) / k
    val = procedural_pool(model, "val", r.val_size)
    per["val_eval"] = timed(lambda: accuracy(model, val))

    samples = r.pool + r.easy
    stages = {
        "tokenizer": tokenizer_s,
        f"render {samples:,} + {r.val_size} samples": per["render"] * (samples + r.val_size),
        f"stage 1: {r.mgvq_steps} MGVQ steps": per["mgvq_step"] * r.mgvq_steps,
        "MGVQ codes of the pool": per["quantize"] * samples,
        f"stage 0: {r.vision_steps} vision steps": per["stage0_step"] * r.vision_steps,
        "tower features of the pool": per.get("patches", 0.0) * samples,
        f"stage 2: {r.steps} steps, {r.questions} questions an image": per["stage2_step"] * r.steps,
        f"{r.steps // r.eval_every} validations": per["val_eval"] * (r.steps // r.eval_every),
    }
    print(f"onetoken train defaults on {args.threads} threads (measured on {n} samples, {k} steps a stage)")
    for name, unit in per.items():
        print(
            f"  {name:<14} {unit * 1e3:9.2f} ms"
            + (" per sample" if name in ("render", "quantize", "patches") else "")
        )
    print(f"{'stage':<40} {'minutes':>8}")
    for name, seconds in stages.items():
        print(f"{name:<40} {seconds / 60:8.1f}")
    print(f"{'projected total':<40} {sum(stages.values()) / 60:8.1f}")


if __name__ == "__main__":
    main()
