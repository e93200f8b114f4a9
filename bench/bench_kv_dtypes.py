"""Decode error of each stored KV dtype against fp32, on the tiny model.

Each image's record goes through the cache's serializer as fp32, fp16, bf16 and int8 and back; the
prompt logits of decode() from it are compared with those from the fp32 record, and the greedy answers
with the fp32 answers. Also the bytes one serialized record takes.

    python bench/bench_kv_dtypes.py [--model DIR] [--images 64]
"""

from __future__ import annotations

import argparse

import torch

from cache.dtypes import KV_DTYPES
from cache.serde import roundtrip, serialize
from htcvlm.checkpoint import load_pretrained
from htcvlm.config import HTCConfig
from htcvlm.data.dataset import ProceduralVQA
from htcvlm.decode import DecodeBatch, decode
from htcvlm.generation import GenerationOptions
from htcvlm.model import new_model
from htcvlm.pool import tensorize
from htcvlm.tokenizer import train_tokenizer


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--model", help="checkpoint folder (default: a randomly initialised tiny model)")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model:
        model = load_pretrained(args.model)
        source = args.model
    else:
        model = new_model(HTCConfig.from_name("tiny"), train_tokenizer([], vocab_size=259)).eval()
        source = "tiny, random weights"
    data = tensorize(model, [ProceduralVQA("test", args.images)[i] for i in range(args.images)])
    pixels = data.pixels.float() / 255.0
    records = model.compress_pixels(pixels, [f"{i:064x}" for i in range(args.images)])
    prompts = [model.prompt_ids(q) for q in data.questions]
    opts = GenerationOptions(max_new_tokens=6)
    with torch.inference_mode():
        reference = DecodeBatch(model, records, prompts)
    ref_answers = [a.token_ids for a in decode(model, records, data.questions, opts)]
    print(
        f"model: {source}; {args.images} test images, questions of {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens"
    )
    print(f"{'kv dtype':<10}{'record bytes':>14}{'max |dlogit|':>15}{'greedy agree':>15}")
    for dtype in KV_DTYPES:
        stored = [roundtrip(r, dtype) for r in records]
        with torch.inference_mode():
            batch = DecodeBatch(model, stored, prompts)
        err = max(
            (batch.row_prompt_logits(i) - reference.row_prompt_logits(i)).abs().max().item()
            for i in range(len(prompts))
        )
        answers = [a.token_ids for a in decode(model, stored, data.questions, opts)]
        agree = sum(a == b for a, b in zip(answers, ref_answers, strict=True)) / len(answers)
        print(f"{dtype:<10}{len(serialize(records[0], dtype)):>14,}{err:>15.2e}{agree:>14.1%}")


if __name__ == "__main__":
    main()
