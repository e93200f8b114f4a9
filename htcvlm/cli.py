"""Model-core commands (info, train, eval, retrieval, analyze), carried by the `onetoken` CLI
(`llm_worker.cli`) and runnable alone as `python -m htcvlm.cli` (for hosts without the service).

Flags and ONETOKEN_* environment variables are read here and in llm_worker.cli, nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from htcvlm.config import PRESETS, HTCConfig
from htcvlm.train.recipe import RECIPES, TrainConfig

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


def cmd_train(args: argparse.Namespace) -> int:
    """Train one variant end to end (tokenizer, stages 1, 0 and 2) into a checkpoint folder: the named
    recipe with the fields given as flags changed."""
    from htcvlm.train.run import run_training

    torch.set_num_threads(args.threads)
    given = {f.name: v for f in fields(TrainConfig) if (v := getattr(args, f.name, None)) is not None}
    model_overrides = {k: v for k in ("n_discrete", "fusion") if (v := getattr(args, k)) is not None}
    run_training(
        Path(args.out),
        variant=args.variant,
        preset=args.preset,
        cfg=TrainConfig.from_name(args.recipe, **given),
        mgvq_from=Path(args.mgvq_from) if args.mgvq_from else None,
        device=args.device,
        llava=(Path(args.llava), Path(args.image_root)) if args.llava else None,
        init_from=Path(args.init_from) if args.init_from else None,
        **model_overrides,
    )
    print(f"checkpoint written to {args.out}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if name == "lower":
        raise argparse.ArgumentTypeError("'lower' is not passed: it is the 'upper' model under compression")
    return name, path


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy and retention per question type for the trained variants, as markdown and JSON."""
    from htcvlm.evaluate import run_eval

    torch.set_num_threads(args.threads)
    models = dict(args.models)
    markdown, _ = run_eval(models, test_size=args.test_size, out=Path(args.out) if args.out else None)
    print(markdown)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The voco token's attention over the anchors and the first patch tokens, as a PNG heatmap."""
    from htcvlm.analysis import heatmap, voco_attention
    from htcvlm.checkpoint import load_pretrained
    from htcvlm.data.dataset import ProceduralVQA
    from htcvlm.images import to_pixels

    model = load_pretrained(args.model)
    data = ProceduralVQA("test", args.images, image_size=model.config.image_size)
    pixels = torch.stack([to_pixels(data[i].image, model.config.image_size) for i in range(args.images)])
    weights = voco_attention(model, pixels)
    heatmap(weights, model.config.n_discrete).save(args.out)
    share = weights[:, : model.config.n_discrete].sum(dim=1).mean().item()
    print(f"heatmap written to {args.out}; anchors hold {share:.1%} of the shown attention on average")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    """Near-duplicate recall@1/@10 over voco latents: procedural test scenes and scikit-image's photos."""
    from htcvlm.checkpoint import load_pretrained
    from htcvlm.data.dataset import ProceduralVQA
    from htcvlm.retrieval import format_recall, near_duplicate_recall, skimage_photos

    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model)
    scenes = ProceduralVQA("test", args.procedural, image_size=model.config.image_size)
    sets = {
        f"procedural test scenes ({args.procedural})": [scenes[i].image for i in range(args.procedural)],
        "scikit-image photos (26)": skimage_photos(),
    }
    for name, images in sets.items():
        print(format_recall(name, near_duplicate_recall(model, images, seed=args.seed)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onetoken", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("ONETOKEN_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    add_model_commands(sub)
    return parser


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """The model-core subcommands (info, train, eval, retrieval, analyze), shared with the service CLI."""
    info = sub.add_parser("info", help="geometry, parameters and bytes cached per image of a preset")
    info.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a variant on the procedural VQA set (resumable)")
    train.add_argument("--out", required=True, help="checkpoint folder; rerun with it to resume")
    train.add_argument("--variant", choices=("hybrid", "continuous", "discrete", "upper"), default="hybrid")
    train.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the model's geometry")
    train.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="tiny",
        help="named training recipe (htcvlm/train/recipe.py); the flags below change single fields of it",
    )
    _add_recipe_flags(train)
    train.add_argument("--mgvq-from", help="copy stage-1 MGVQ weights from this checkpoint instead")
    train.add_argument("--init-from", help="start stage 2 from this checkpoint's matching weights")
    train.add_argument("--llava", help="LLaVA-format JSON to train on instead of the procedural set")
    train.add_argument("--image-root", default=".", help="folder the LLaVA JSON's image paths are under")
    train.add_argument(
        "--n-discrete", type=int, help="N_d, the model's discrete anchors (default: the preset's)"
    )
    train.add_argument("--fusion", choices=("pre", "post", "mean"), help="default: the preset's")
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=int(os.environ.get("ONETOKEN_THREADS", "2")))
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="accuracy and retention table of trained variants")
    evaluate.add_argument(
        "models",
        nargs="+",
        type=_model_spec,
        help="NAME=DIR, e.g. upper=runs/upper hybrid=runs/hybrid; 'upper' adds the bounds and retention",
    )
    evaluate.add_argument("--test-size", type=int, default=1000)
    evaluate.add_argument("--out", help="folder for eval.md and eval.json")
    evaluate.add_argument("--threads", type=int, default=int(os.environ.get("ONETOKEN_THREADS", "2")))
    evaluate.set_defaults(func=cmd_eval)

    retrieval = sub.add_parser("retrieval", help="near-duplicate recall@k of augmented copies")
    retrieval.add_argument("--model", required=True)
    retrieval.add_argument("--procedural", type=int, default=500, help="procedural test scenes")
    retrieval.add_argument("--seed", type=int, default=0)
    retrieval.add_argument("--threads", type=int, default=int(os.environ.get("ONETOKEN_THREADS", "2")))
    retrieval.set_defaults(func=cmd_retrieval)

    analyze = sub.add_parser("analyze", help="analyses of a trained model")
    analyze_sub = analyze.add_subparsers(dest="analysis", required=True)
    attention = analyze_sub.add_parser("attention", help="voco attention heatmap (the paper's Figure 3)")
    attention.add_argument("--model", required=True)
    attention.add_argument("--images", type=int, default=16)
    attention.add_argument("--out", default="voco_attention.png")
    attention.set_defaults(func=cmd_analyze)


def _add_recipe_flags(train: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field a user changes. None unless given, so the recipe (--recipe)
    supplies every value not passed; the help shows the tiny recipe's."""
    tiny = TrainConfig.from_name("tiny")

    def flag(name: str, text: str = "", **kwargs: Any) -> None:
        shown = f"tiny: {getattr(tiny, name.removeprefix('--').replace('-', '_'))}"
        train.add_argument(name, default=None, help=f"{text} ({shown})" if text else shown, **kwargs)

    flag("--steps", "stage-2 steps (0: stop after stages 1 and 0, a start for --init-from)", type=int)
    flag("--batch-size", type=int)
    flag("--lr", "stage 2's peak learning rate", type=float)
    flag("--vision-steps", "stage 0: vision tower on scene labels", type=int)
    flag(
        "--freeze-vision",
        "stage 2 keeps the tower stage 0 trained, its features computed once (LLaVA keeps CLIP frozen)",
        action=argparse.BooleanOptionalAction,
    )
    flag("--mgvq-steps", "stage 1: MGVQ on reconstruction", type=int)
    flag("--pool", "pre-rendered training samples", type=int)
    flag("--easy", "extra single-object samples (curriculum)", type=int)
    flag("--easy-steps", "first steps on single-object samples", type=int)
    flag("--questions", "questions per procedural training image, packed into one pass", type=_positive)
    flag("--warmup", type=int)
    flag("--val-size", "validation samples scored at each eval", type=int)
    flag("--eval-every", type=int)
    flag("--seed", type=int)
    flag("--bf16", "autocast to bfloat16 (GPU hosts)", action="store_true")
    flag("--grad-checkpointing", "trade compute for memory (GPU hosts)", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=fmt)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders only
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
