"""`onetoken` command line: serve | ingest | encode | ask | search | demo, plus the model-core commands.

Configuration comes from flags, whose defaults come from ONETOKEN_* environment variables (read here and
nowhere else): ONETOKEN_MODEL, ONETOKEN_STORE, ONETOKEN_INDEX_DIR, ONETOKEN_INDEX_SPEC, ONETOKEN_KV_DTYPE,
ONETOKEN_ENCODER_BACKEND, ONETOKEN_ENCODERS, ONETOKEN_RAY_ADDRESS, ONETOKEN_HOST, ONETOKEN_PORT,
ONETOKEN_ADDRESS (for the client commands), ONETOKEN_LOG_LEVEL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from pathlib import Path

from cache.store import DEFAULT_STORE_URL
from htcvlm.checkpoint import DEFAULT_MODEL_DIR
from htcvlm.cli import add_model_commands
from llm_worker.config import DEFAULT_INDEX_DIR, WorkerConfig

logger = logging.getLogger(__name__)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"ONETOKEN_{name}", default)


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    from encoder_service.config import EncoderConfig

    encoder = EncoderConfig(
        model_dir=args.model,
        store_url=args.store,
        kv_dtype=args.kv_dtype,
        backend=args.encoder_backend,
        num_actors=args.encoders,
        ray_address=args.ray_address or None,
    )
    return WorkerConfig(
        encoder=encoder,
        host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", 0),
        index_dir=args.index_dir,
        index_spec=args.index_spec,
    )


def add_service_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_env("MODEL", str(DEFAULT_MODEL_DIR)), help="checkpoint folder")
    p.add_argument("--store", default=_env("STORE", DEFAULT_STORE_URL), help="path, lmdb://, redis://")
    p.add_argument("--index-dir", default=_env("INDEX_DIR", DEFAULT_INDEX_DIR))
    p.add_argument("--index-spec", default=_env("INDEX_SPEC", "Flat"), help="faiss factory string")
    p.add_argument("--kv-dtype", choices=("fp32", "fp16", "bf16", "int8"), default=_env("KV_DTYPE", "fp16"))
    p.add_argument("--encoder-backend", choices=("ray", "local"), default=_env("ENCODER_BACKEND", "ray"))
    p.add_argument("--encoders", type=int, default=int(_env("ENCODERS", "1")), help="encoder actors")
    p.add_argument("--ray-address", default=_env("RAY_ADDRESS", ""), help="join this Ray cluster")


def cmd_serve(args: argparse.Namespace) -> int:
    from llm_worker.server import serve

    asyncio.run(serve(worker_config(args)))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from encoder_service.ingest import ingest

    config = worker_config(args)
    summary = ingest(
        args.inputs,
        config.encoder,
        index_dir=config.index_dir,
        index_spec=config.index_spec,
        batch_size=args.batch_size,
        report_path=args.report,
    )
    print(
        f"encoded {summary.encoded}, already cached {summary.cached}, failed {summary.failed} "
        f"in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s)"
    )
    if summary.failed and summary.report_path:
        print(f"failures and their reasons: {summary.report_path}")
    return 0


def _client(args: argparse.Namespace):
    from llm_worker.client import OneTokenClient

    return OneTokenClient(args.address)


def cmd_encode(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for path in args.images:
            reply = client.encode(Path(path).read_bytes(), source_uri=str(Path(path).resolve()))
            print(f"{reply.image_id}  {'cached ' if reply.cached else 'encoded'}  {path}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    image = Path(args.image).read_bytes() if args.image else None
    kwargs = {"image_id": args.image_id, "image": image, "max_new_tokens": args.max_new_tokens}
    with _client(args) as client:
        if args.stream:
            for message in client.ask_stream(args.question, **kwargs):
                print(message.text, end="", flush=True)
            print()
        else:
            reply = client.ask(args.question, **kwargs)
            print(reply.answer)
            t = reply.timings
            logger.info(
                "%s tokens, %.1f ms (%.1f decoding)", reply.usage.completion_tokens, t.total_ms, t.decode_ms
            )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    image = Path(args.image).read_bytes() if args.image else None
    with _client(args) as client:
        for hit in client.search(args.k, image_id=args.image_id, image=image).hits:
            print(f"{hit.score:7.4f}  {hit.image_id}  {hit.source_uri}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from llm_worker.demo import run_demo

    return run_demo(worker_config(args), Path(args.workdir), images=args.images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onetoken", description=__doc__)
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server (EncodeImage, Ask, AskStream, Search, ...)")
    add_service_options(serve)
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="0.0.0.0 to serve other hosts")
    serve.add_argument("--port", type=int, default=int(_env("PORT", "50051")))
    serve.set_defaults(func=cmd_serve)

    ingest = sub.add_parser("ingest", help="encode a corpus (folders, globs, a .txt of paths) on Ray Data")
    add_service_options(ingest)
    ingest.add_argument("inputs", nargs="+")
    ingest.add_argument("--batch-size", type=int, default=32)
    ingest.add_argument("--report", default="ingest-report.jsonl", help="where failed files are listed")
    ingest.set_defaults(func=cmd_ingest)

    address = _env("ADDRESS", "127.0.0.1:50051")
    encode = sub.add_parser("encode", help="encode image files through a running server")
    encode.add_argument("images", nargs="+")
    encode.add_argument("--address", default=address)
    encode.set_defaults(func=cmd_encode)

    ask = sub.add_parser("ask", help="ask a question about an image through a running server")
    ask.add_argument("question")
    which = ask.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", help="an image file (encoded first if needed)")
    which.add_argument("--image-id", help="the SHA-256 of an encoded image")
    ask.add_argument("--max-new-tokens", type=int, default=0)
    ask.add_argument("--stream", action="store_true")
    ask.add_argument("--address", default=address)
    ask.set_defaults(func=cmd_ask)

    search = sub.add_parser("search", help="the most similar encoded images, through a running server")
    which = search.add_mutually_exclusive_group(required=True)
    which.add_argument("--image")
    which.add_argument("--image-id")
    search.add_argument("-k", type=int, default=5)
    search.add_argument("--address", default=address)
    search.set_defaults(func=cmd_search)

    demo = sub.add_parser("demo", help="the main job: serve, ingest a sample corpus, ask, search")
    add_service_options(demo)
    demo.add_argument("--workdir", default=".onetoken/demo", help="corpus, store and index of the demo")
    demo.add_argument("--images", type=int, default=24, help="procedural scenes in the sample corpus")
    demo.set_defaults(func=cmd_demo)

    add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders only
    # transformers 5.2x renames past_key_values; the supported range spans both names (see pyproject)
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
    import grpc

    try:
        return args.func(args)
    except grpc.RpcError as e:  # the client commands: the server's code and message, no traceback
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except OSError as e:  # an image file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
