"""The README's main job: ingest a sample corpus, start the server, ask questions, search, print it all.

Everything goes through the real paths: Ray Data ingestion into the embedded store and the FAISS index,
then a gRPC server on a free local port and a gRPC client.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from pathlib import Path

from htcvlm.data.dataset import ProceduralVQA, VQASample
from llm_worker.client import OneTokenClient
from llm_worker.config import WorkerConfig

logger = logging.getLogger(__name__)


def write_corpus(folder: Path, n_images: int, image_size: int = 64) -> list[tuple[Path, VQASample]]:
    """Procedural test scenes as PNG files (each with its question and answer), and two bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    data = ProceduralVQA("test", n_images, image_size=image_size)
    written = []
    for i in range(n_images):
        sample = data[i]
        path = folder / f"scene-{i:03d}.png"
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        written.append((path, sample))
    (folder / "README.txt").write_text("not an image: the ingest report lists it and goes on\n")
    (folder / "truncated.png").write_bytes(written[0][0].read_bytes()[:200])
    return written


def _queries(client: OneTokenClient, corpus: list[tuple[Path, VQASample]]) -> int:
    print("\n== Ask (by image id; each answer decoded from the one cached <voco> token)")
    right = 0
    for path, sample in corpus:
        image = path.read_bytes()
        encoded = client.encode(image, source_uri=str(path))
        reply = client.ask(sample.question, image_id=encoded.image_id, max_new_tokens=8)
        ok = reply.answer == sample.answer
        right += ok
        print(
            f"{path.name}  {'ok ' if ok else 'BAD'} Q: {sample.question:<48} A: {reply.answer:<10} "
            f"(expected {sample.answer}; {reply.timings.total_ms:.1f} ms)"
        )
    print(f"{right}/{len(corpus)} answers right")

    path, sample = corpus[-1]
    print(f"\n== AskStream about {path.name}: {sample.question}")
    print("   ", end="")
    for message in client.ask_stream(sample.question, image=path.read_bytes(), max_new_tokens=8):
        print(message.text, end="", flush=True)
    print()

    path = corpus[0][0]
    print(f"\n== Search by the bytes of {path.name} (k=3): the image itself comes first")
    for hit in client.search(3, image=path.read_bytes()).hits:
        print(f"   {hit.score:7.4f}  {hit.image_id[:16]}…  {Path(hit.source_uri).name}")
    started = time.perf_counter()
    again = client.encode(path.read_bytes())
    print(
        f"\n== EncodeImage again: cached={again.cached} in {(time.perf_counter() - started) * 1e3:.1f} ms "
        "(no model work)"
    )
    return right


async def _serve_and_query(config: WorkerConfig, corpus: list[tuple[Path, VQASample]]) -> int:
    from llm_worker.server import start

    running = await start(config)
    try:
        print(f"\n== server listening on {running.address} ({len(running.service.index)} images indexed)")
        client = OneTokenClient(running.address)
        try:
            return await asyncio.to_thread(_queries, client, corpus)
        finally:
            client.close()
    finally:
        await running.stop()


def run_demo(config: WorkerConfig, workdir: Path, images: int = 24) -> int:
    """The demo in `workdir`: its corpus, and each run's ingest report under reports/ (the store and index
    go where `config` says: the CLI puts them in `workdir` too unless told otherwise)."""
    from encoder_service.ingest import default_report_path, ingest, new_run_id

    corpus = write_corpus(workdir / "corpus", images)
    print(f"== model {config.encoder.model_dir}\n== store {config.store.url}, index {config.index_dir}")
    print(f"== ingesting {workdir / 'corpus'} ({images} scenes and 2 bad files) on Ray Data")
    run_id = new_run_id()
    summary = ingest(
        [str(workdir / "corpus")],
        config.encoder,
        config.store,
        index_dir=config.index_dir,
        index_spec=config.index_spec,
        report_path=default_report_path(workdir / "reports", run_id),
        run_id=run_id,
    )
    print(
        f"encoded {summary.encoded}, already cached {summary.cached}, failed {summary.failed} "
        f"({summary.images_per_s:.1f} images/s); failures listed in {summary.report_path}"
    )
    asyncio.run(_serve_and_query(config, corpus))
    return 0
