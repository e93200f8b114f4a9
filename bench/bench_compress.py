"""compress() throughput, bytes per record, and exactness at the paper's width, on whatever device runs it.

1. `compress()` images/s at batch 1, 8 and 32 on `--preset` (default `bench`: 576 patches + 4 anchors,
   small widths) with random weights, from pixels (the image decode is not timed).
2. Bytes of one record, serialized, in fp16 and int8 K/V.
3. fp32 exactness on a 2-layer slice of the `paper` geometry (CLIP ViT-L/14-336 and LLaMA-7B widths,
   2 vision and 2 LLM layers, random weights): the max |logit| difference between decode() from the
   record and the full masked pass over [V_hy; voco; question], the central invariant at full width.

    python bench/bench_compress.py [--preset bench] [--threads 2] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from cache.serde import serialize
from htcvlm.config import HTCConfig
from htcvlm.decode import DecodeBatch
from htcvlm.model import new_model
from htcvlm.tokenizer import train_tokenizer

QUESTION = "what color is the large striped circle on the left?"


def images_per_s(model, batch: int, repeats: int, device: str) -> float:
    size = model.config.image_size
    pixels = torch.rand(batch, 3, size, size, device=device)
    ids = [f"{i:064x}" for i in range(batch)]
    with torch.inference_mode():
        model.compress_pixels(pixels, ids)  # warm-up
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            model.compress_pixels(pixels, ids)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def paper_slice_error(tokenizer, device: str) -> tuple[float, int]:
    """Max |logit| difference, decode() against the full masked pass, on 2 layers at paper width."""
    paper = HTCConfig.from_name("paper")
    config = paper.with_(
        vision=replace(paper.vision, num_layers=2),
        llm=replace(paper.llm, num_layers=2, vocab_size=len(tokenizer)),
    )
    model = new_model(config, tokenizer).to(device).eval()
    pixels = torch.rand(1, 3, config.image_size, config.image_size, device=device)
    prompt = model.prompt_ids(QUESTION)
    with torch.inference_mode():
        record = model.compress_pixels(pixels, ["0" * 64])[0]
        full, _ = model(pixels, torch.tensor([prompt], device=device), [len(prompt)])
        cached = DecodeBatch(model, [record], [prompt]).row_prompt_logits(0)
    return (cached - full[0, : len(prompt)]).abs().max().item(), sum(p.numel() for p in model.parameters())


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = train_tokenizer([QUESTION] * 8, vocab_size=300)
    model = new_model(HTCConfig.from_name(args.preset), tokenizer).to(args.device).eval()
    cfg = model.config
    print(
        f"preset {cfg.name}: {cfg.image_size} px, V_hy {cfg.n_visual} tokens, LLM {cfg.llm.num_layers} x "
        f"{cfg.llm.hidden_size}, {args.device}, {args.threads} threads, medians of {args.repeats}"
    )
    rates = {b: images_per_s(model, b, args.repeats, args.device) for b in (1, 8, 32)}
    for batch, rate in rates.items():
        print(f"compress() batch {batch:>2}: {rate:8.2f} images/s  ({rate / rates[1]:.2f}x batch 1)")
    with torch.inference_mode():
        record = model.compress_pixels(torch.rand(1, 3, cfg.image_size, cfg.image_size), ["0" * 64])[0]
    sizes = {dtype: len(serialize(record, dtype)) for dtype in ("fp16", "int8")}
    print("record bytes: " + ", ".join(f"{d} {n:,}" for d, n in sizes.items()))
    error, params = paper_slice_error(tokenizer, args.device)
    where = f"paper width, 2+2 layers ({params / 1e6:,.0f} M parameters), fp32"
    print(f"{where}: max |decode - full pass| = {error:.2e}")


if __name__ == "__main__":
    main()
