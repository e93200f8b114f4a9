"""Decoding throughput of the running batch: generated tokens per second at batch 1, 16 and 64.

Every row answers from its own cached record, greedy and sampled (temperature 0.8, top_p 0.9, seeded),
for a fixed number of new tokens (EOS's logit is held at 0, so rows rarely end early; every emitted
token counts). What it measures is the per-step work around the forward: sampling, streaming text,
admitting and dropping rows. With `--against DIR` the same measurement also runs on an older checkout
(this script in a subprocess importing from DIR), one after the other, and the ratio is printed.

    python bench/bench_decode_loop.py [--against ../older] [--preset tiny] [--new-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from htcvlm.config import HTCConfig

# Through htcvlm.decode, where both this checkout (which imports it there) and older ones (which defined
# it there) have it, so the same script measures either with --against.
from htcvlm.decode import GenerationOptions, decode_stream
from htcvlm.model import new_model
from htcvlm.tokenizer import train_tokenizer

QUESTIONS = ["What color is the large striped object?", "How many objects?", "Is the circle left of it?"]


def tokens_per_s(model, records, questions, options: GenerationOptions, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats + 1):  # the first run warms up
        started = time.perf_counter()
        n = sum(len(events) for events in decode_stream(model, records, questions, options))
        best = max(best, n / (time.perf_counter() - started))
    return best


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """batch -> [greedy tok/s, sampled tok/s] for this interpreter's checkout."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = train_tokenizer([q.lower() for q in QUESTIONS] * 8, vocab_size=400)
    model = new_model(HTCConfig.from_name(args.preset), tokenizer).eval()
    with torch.no_grad():
        model.llm.lm_head.weight[tokenizer.eos_token_id] = 0.0  # rows rarely end early (counted if they do)
    cfg = model.config
    batches = [int(b) for b in args.batches.split(",")]
    pixels = torch.rand(max(batches), 3, cfg.image_size, cfg.image_size)
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(max(batches))])
    greedy = GenerationOptions(max_new_tokens=args.new_tokens)
    sampled = GenerationOptions(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.9, seed=7)
    rates = {}
    for batch in batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
        rates[str(batch)] = [
            tokens_per_s(model, records[:batch], questions, o, args.repeats) for o in (greedy, sampled)
        ]
    return rates


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--against", type=Path, help="an older checkout to measure too")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the rates as JSON (for --against)")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args)))
        return
    ours = measure(args)
    theirs: dict[str, list[float]] = {}
    if args.against:
        argv = [a for a in sys.argv[1:] if not a.startswith("--against") and a != str(args.against)]
        env = {**os.environ, "PYTHONPATH": str(args.against)}
        done = subprocess.run(
            [sys.executable, __file__, *argv, "--json"], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        theirs = json.loads(done.stdout.splitlines()[-1])
    cfg = HTCConfig.from_name(args.preset)
    print(
        f"preset {cfg.name}: LLM {cfg.llm.num_layers} x {cfg.llm.hidden_size}, {args.new_tokens} new tokens "
        f"per row, {args.threads} threads, best of {args.repeats}; tokens/s"
    )
    head = f"{'batch':>6}{'greedy':>10}{'sampled':>10}"
    if theirs:
        head += f"{'greedy before':>16}{'sampled before':>16}{'greedy x':>10}{'sampled x':>11}"
    print(head)
    for batch, (greedy, sampled) in ours.items():
        line = f"{batch:>6}{greedy:>10.0f}{sampled:>10.0f}"
        if theirs:
            g0, s0 = theirs[batch]
            line += f"{g0:>16.0f}{s0:>16.0f}{greedy / g0:>9.2f}x{sampled / s0:>10.2f}x"
        print(line)


if __name__ == "__main__":
    main()
