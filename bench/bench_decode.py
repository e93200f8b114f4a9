"""Time to first token from a cached record, against recomputing the visual prefix and against text alone.

On the `bench` preset (576 patches + 4 anchors, small widths): for one question,
- cached:      decode() prefill from a record (the voco state injected, only the question computed);
- recompute:   the LLaVA-style cost, the full [V_hy; voco; question] prefill through the LLM, V_hy given;
- from pixels: recompute plus both vision channels (what a question costs with no cache at all);
- text alone:  the question with no image.
Also the bytes cached per image against the KV cache of all 576 image tokens. Ratios from one run.

    python bench/bench_decode.py [--repeats 20] [--threads 2] [--preset bench]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from htcvlm.config import HTCConfig
from htcvlm.decode import DecodeBatch
from htcvlm.model import new_model
from htcvlm.tokenizer import train_tokenizer

QUESTION = "What color is the large striped object in the top left corner of the picture?"


def median_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), statistics.quantiles(times, n=10)[-1]


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = train_tokenizer([QUESTION.lower()] * 8, vocab_size=300)
    model = new_model(HTCConfig.from_name(args.preset), tokenizer).eval()
    cfg = model.config
    pixels = torch.rand(1, 3, cfg.image_size, cfg.image_size)
    record = model.compress_pixels(pixels, ["0" * 64])[0]
    prompt = model.prompt_ids(QUESTION)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        prefix, _ = model.prefix_embeds(pixels)
    full = torch.cat([prefix, model.embed_text(ids)], dim=1).detach()
    mask = model.layout.mask([len(prompt)])

    @torch.inference_mode()
    def cached() -> None:
        DecodeBatch(model, [record], [prompt]).last_logits().argmax()

    @torch.inference_mode()
    def recompute() -> None:
        model.llm(inputs_embeds=full, attention_mask=mask, use_cache=True).logits[:, -1].argmax()

    @torch.inference_mode()
    def from_pixels() -> None:
        model(pixels, ids)[0][:, -1].argmax()

    @torch.inference_mode()
    def text_alone() -> None:
        model.llm(input_ids=ids, use_cache=True).logits[:, -1].argmax()

    rows = [
        (name, *median_ms(fn, args.repeats))
        for name, fn in [
            ("cached record", cached),
            ("recompute V_hy prefix", recompute),
            ("recompute from pixels", from_pixels),
            ("text alone", text_alone),
        ]
    ]
    base = rows[0][1]
    print(
        f"preset {cfg.name}: V_hy {cfg.n_visual} tokens, question {len(prompt)} tokens, "
        f"LLM {cfg.llm.num_layers} x {cfg.llm.hidden_size}, {args.threads} threads, {args.repeats} repeats"
    )
    print(f"{'time to first token':<24}{'p50 ms':>10}{'p90 ms':>10}{'vs cached':>12}")
    for name, p50, p90 in rows:
        print(f"{name:<24}{p50:>10.2f}{p90:>10.2f}{p50 / base:>11.2f}x")

    per_token = record.keys[:, :, :1].numel() * 2 * 2  # K and V of one token, fp16
    voco_bytes = per_token * cfg.n_voco
    image_bytes = per_token * cfg.n_patches
    print(
        f"bytes cached per image (fp16 K/V): {voco_bytes:,} for {cfg.n_voco} voco token vs "
        f"{image_bytes:,} for {cfg.n_patches} image tokens: {image_bytes / voco_bytes:.0f}x smaller"
    )


if __name__ == "__main__":
    main()
