"""`onetoken` command line: serve | ingest | encode | ask | search | demo, plus the model-core commands.

Configuration comes from flags, whose defaults come from ONETOKEN_* environment variables (read here and
nowhere else): ONETOKEN_MODEL, ONETOKEN_STORE, ONETOKEN_INDEX_DIR, ONETOKEN_INDEX_SPEC,
ONETOKEN_INDEX_RERANK, ONETOKEN_KV_DTYPE,
ONETOKEN_ENCODER_BACKEND, ONETOKEN_ENCODERS, ONETOKEN_GPUS_PER_ENCODER, ONETOKEN_RAY_ADDRESS, ONETOKEN_HOST,
ONETOKEN_PORT, ONETOKEN_METRICS_PORT, ONETOKEN_LOG_FORMAT, ONETOKEN_ADDRESS (for the client commands),
ONETOKEN_LOG_LEVEL.

Exit status: 0 done; 1 error (nothing done, or a run stopped: the message says why, and how to resume);
2 bad usage; 3 done, but some files failed (ingest and encode: each named with its reason).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import get_args

from cache.dtypes import KV_DTYPES
from cache.factory import DEFAULT_STORE_URL
from encoder_service.config import Backend
from htcvlm.cli import HelpFormatter, add_command, add_log_level, add_model_commands, common_options, env
from htcvlm.defaults import DEFAULT_MODEL_DIR
from llm_worker.config import DEFAULT_INDEX_DIR, LogFormat, WorkerConfig
from llm_worker.security import Role

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 2  # as argparse: the command line names no valid request
EXIT_SOME_FAILED = 3  # the command finished, but some of the files it was given failed
DEFAULT_REPORT_DIR = ".onetoken/reports"


def version() -> str:
    """The installed distribution's version."""
    try:
        return importlib.metadata.version("onetoken")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    from cache.factory import StoreConfig
    from encoder_service.config import EncoderConfig

    encoder = EncoderConfig(
        model_dir=args.model,
        kv_dtype=args.kv_dtype,
        backend=args.encoder_backend,
        num_actors=args.encoders,
        num_gpus_per_actor=args.gpus_per_encoder,
        ray_address=args.ray_address or None,
    )
    return WorkerConfig(
        store=StoreConfig(url=args.store),
        encoder=encoder,
        host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", 0),
        metrics_port=getattr(args, "metrics_port", None),
        log_format=getattr(args, "log_format", "plain"),
        index_dir=args.index_dir,
        index_spec=args.index_spec,
        index_rerank=args.index_rerank,
        **security_options(args),
    )


def security_options(args: argparse.Namespace) -> dict[str, object]:
    """serve's TLS and token settings (absent for the other service commands, which bind nothing)."""
    from llm_worker.security import TokenTable

    if not hasattr(args, "tls_cert"):
        return {}
    return {
        "tls_cert": args.tls_cert or None,
        "tls_key": args.tls_key or None,
        "tls_client_ca": args.tls_client_ca or None,
        "tokens": TokenTable.load(args.tokens_file or None, env("TOKENS") or None),
        "insecure": args.insecure,
    }


def default_model() -> str:
    """The model serve loads unless told: ONETOKEN_MODEL, else the shipped one (`info` describes it too)."""
    return env("MODEL", str(DEFAULT_MODEL_DIR))


def add_service_options(p: argparse.ArgumentParser, in_workdir: bool = False) -> None:
    """Model, store, index and encoders. `in_workdir`: the store and index default to the command's
    --workdir unless named by a flag or ONETOKEN_STORE / ONETOKEN_INDEX_DIR."""
    p.add_argument("--model", default=default_model(), help="checkpoint folder [$ONETOKEN_MODEL]")
    store_help = "record store: a path or lmdb://, redis://, rediss://"
    if in_workdir:
        store, index_dir = env("STORE") or None, env("INDEX_DIR") or None
        store_help += " (default: $ONETOKEN_STORE, else WORKDIR/records)"
        index_help = "FAISS index folder (default: $ONETOKEN_INDEX_DIR, else WORKDIR/index)"
    else:
        store, index_dir = env("STORE", DEFAULT_STORE_URL), env("INDEX_DIR", DEFAULT_INDEX_DIR)
        store_help += " [$ONETOKEN_STORE]"
        index_help = "FAISS index folder [$ONETOKEN_INDEX_DIR]"
    p.add_argument("--store", default=store, help=store_help)
    p.add_argument("--index-dir", default=index_dir, help=index_help)
    p.add_argument(
        "--index-spec",
        default=env("INDEX_SPEC", "Flat"),
        help="FAISS factory string, e.g. IVF4096,Flat for large collections [$ONETOKEN_INDEX_SPEC]",
    )
    rerank = env("INDEX_RERANK")
    p.add_argument(
        "--index-rerank",
        type=int,
        default=int(rerank) if rerank else None,
        metavar="R",
        help="Search re-ranks k x R index candidates by exact cosine with their stored latents; 0 = off "
        "(default: 50 for lossy specs such as IVF4096,PQ64, else 0) [$ONETOKEN_INDEX_RERANK]",
    )
    p.add_argument(
        "--kv-dtype",
        choices=KV_DTYPES,
        default=env("KV_DTYPE", "fp16"),
        help="how stored K/V state is kept [$ONETOKEN_KV_DTYPE]",
    )
    p.add_argument(
        "--encoder-backend",
        choices=get_args(Backend),
        default=env("ENCODER_BACKEND", "ray"),
        help="serve's encoders: Ray actors, or one in-process encoder [$ONETOKEN_ENCODER_BACKEND]",
    )
    p.add_argument(
        "--encoders",
        type=int,
        default=int(env("ENCODERS", "1")),
        help="encoder actors; 0: one per GPU of the Ray cluster [$ONETOKEN_ENCODERS]",
    )
    gpu_share = env("GPUS_PER_ENCODER")
    p.add_argument(
        "--gpus-per-encoder",
        type=float,
        default=float(gpu_share) if gpu_share else None,
        help="share of a GPU each encoder actor reserves, e.g. 0.5 to leave half of each to an ingest "
        "job beside the worker (default: 1 where the cluster has GPUs) [$ONETOKEN_GPUS_PER_ENCODER]",
    )
    p.add_argument(
        "--ray-address",
        default=env("RAY_ADDRESS", ""),
        help="join the Ray cluster at this address (default: a local Ray) [$ONETOKEN_RAY_ADDRESS]",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from llm_worker.server import serve

    try:
        config = worker_config(args)
    except (ValueError, OSError) as e:  # a setting that cannot work: say why before loading anything
        print(f"error: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    from llm_worker.security import new_token

    token, line = new_token(args.role)
    print(f"token: {token}")
    print("give it to the client (--token or ONETOKEN_TOKEN); add this line to the server's tokens file")
    print("(--tokens-file) or ONETOKEN_TOKENS; the server keeps only the digest:")
    print(line)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import ray

    from cache.errors import CacheError
    from encoder_service.errors import EncoderError
    from encoder_service.ingest import default_report_path, ingest, new_run_id

    config = worker_config(args)
    run_id = new_run_id()
    try:
        summary = ingest(
            args.inputs,
            config.encoder,
            config.store,
            index_dir=config.index_dir,
            index_spec=config.index_spec,
            batch_size=args.batch_size,
            report_path=args.report or default_report_path(DEFAULT_REPORT_DIR, run_id),
            run_id=run_id,
        )
    except (CacheError, EncoderError, ray.exceptions.RayError) as e:
        # the run stopped part way (the store, an encoder or the cluster failed): why, and how to go on
        logger.debug("ingest stopped", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        print(f"resume with: {args.command_line}  (stored images are not encoded again)", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"encoded {summary.encoded}, already cached {summary.cached}, failed {summary.failed} "
        f"in {summary.seconds:.1f} s ({summary.images_per_s:.1f} images/s)"
    )
    if summary.report_path:
        print(f"failures and their reasons: {summary.report_path} (run {summary.run_id})")
    return EXIT_SOME_FAILED if summary.failed else 0


def _one_line(error: Exception) -> str:
    """The error's type and first line; a Ray task's error by the exception it carries, whose first line
    is its message rather than the task's name."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError):
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _client(args: argparse.Namespace):
    from llm_worker.client import OneTokenClient

    return OneTokenClient(
        args.address,
        tls_ca=args.tls_ca or None,
        cert=args.tls_cert or None,
        key=args.tls_key or None,
        token=args.token or None,
    )


def read_image_file(name: str) -> bytes:
    """The bytes of an image file named on the command line; OSError or ValueError saying why not."""
    path = Path(name)
    if path.is_dir():
        raise IsADirectoryError(f"a folder: `onetoken ingest {name}` encodes the images in one")
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file (0 bytes)")
    return data


def cmd_encode(args: argparse.Namespace) -> int:
    """Each file's id, or its error naming it; a file the server refuses does not stop the others."""
    import grpc

    failed = 0
    with _client(args) as client:
        for name in args.images:
            try:
                reply = client.encode(read_image_file(name), source_uri=str(Path(name).resolve()))
            except (OSError, ValueError) as e:
                failed += 1
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                print(f"error: {name}: {reason}", file=sys.stderr)
                continue
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise  # the server or the connection, not this file: the next would fail too
                failed += 1
                print(f"error: {name}: {e.details()}", file=sys.stderr)
                continue
            print(f"{reply.image_id}  {'cached ' if reply.cached else 'encoded'}  {name}")
    return EXIT_SOME_FAILED if failed else 0


def cmd_ask(args: argparse.Namespace) -> int:
    # (kind, value) in command-line order: the order of the images in the question's context
    searches = [x for x in (args.search_image, args.search_id) if x]
    if len(searches) + bool(args.images) != 1:
        print(
            "onetoken ask: error: name the images with --image/--image-id (repeatable), or one of "
            "--search-image/--search-id",
            file=sys.stderr,
        )
        return EXIT_USAGE
    images = [Path(v).read_bytes() if kind == "file" else v for kind, v in args.images or []]
    if searches:
        search_image = Path(args.search_image).read_bytes() if args.search_image else None
        with _client(args) as client:
            found = client.ask_search(
                args.question, args.k, args.search_id, search_image, max_new_tokens=args.max_new_tokens
            )
        print(found.answer.answer)
        for n, hit in enumerate(found.hits, 1):
            logger.info("image %d: %s %.4f %s", n, hit.image_id, hit.score, hit.source_uri)
        return 0
    kwargs: dict[str, object] = {"max_new_tokens": args.max_new_tokens}
    if len(images) > 1:
        kwargs["images"] = images
    elif isinstance(images[0], bytes):
        kwargs["image"] = images[0]
    else:
        kwargs["image_id"] = images[0]
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

    workdir = Path(args.workdir)
    # unless named by a flag or ONETOKEN_*, the demo's store and index live in its workdir
    args.store = args.store or str(workdir / "records")
    args.index_dir = args.index_dir or str(workdir / "index")
    return run_demo(worker_config(args), workdir, images=args.images)


def add_client_options(p: argparse.ArgumentParser, address: str) -> None:
    """Where the server is and how to reach it: address, TLS, bearer token."""
    p.add_argument("--address", default=address, help="the server's host:port [$ONETOKEN_ADDRESS]")
    p.add_argument(
        "--tls-ca",
        default=env("TLS_CA"),
        help="PEM CA the server's certificate is signed by: use TLS [$ONETOKEN_TLS_CA]",
    )
    p.add_argument(
        "--tls-cert",
        default=env("TLS_CLIENT_CERT"),
        help="PEM client certificate, for mutual TLS [$ONETOKEN_TLS_CLIENT_CERT]",
    )
    p.add_argument(
        "--tls-key", default=env("TLS_CLIENT_KEY"), help="PEM key of --tls-cert [$ONETOKEN_TLS_CLIENT_KEY]"
    )
    p.add_argument(
        "--token", default=env("TOKEN"), help="bearer token, if the server wants one [$ONETOKEN_TOKEN]"
    )


def build_parser() -> argparse.ArgumentParser:
    log_level = env("LOG_LEVEL", "WARNING").upper()
    parser = argparse.ArgumentParser(prog="onetoken", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"onetoken {version()}")
    add_log_level(parser, log_level)
    sub = parser.add_subparsers(dest="command", required=True)
    common = common_options(log_level)

    serve = add_command(
        sub, "serve", "run the gRPC server (EncodeImage, Ask, AskStream, Search, ...)", common
    )
    add_service_options(serve)
    serve.add_argument(
        "--host",
        default=env("HOST", "127.0.0.1"),
        help="interface to listen on; 0.0.0.0 for other hosts [$ONETOKEN_HOST]",
    )
    serve.add_argument(
        "--port", type=int, default=int(env("PORT", "50051")), help="gRPC port [$ONETOKEN_PORT]"
    )
    serve.add_argument(
        "--tls-cert", default=env("TLS_CERT"), help="PEM certificate: serve TLS [$ONETOKEN_TLS_CERT]"
    )
    serve.add_argument("--tls-key", default=env("TLS_KEY"), help="PEM key of --tls-cert [$ONETOKEN_TLS_KEY]")
    serve.add_argument(
        "--tls-client-ca",
        default=env("TLS_CLIENT_CA"),
        help="PEM CA: mutual TLS, clients need a certificate it signed [$ONETOKEN_TLS_CLIENT_CA]",
    )
    serve.add_argument(
        "--tokens-file",
        default=env("TOKENS_FILE"),
        help="'ROLE SHA256' lines (roles reader, writer, admin; see `onetoken token new`): calls need "
        "a bearer token [$ONETOKEN_TOKENS_FILE; $ONETOKEN_TOKENS holds such lines inline]",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback address without TLS and tokens (refused otherwise)",
    )
    metrics_port = env("METRICS_PORT")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=int(metrics_port) if metrics_port else None,
        help="serve Prometheus metrics at http://HOST:METRICS_PORT/metrics, on the gRPC host (0: a free "
        "port; default: off) [$ONETOKEN_METRICS_PORT]",
    )
    serve.add_argument(
        "--log-format",
        choices=get_args(LogFormat),
        default=env("LOG_FORMAT", "plain"),
        help="log lines as text or one JSON object each; one request line per call shows at the default "
        "--log-level (WARNING) and INFO, with the request's content at DEBUG [$ONETOKEN_LOG_FORMAT]",
    )
    serve.set_defaults(func=cmd_serve)

    token = add_command(sub, "token", "make bearer tokens for the server's roles", common)
    token_sub = token.add_subparsers(dest="token_command", required=True)
    new = add_command(token_sub, "new", "print a new random token and the line that grants it a role", common)
    new.add_argument("--role", choices=get_args(Role), required=True, help="what the token may do")
    new.set_defaults(func=cmd_token_new)

    ingest = add_command(
        sub,
        "ingest",
        "encode a corpus (folders, globs, a .txt of paths) on Ray Data: resumable, bad files reported",
        common,
        epilog="exit status:\n"
        "  0  every file encoded or already cached\n"
        "  3  finished, but some files failed: each is in the report, with its reason\n"
        "  1  error: the run did not start or stopped (e.g. the store went down); it says why, and the\n"
        "     same command resumes it\n"
        "  2  bad usage",
    )
    add_service_options(ingest)
    ingest.add_argument(
        "inputs", nargs="+", help="folders (walked), glob patterns, .txt files listing paths, files"
    )
    ingest.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    ingest.add_argument(
        "--report",
        help="JSON lines, one per failed file with its reason and run, appended to this file "
        f"(default: a new file per run, {DEFAULT_REPORT_DIR}/ingest-RUN.jsonl)",
    )
    ingest.set_defaults(func=cmd_ingest)

    address = env("ADDRESS", "127.0.0.1:50051")
    encode = add_command(
        sub,
        "encode",
        "encode image files through a running server",
        common,
        epilog="exit status:\n"
        "  0  every file encoded or already cached\n"
        "  3  some files failed, each named with its reason (the others are encoded)\n"
        "  1  error (e.g. no server answers)\n"
        "  2  bad usage",
    )
    encode.add_argument("images", nargs="+", help="image files (a folder: use `onetoken ingest`)")
    add_client_options(encode, address)
    encode.set_defaults(func=cmd_encode)

    ask = add_command(sub, "ask", "ask a question about an image through a running server", common)
    ask.add_argument("question", help="the question, in quotes")
    ask.add_argument(
        "--image",
        dest="images",
        action="append",
        type=lambda v: ("file", v),
        help="an image file (encoded first if needed); repeat, with --image-id too, for several in order",
    )
    ask.add_argument(
        "--image-id",
        dest="images",
        action="append",
        type=lambda v: ("id", v),
        help="the SHA-256 of an encoded image; repeatable",
    )
    ask.add_argument("--search-image", help="ask about the k images most similar to this image file")
    ask.add_argument("--search-id", help="ask about the k images most similar to this encoded image")
    ask.add_argument("-k", type=int, default=8, help="with --search-image/--search-id: how many images")
    ask.add_argument(
        "--max-new-tokens", type=int, default=0, help="answer length limit (0: the server's default)"
    )
    ask.add_argument("--stream", action="store_true", help="print the answer token by token as it is decoded")
    add_client_options(ask, address)
    ask.set_defaults(func=cmd_ask)

    search = add_command(sub, "search", "the most similar encoded images, through a running server", common)
    which = search.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", help="an image file (encoded first if needed)")
    which.add_argument("--image-id", help="the SHA-256 of an encoded image")
    search.add_argument("-k", type=int, default=5, help="how many images to list")
    add_client_options(search, address)
    search.set_defaults(func=cmd_search)

    demo = add_command(sub, "demo", "the main job: serve, ingest a sample corpus, ask, search", common)
    add_service_options(demo, in_workdir=True)
    demo.add_argument(
        "--workdir",
        default=".onetoken/demo",
        help="holds the corpus, ingest reports, store and index of the demo",
    )
    demo.add_argument("--images", type=int, default=24, help="procedural scenes in the sample corpus")
    demo.set_defaults(func=cmd_demo)

    add_model_commands(sub, common, model=default_model())
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["onetoken", *argv])  # the same command again, to resume a run
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders only
    import grpc

    try:
        return args.func(args)
    except grpc.RpcError as e:  # the client commands: the server's code and message, no traceback
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # an image file that cannot be read, a report path that cannot be made
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
