"""`onetoken` command line: model-core commands (`demo`, `info`).

Flags and ONETOKEN_* environment variables are read here and nowhere else.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys

import torch

from htcvlm.config import PRESETS, HTCConfig

logger = logging.getLogger(__name__)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_info(args: argparse.Namespace) -> int:
    """Geometry, parameter count and bytes cached per image of a preset, built on the meta device."""
    from htcvlm.model import new_model
    from htcvlm.tokenizer import train_tokenizer

    config = HTCConfig.from_name(args.preset)
    tokenizer = train_tokenizer([], vocab_size=259)
    with torch.device("meta"):  # no weights are allocated, even for the 7B paper geometry
        model = new_model(config, tokenizer)
    # The tokenizer here is a stand-in; count embedding and output rows at the preset's own vocabulary.
    missing_rows = config.llm.vocab_size - len(tokenizer)
    params = sum(p.numel() for p in model.parameters()) + 2 * missing_rows * config.llm.hidden_size
    per_token = config.kv_values_per_image // config.n_voco * 2  # fp16 bytes of one token's K/V state
    print(f"preset            {config.name}")
    print(f"image             {config.image_size} px, {config.n_patches} patches, q in R^{config.q_dim}")
    print(f"V_hy              {config.n_visual} tokens ({config.channels}, fusion {config.fusion})")
    print(f"parameters        {params / 1e6:,.1f} M ({config.llm.vocab_size}-token vocabulary)")
    print(f"cached per image  {_human(per_token * config.n_voco)} fp16 ({config.n_voco} voco token)")
    full = per_token * config.n_patches
    print(f"uncompressed      {_human(full)} fp16 for {config.n_patches} image tokens")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Compress a few generated images with a freshly initialised tiny model and answer one question each."""
    from htcvlm.data.dataset import ProceduralVQA
    from htcvlm.data.questions import answer_vocabulary, question_templates
    from htcvlm.decode import GenerationOptions, decode
    from htcvlm.model import new_model
    from htcvlm.tokenizer import train_tokenizer

    torch.manual_seed(args.seed)
    corpus = [t for ts in question_templates().values() for t in ts] + list(answer_vocabulary())
    tokenizer = train_tokenizer(corpus, vocab_size=512)
    model = new_model(HTCConfig.from_name("tiny"), tokenizer).eval()
    print(
        "NOTE: this tiny model is UNTRAINED (random weights): its answers are noise. The trained\n"
        "default model ships with the training issue; this run shows the pipeline: compress each\n"
        "image once, then answer from the cached token.\n"
    )
    samples = [ProceduralVQA("test", args.images, image_size=64)[i] for i in range(args.images)]
    blobs = []
    for sample in samples:
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    records = model.compress(blobs, source_uris=[f"procedural://test/{i}" for i in range(len(blobs))])
    answers = decode(model, records, [s.question for s in samples], GenerationOptions(max_new_tokens=8))
    full_kv = records[0].kv_nbytes // model.config.n_voco * model.config.n_visual
    for sample, blob, record, answer in zip(samples, blobs, records, answers, strict=True):
        print(f"image {record.image_id[:16]}…  ({len(blob)} B PNG)")
        print(f"  Q: {sample.question}")
        print(f"  A: {answer.text!r}   (expected {sample.answer!r}; {len(answer.token_ids)} tokens)")
        print(
            f"  cached: {record.kv_nbytes + record.latent.numel() * 4} B "
            f"(voco K/V {record.kv_nbytes} B fp32 + latent), against {full_kv} B for all "
            f"{model.config.n_visual} visual tokens' K/V"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onetoken", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("ONETOKEN_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress generated images with the tiny model and ask about them")
    demo.add_argument("--images", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="geometry, parameters and bytes cached per image of a preset")
    info.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=fmt)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders only
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
