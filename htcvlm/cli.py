"""Model-core commands (info, convert, train, eval, retrieval, analyze) and the pieces of the command-line
shell they share with the service commands. `llm_worker.cli.main` is the one entry point (`onetoken`); this
module has none, since the model core cannot import the service.

ONETOKEN_* variables are read through `env` (here and in llm_worker.cli), and only by the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

from htcvlm.config import PRESETS, FusionMode, HTCConfig
from htcvlm.train.recipe import RECIPES, TrainConfig, Variant

logger = logging.getLogger(__name__)


def env(name: str, default: str = "") -> str:
    """The value of ONETOKEN_<name> ("" when unset and no default): the one way the CLI reads its
    environment."""
    return os.environ.get(f"ONETOKEN_{name}", default)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_info(args: argparse.Namespace) -> int:
    """Geometry, parameter count, storage and bytes cached per image: of a checkpoint (read from its config
    and the safetensors headers; loaded as `serve` loads it only when its fingerprint is not stamped beside
    the weights), or of a preset's geometry built on the meta device (no weights)."""
    if args.preset is not None:
        config, params = _preset_geometry(args.preset)
        print(f"preset            {config.name} (geometry only, no weights)")
        n_shared, voco_position = 0, config.n_visual  # a preset's layout: the voco right after V_hy
    else:
        from htcvlm.checkpoint import describe, load_pretrained
        from htcvlm.defaults import DEFAULT_MODEL_DIR

        folder = args.model or str(DEFAULT_MODEL_DIR)
        summary = describe(folder)
        config, params = summary.model.config, summary.n_params
        fingerprint = summary.fingerprint or load_pretrained(folder).fingerprint()
        layout = summary.model.layout
        n_shared, voco_position = layout.n_shared, layout.voco_position
        print(f"model             {folder}")
        print(f"fingerprint       {fingerprint[:16]} (preset {config.name})")
        dtypes = ", ".join(f"{d} {n / 1e6:,.1f} M values" for d, n in sorted(summary.dtypes.items()))
        shards = "1 file" if summary.n_shards == 1 else f"{summary.n_shards} shards"
        print(f"weights           {dtypes}; {_human(summary.weights_bytes)} in {shards}")
        for i, (part, source) in enumerate(summary.provenance.items()):
            print(f"{'provenance' if i == 0 else '':<18}{part}: {source}")
    kv_values = config.kv_values_per_image  # every voco token's K/V state, all layers
    head_dim = config.llm.head_dim
    print(f"image             {config.image_size} px, {config.n_patches} patches, q in R^{config.q_dim}")
    print(f"V_hy              {config.n_visual} tokens ({config.channels}, fusion {config.fusion})")
    print(
        f"layout            shared prefix {n_shared} tokens, voco at position {voco_position}, "
        f"text from {voco_position + config.n_voco}"
    )
    print(f"parameters        {params / 1e6:,.1f} M ({config.llm.vocab_size}-token vocabulary)")
    # int8: one byte a value and an fp32 scale per head_dim row (cache/serde.py's quantize_int8)
    int8 = kv_values + 4 * kv_values // head_dim
    print(
        f"cached per image  {_human(2 * kv_values)} fp16, {_human(int8)} int8 K/V "
        f"({config.n_voco} voco token) + a {_human(4 * config.llm.hidden_size)} fp32 latent"
    )
    full = 2 * kv_values // config.n_voco * config.n_patches
    print(f"uncompressed      {_human(full)} fp16 for {config.n_patches} image tokens")
    return 0


DTYPE_NAMES = ("bf16", "fp16", "fp32")  # convert's --dtype: formats.convert.DTYPES, named without torch
EXIT_USAGE = 2  # a source that is not what the command was told it is: bad usage, as argparse's


def cmd_convert(args: argparse.Namespace) -> int:
    """A published checkpoint (LLaVA-1.5, VoCo-LLaMA) -> a OneToken checkpoint folder; prints which parts
    are pretrained and which are not. A source that is missing or of another format exits with 2."""
    from htcvlm.checkpoint import save_pretrained
    from htcvlm.errors import CheckpointError
    from htcvlm.formats.convert import convert_llava, convert_voco_llama, summary

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists and is not an empty folder: give a new one", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.format == "llava":
            converted = convert_llava(
                args.src, args.clip, args.mgvq, args.dtype, pd_hidden=args.pd_hidden, seed=args.seed
            )
        else:
            converted = convert_voco_llama(args.src, args.clip, args.dtype)
    except CheckpointError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, torch's messages too
        return EXIT_USAGE
    save_pretrained(converted.model, out)
    print(summary(converted, out))
    return 0


def _preset_geometry(name: str) -> tuple[HTCConfig, int]:
    """A preset's config and parameter count, the model built on the meta device (even the 7B paper
    geometry allocates nothing)."""
    import torch  # only the model commands pay for it

    from htcvlm.model import new_model
    from htcvlm.tokenizer import train_tokenizer

    config = HTCConfig.from_name(name)
    tokenizer = train_tokenizer([], vocab_size=259)
    with torch.device("meta"):
        model = new_model(config, tokenizer)
    # The tokenizer here is a stand-in; count embedding and output rows at the preset's own vocabulary.
    missing_rows = config.llm.vocab_size - len(tokenizer)
    params = sum(p.numel() for p in model.parameters()) + 2 * missing_rows * config.llm.hidden_size
    return config, params


def cmd_train(args: argparse.Namespace) -> int:
    """Train one variant end to end (tokenizer, stages 1, 0 and 2) into a checkpoint folder: the named
    recipe with the fields given as flags changed."""
    import torch  # only the model commands pay for it

    from htcvlm.train.run import run_training

    # with --workers, --threads is each worker's: stages 1 and 0 run here before any starts, on every core
    torch.set_num_threads((os.cpu_count() or 1) if args.workers else args.threads)
    given = {f.name: v for f in fields(TrainConfig) if (v := getattr(args, f.name, None)) is not None}
    model_overrides = {
        k: v for k in ("n_discrete", "fusion", "image_marker") if (v := getattr(args, k)) is not None
    }
    if args.workers:
        return _train_distributed(args, TrainConfig.from_name(args.recipe, **given), model_overrides)
    if given.get("lora_rank"):
        logger.error("--lora-rank trains on the Ray Train path only: add --workers N (1 is fine)")
        return 2
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


def _train_distributed(args: argparse.Namespace, cfg: TrainConfig, model_overrides: dict[str, Any]) -> int:
    """`train --workers N`: stage 2 on Ray Train (htcvlm/train/distributed.py), on the Ray cluster at
    --ray-address or a local one started here (and stopped at the end)."""
    import ray

    from htcvlm.train.distributed import Scaling, run_distributed

    scaling = Scaling(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        data_cpus=args.data_cpus,
        micro_batch=args.micro_batch_size,
        threads=args.threads,
        activation_checkpointing=cfg.grad_checkpointing,
        fsdp=args.fsdp,
        feature_cache=args.feature_cache,
    )
    started = not ray.is_initialized()
    if started:
        # a local cluster holds the workers and their data stages as logical CPUs whatever the cores
        needed = math.ceil(args.workers * (args.cpus_per_worker + args.data_cpus))
        local = {} if args.ray_address else {"num_cpus": max(os.cpu_count() or 1, needed)}
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False, **local)
    try:
        metrics = run_distributed(
            Path(args.out),
            scaling,
            variant=args.variant,
            preset=args.preset,
            cfg=cfg,
            mgvq_from=Path(args.mgvq_from) if args.mgvq_from else None,
            llava=(Path(args.llava), Path(args.image_root)) if args.llava else None,
            init_from=Path(args.init_from) if args.init_from else None,
            **model_overrides,
        )
    finally:
        if started:
            ray.shutdown()
    print(f"checkpoint written to {args.out}: {metrics}")
    return 0


def _int_at_least(text: str, bound: int) -> int:
    value = int(text)
    if value < bound:
        raise argparse.ArgumentTypeError(f"must be at least {bound}, got {value}")
    return value


def _positive(text: str) -> int:  # argparse names the type by its function in "invalid _positive value"
    return _int_at_least(text, 1)


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


def _model_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if name == "lower":
        raise argparse.ArgumentTypeError("'lower' is not passed: it is the 'upper' model under compression")
    return name, path


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy and retention per question type for the trained variants, as markdown and JSON."""
    import torch  # only the model commands pay for it

    from htcvlm.evaluate import run_eval

    torch.set_num_threads(args.threads)
    models = dict(args.models)
    markdown, _ = run_eval(models, test_size=args.test_size, out=Path(args.out) if args.out else None)
    print(markdown)
    return 0


def cmd_eval_multi(args: argparse.Namespace) -> int:
    """Multi-image accuracy per k and kind on test-split scenes, through compress() and decode()."""
    import torch  # only the model commands pay for it

    from htcvlm.checkpoint import load_pretrained
    from htcvlm.defaults import DEFAULT_MODEL_DIR
    from htcvlm.evaluate import MAX_ANSWER_TOKENS, multi_image_accuracy, multi_image_set, multi_image_table
    from htcvlm.train.multi import fits_uncompressed

    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model or DEFAULT_MODEL_DIR)
    pool, questions = multi_image_set(model, args.ks, args.per_kind)
    if args.upper:  # only the questions whose images, uncompressed, the context holds
        longest = max(len(model.prompt_ids(q.text)) for q in questions) + MAX_ANSWER_TOKENS
        questions = [q for q in questions if fits_uncompressed(model, len(q.images), longest)]
        if not questions:
            raise SystemExit(f"no k of {args.ks} fits the context uncompressed")
    result = multi_image_accuracy(model, pool, questions, upper=args.upper)
    print(multi_image_table(result, args.ks))
    print(f"all: {100 * result['all']:.1f} % of {len(questions)} questions (chance in brackets)")
    if args.out:
        model_dir = str(args.model or DEFAULT_MODEL_DIR)
        figures = {
            "model": model_dir,
            "upper": args.upper,
            "ks": args.ks,
            "per_kind": args.per_kind,
            "accuracy": result,
        }
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The voco token's attention over the anchors and the first patch tokens, as a PNG heatmap."""
    import torch  # only the model commands pay for it

    from htcvlm.analysis import heatmap, voco_attention
    from htcvlm.checkpoint import load_pretrained
    from htcvlm.data.dataset import ProceduralVQA
    from htcvlm.images import to_pixels

    model = load_pretrained(args.model)
    data = ProceduralVQA("test", args.images, image_size=model.config.image_size)
    size, processing = model.config.image_size, model.config.preprocess
    pixels = torch.stack([to_pixels(data[i].image, size, processing) for i in range(args.images)])
    weights = voco_attention(model, pixels)
    heatmap(weights, model.config.n_discrete).save(args.out)
    share = weights[:, : model.config.n_discrete].sum(dim=1).mean().item()
    print(f"heatmap written to {args.out}; anchors hold {share:.1%} of the shown attention on average")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    """Near-duplicate recall@1/@10 over voco latents: procedural test scenes (unless --procedural 0) and
    scikit-image's photos."""
    import torch  # only the model commands pay for it

    from htcvlm.checkpoint import load_pretrained
    from htcvlm.data.dataset import ProceduralVQA
    from htcvlm.retrieval import format_recall, near_duplicate_recall, skimage_photos

    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model)
    sets = {}
    if args.procedural:
        scenes = ProceduralVQA("test", args.procedural, image_size=model.config.image_size)
        sets[f"procedural test scenes ({args.procedural})"] = [scenes[i].image for i in range(len(scenes))]
    sets["scikit-image photos (25)"] = skimage_photos()
    for name, images in sets.items():
        print(format_recall(name, near_duplicate_recall(model, images, seed=args.seed)))
    return 0


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each option's default after its help, unless it has none to show
    (None, False, "": its help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


def add_log_level(parser: argparse.ArgumentParser, log_level: str, top_level: bool = True) -> None:
    """--log-level: on the top level with its default; on a subcommand (`top_level=False`) with none, so
    that the top level's value stands unless the subcommand is given one too."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=log_level if top_level else argparse.SUPPRESS,
        help="log level [$ONETOKEN_LOG_LEVEL]" + ("" if top_level else f" (default: {log_level})"),
    )


def common_options(log_level: str) -> argparse.ArgumentParser:
    """Options every subcommand takes after its name too (`onetoken CMD --log-level DEBUG`)."""
    common = argparse.ArgumentParser(add_help=False)
    add_log_level(common, log_level, top_level=False)
    return common


def add_command(
    sub: argparse._SubParsersAction, name: str, about: str, common: argparse.ArgumentParser, **kwargs: str
) -> argparse.ArgumentParser:
    """A subcommand that takes `common`'s options and whose help shows each option's default."""
    return sub.add_parser(
        name, help=about, description=about, formatter_class=HelpFormatter, parents=[common], **kwargs
    )


def add_model_commands(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, model: str | None = None
) -> None:
    """The model-core subcommands (info, convert, train, eval, retrieval, analyze), shared with the service
    CLI; each takes the options of `common` too. `model`: the folder `serve` loads by default, which `info`
    describes by default (None: ONETOKEN_MODEL, else the shipped model, resolved when run)."""

    threads = int(env("THREADS", "2"))
    threads_help = "torch threads [$ONETOKEN_THREADS]"

    info = add_command(
        sub, "info", "geometry, parameters and bytes cached per image of the model serve loads", common
    )
    which = info.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default=model or env("MODEL") or None,
        help="checkpoint folder, loaded as serve loads it; the default is serve's [$ONETOKEN_MODEL]"
        + ("" if model else " (default: the shipped model, htcvlm/models/tiny)"),
    )
    which.add_argument(
        "--preset", choices=sorted(PRESETS), help="a preset's geometry instead, with no weights (e.g. paper)"
    )
    info.set_defaults(func=cmd_info)

    _add_convert(sub, common)

    train = add_command(sub, "train", "train a variant on the procedural VQA set (resumable)", common)
    train.add_argument("--out", required=True, help="checkpoint folder; rerun with it to resume")
    train.add_argument(
        "--variant",
        choices=get_args(Variant),
        default="hybrid",
        help="the compressed token's channels, or upper: hybrid inputs, uncompressed",
    )
    train.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model geometry")
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
    train.add_argument(
        "--fusion",
        choices=get_args(FusionMode),
        help="how the anchors join the patches (default: the preset's)",
    )
    train.add_argument(
        "--image-marker",
        help="text after each image's voco tokens in a question about several images, {i} its number "
        "from 1, e.g. ' (image {i})' (default: none)",
    )
    train.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    _add_distributed_flags(train)
    train.add_argument(
        "--threads", type=int, default=threads, help=threads_help + " (with --workers: in each worker)"
    )
    train.set_defaults(func=cmd_train)

    evaluate = add_command(sub, "eval", "accuracy and retention table of trained variants", common)
    evaluate.add_argument(
        "models",
        nargs="+",
        type=_model_spec,
        help="NAME=DIR, e.g. upper=runs/upper hybrid=runs/hybrid; 'upper' adds the bounds and retention",
    )
    evaluate.add_argument("--test-size", type=int, default=1000, help="procedural test questions")
    evaluate.add_argument("--out", help="folder for eval.md and eval.json (default: print only)")
    evaluate.add_argument("--threads", type=int, default=threads, help=threads_help)
    evaluate.set_defaults(func=cmd_eval)

    multi = add_command(
        sub, "eval-multi", "accuracy of questions over several cached images, by k and kind", common
    )
    multi.add_argument("--model", help="checkpoint folder (default: the shipped model)")
    multi.add_argument("--ks", type=_positive, nargs="+", default=[2, 4, 8, 16], help="images a question")
    multi.add_argument("--per-kind", type=_positive, default=100, help="questions of each kind and k")
    multi.add_argument(
        "--upper",
        action="store_true",
        help="answer uncompressed, every image token in view (the upper bound; only the k it holds)",
    )
    multi.add_argument("--out", help="JSON file for the figures (default: print only)")
    multi.add_argument("--threads", type=int, default=threads, help=threads_help)
    multi.set_defaults(func=cmd_eval_multi)

    retrieval = add_command(sub, "retrieval", "near-duplicate recall@k of augmented copies", common)
    retrieval.add_argument("--model", required=True, help="checkpoint folder")
    retrieval.add_argument(
        "--procedural", type=_non_negative, default=500, help="procedural test scenes (0: the photos only)"
    )
    retrieval.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    retrieval.add_argument("--threads", type=int, default=threads, help=threads_help)
    retrieval.set_defaults(func=cmd_retrieval)

    analyze = add_command(sub, "analyze", "analyses of a trained model", common)
    analyze_sub = analyze.add_subparsers(dest="analysis", required=True)
    attention = add_command(analyze_sub, "attention", "voco attention heatmap (the paper's Figure 3)", common)
    attention.add_argument("--model", required=True, help="checkpoint folder")
    attention.add_argument("--images", type=int, default=16, help="procedural test scenes shown")
    attention.add_argument("--out", default="voco_attention.png", help="PNG file to write")
    attention.set_defaults(func=cmd_analyze)


def _add_convert(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    convert = add_command(
        sub,
        "convert",
        "write a OneToken checkpoint folder from a published LLaVA-1.5 or VoCo-LLaMA checkpoint",
        common,
        epilog="exit status: 0 written; 2 bad usage (a source missing or of another format, --out not empty)",
    )
    formats = convert.add_subparsers(dest="format", required=True)
    dtype_help = "dtype of the weights written (default: the LLM's published dtype)"
    llava = add_command(
        formats,
        "llava",
        "LLaVA-1.5 (liuhaotian/llava-v1.5-7b with --clip, or llava-hf/llava-1.5-7b-hf) -> an HTC-VLM whose "
        "CLIP, P_v and LLM are LLaVA's (hybrid with --mgvq); its voco bottleneck needs training",
        common,
    )
    llava.add_argument("src", help="the LLaVA folder (config.json, weights, tokenizer)")
    llava.add_argument(
        "--clip", help="the CLIP folder the original format needs (openai/clip-vit-large-patch14-336)"
    )
    llava.add_argument(
        "--mgvq", help="MGVQ tokenizer checkpoint (mgvq_f16c32_g8.pt): a hybrid model (default: continuous)"
    )
    llava.add_argument("--out", required=True, help="the new checkpoint folder (new or empty)")
    llava.add_argument("--dtype", choices=DTYPE_NAMES, help=dtype_help)
    llava.add_argument(
        "--pd-hidden", type=_positive, default=HTCConfig().pd_hidden, help="width of W1 in the new P_d"
    )
    llava.add_argument("--seed", type=int, default=0, help="seed of the new P_d's initialisation")
    llava.set_defaults(func=cmd_convert)
    voco = add_command(
        formats,
        "voco-llama",
        "a VoCo-LLaMA checkpoint (LLaVA's original layout with <voco> added) -> a continuous-only model "
        "with its two trained voco tokens, ready to serve",
        common,
    )
    voco.add_argument("src", help="the VoCo-LLaMA folder (config.json, .bin shards, tokenizer.model)")
    voco.add_argument("--clip", required=True, help="its CLIP folder (openai/clip-vit-large-patch14-336)")
    voco.add_argument("--out", required=True, help="the new checkpoint folder (new or empty)")
    voco.add_argument("--dtype", choices=DTYPE_NAMES, help=dtype_help)
    voco.set_defaults(func=cmd_convert)


def _add_distributed_flags(train: argparse.ArgumentParser) -> None:
    """Stage 2 on Ray Train: how many workers and what each holds (htcvlm/train/distributed.py)."""
    train.add_argument(
        "--workers",
        type=int,
        default=0,
        help="Ray Train workers for stage 2 (DDP, fed by Ray Data); 0: this process alone, as before",
    )
    train.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each (> 0: NCCL, bf16)")
    train.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs each worker reserves")
    train.add_argument("--data-cpus", type=float, default=1.0, help="Ray CPUs of each worker's data stage")
    train.add_argument(
        "--micro-batch-size",
        type=_positive,
        help="rows per forward in each worker; the global batch is micro-batch × workers × accumulation "
        "(default: --batch-size / --workers, no accumulation)",
    )
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the LLM's decoder layers, their gradients and AdamW state over the workers (FSDP2) "
        "instead of a whole copy on each (DDP): a full fine-tune larger than one GPU",
    )
    train.add_argument(
        "--feature-cache",
        metavar="DIR",
        help="compute the frozen MGVQ's and tower's outputs for every training image once, by a Ray Data "
        "pass, into DIR (reused by later runs with the same frozen weights and data), instead of on every "
        "micro-batch",
    )
    train.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")


def _add_recipe_flags(train: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field a user changes. None unless given, so the recipe (--recipe)
    supplies every value not passed; the help shows the tiny recipe's."""
    tiny = TrainConfig.from_name("tiny")

    def flag(name: str, text: str = "", *aliases: str, **kwargs: Any) -> None:
        shown = f"tiny: {getattr(tiny, name.removeprefix('--').replace('-', '_'))}"
        train.add_argument(
            name, *aliases, default=None, help=f"{text} ({shown})" if text else shown, **kwargs
        )

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
    flag("--multi-rows", "rows a stage-2 step of one question over several pool images", type=int)
    flag("--multi-images", "the most images of such a row (k uniform from 1)", type=_positive)
    flag("--multi-step-images", "pool images a step's multi-image rows share (0: any)", type=int)
    flag(
        "--multi-kinds",
        "kinds such a row asks, drawn uniformly from this list (list one twice to ask it twice as often)",
        nargs="+",
        choices=("count", "find", "compare"),
    )
    flag("--contrastive", "weight of InfoNCE over two augmented views' voco latents (search)", type=float)
    flag("--contrastive-images", "images a step for it, two views each", type=int)
    flag(
        "--max-text",
        "text tokens a training row keeps (--workers); longer rows are cut and counted",
        type=_positive,
    )
    flag("--warmup", type=int)
    flag("--val-size", "validation samples scored at each eval", type=int)
    flag("--eval-every", type=int)
    flag("--seed", type=int)
    flag(
        "--lora-rank",
        "LoRA adapters of this rank on the LLM in stage 2, merged when saved (--workers)",
        type=int,
    )
    flag("--bf16", "autocast to bfloat16 (GPU hosts)", action="store_true")
    flag(
        "--grad-checkpointing",
        "the LLM's activation checkpointing: trade compute for memory (GPU hosts)",
        "--activation-checkpointing",
        action="store_true",
    )
