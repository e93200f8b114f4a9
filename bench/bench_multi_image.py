"""One question over k cached images: time to first token and K/V bytes, against a LLaVA-style prefix.

On the `bench` preset (576 patches + 4 anchors, small widths) with its context widened to `--context`
positions: k records in one context (`decode`'s placement: each image one voco token, moved to its
place by a rotation), for k = 1, 8, 64, 512; against what an image-token prefix needs for the same
images, 576 * k tokens recomputed in one forward (timed where it fits the context, else marked as not
fitting: the LLaVA-1.5 context is 2048). Medians of `--repeats` runs, one process, same threads.

    python bench/bench_multi_image.py [--repeats 5] [--threads 2] [--context 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from htcvlm.config import HTCConfig
from htcvlm.decode import DecodeBatch, max_images
from htcvlm.model import new_model
from htcvlm.tokenizer import train_tokenizer

QUESTION = "how many of the images show a red circle?"
KS = (1, 8, 64, 512)
LLAVA_CONTEXT = 2048


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = HTCConfig.from_name("bench")
    config = base.with_(llm=replace(base.llm, max_position_embeddings=args.context))
    tokenizer = train_tokenizer([QUESTION] * 8, vocab_size=300)
    model = new_model(config, tokenizer).eval()
    with torch.inference_mode():
        pixels = torch.rand(8, 3, config.image_size, config.image_size)
        records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(8)])
    prompt = model.prompt_ids(QUESTION)
    per_token = records[0].keys[:, :, :1].numel() * 2 * 2  # K and V of one token in fp16
    d = config.llm.hidden_size
    print(
        f"preset bench: LLM {config.llm.num_layers} x {d}, context {args.context} (at most "
        f"{max_images(model)} images of {config.n_voco} voco token), question {len(prompt)} tokens, "
        f"{args.threads} threads, medians of {args.repeats}"
    )
    print(
        f"{'k':>5}{'records: TTFT ms':>18}{'K/V':>12}{'prefix tokens':>15}{'prefix: TTFT ms':>17}{'K/V':>12}"
    )
    for k in KS:
        row = [records[i % len(records)] for i in range(k)]

        @torch.inference_mode()
        def cached(row=row) -> None:
            DecodeBatch(model, [row], [prompt]).last_logits().argmax()

        ours = median_ms(cached, args.repeats)
        tokens = config.n_patches * k + len(prompt)
        if tokens <= args.context:
            embeds = torch.randn(1, tokens, d) * 0.02

            @torch.inference_mode()
            def prefix(embeds=embeds) -> None:
                model.llm(inputs_embeds=embeds, use_cache=True).logits[:, -1].argmax()

            theirs = f"{median_ms(prefix, args.repeats):.1f}"
        else:
            theirs = "does not fit"
        fits = "" if tokens <= LLAVA_CONTEXT else " (> 2048)"
        print(
            f"{k:>5}{ours:>18.1f}{per_token * k * config.n_voco / 2**10:>10.0f} K"
            f"{tokens:>15,}{theirs:>17}{per_token * config.n_patches * k / 2**20:>10.1f} M{fits}"
        )


if __name__ == "__main__":
    main()
