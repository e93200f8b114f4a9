"""Decoding throughput of the running batch: generated tokens per second at batch 1, 16 and 64.

Every row answers from its own cached record, greedy and sampled (temperature 0.8, top_p 0.9, seeded),
for a fixed number of new tokens (EOS's logit is held at 0, so rows rarely end early; every emitted
token counts). What it measures is the per-step work around the forward: sampling, streaming text,
admitting and dropping rows. The same script runs against an older checkout for before/after figures
(PYTHONPATH=that checkout).

    python bench/bench_decode_loop.py [--preset tiny] [--new-tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from htcvlm.config import HTCConfig
from htcvlm.decode import decode_stream
from htcvlm.generation import GenerationOptions
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


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = train_tokenizer([q.lower() for q in QUESTIONS] * 8, vocab_size=400)
    model = new_model(HTCConfig.from_name(args.preset), tokenizer).eval()
    with torch.no_grad():
        model.llm.lm_head.weight[tokenizer.eos_token_id] = 0.0  # rows rarely end early (counted if they do)
    cfg = model.config
    largest = max(int(b) for b in args.batches.split(","))
    pixels = torch.rand(largest, 3, cfg.image_size, cfg.image_size)
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(largest)])
    print(
        f"preset {cfg.name}: LLM {cfg.llm.num_layers} x {cfg.llm.hidden_size}, vocab {len(tokenizer)}, "
        f"{args.new_tokens} new tokens per row, {args.threads} threads, best of {args.repeats}"
    )
    print(f"{'batch':>6}{'greedy tok/s':>16}{'sampled tok/s':>16}")
    for batch in (int(b) for b in args.batches.split(",")):
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
        greedy = GenerationOptions(max_new_tokens=args.new_tokens)
        sampled = GenerationOptions(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.9, seed=7)
        rates = [tokens_per_s(model, records[:batch], questions, o, args.repeats) for o in (greedy, sampled)]
        print(f"{batch:>6}{rates[0]:>16.0f}{rates[1]:>16.0f}")


if __name__ == "__main__":
    main()
