"""The CLI as a user runs it: `onetoken serve` in a subprocess, then encode / ask / search against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from llm_worker.client import OneTokenClient
from tests.cache.helpers import free_port
from tests.conftest import QUESTION
from tests.htcvlm.helpers import png_bytes
from tests.llm_worker.helpers import onetoken


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A `onetoken serve` process configured by ONETOKEN_* variables, on a free port."""
    work = tmp_path_factory.mktemp("cli")
    port = free_port()
    env = {
        **os.environ,
        "ONETOKEN_MODEL": str(model_dir),
        "ONETOKEN_STORE": f"lmdb://{work / 'records'}",
        "ONETOKEN_INDEX_DIR": str(work / "index"),
        "ONETOKEN_ENCODER_BACKEND": "local",
        "ONETOKEN_PORT": str(port),
        "ONETOKEN_ADDRESS": f"127.0.0.1:{port}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_worker.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    with OneTokenClient(f"127.0.0.1:{port}") as client:
        try:
            client.wait_ready(timeout_s=60)
        except grpc.FutureTimeoutError:
            proc.kill()
            pytest.fail(f"onetoken serve did not come up: {proc.stdout.read().decode()[-2000:]}")
    yield env, work, port
    proc.terminate()  # SIGTERM: a graceful shutdown that saves the index
    assert proc.wait(timeout=30) == 0


def encoded(served, seed: int) -> tuple[str, Path]:
    """An image file written and encoded through the CLI: (its id, its path)."""
    env, work, _ = served
    image = work / f"img{seed}.png"
    image.write_bytes(png_bytes(seed))
    done = onetoken("encode", str(image), env=env)
    assert done.returncode == 0, done.stderr
    image_id, status, path = done.stdout.split()
    assert path == str(image) and len(image_id) == 64 and status in ("encoded", "cached")
    return image_id, image


def test_encode_prints_the_id_then_cached(served):
    env, work, _ = served
    image = work / "cat.png"
    image.write_bytes(png_bytes(7))
    first = onetoken("encode", str(image), env=env)
    assert first.returncode == 0 and first.stdout.split()[1] == "encoded", first.stderr
    again = onetoken("encode", str(image), env=env)
    assert again.stdout.split()[:2] == [first.stdout.split()[0], "cached"]


def test_ask_by_id_and_streamed_by_file_agree(served):
    env = served[0]
    image_id, image = encoded(served, 8)
    asked = onetoken("ask", "--image-id", image_id, "--max-new-tokens", "4", QUESTION, env=env)
    streamed = onetoken("ask", "--image", str(image), "--max-new-tokens", "4", "--stream", QUESTION, env=env)
    assert asked.returncode == 0 and streamed.returncode == 0, asked.stderr + streamed.stderr
    assert asked.stdout.strip() and asked.stdout.strip() == streamed.stdout.strip()


def test_ask_about_several_images_in_order_and_over_a_searchs_hits(served):
    """--image and --image-id repeat and mix, in command-line order; --search-id asks over the hits."""
    env = served[0]
    (a, _), (b, b_file) = encoded(served, 21), encoded(served, 22)
    by_ids = onetoken("ask", "--image-id", a, "--image-id", b, "--max-new-tokens", "4", QUESTION, env=env)
    mixed = onetoken(
        "ask", "--image-id", a, "--image", str(b_file), "--max-new-tokens", "4", QUESTION, env=env
    )
    assert by_ids.returncode == 0 and mixed.returncode == 0, by_ids.stderr + mixed.stderr
    assert by_ids.stdout.strip() and by_ids.stdout == mixed.stdout
    found = onetoken(
        "ask", "--search-id", a, "-k", "2", "--max-new-tokens", "4", "--log-level", "INFO", QUESTION, env=env
    )
    assert found.returncode == 0 and found.stdout.strip(), found.stderr
    assert f"image 1: {a}" in found.stderr  # the hits it asked about, most similar first
    neither = onetoken("ask", QUESTION, env=env)
    both = onetoken("ask", "--image-id", a, "--search-id", a, QUESTION, env=env)
    for result in (neither, both):
        assert result.returncode == 2 and "--search-image" in result.stderr


def test_search_by_file_finds_it_first(served):
    image_id, image = encoded(served, 9)
    found = onetoken("search", "--image", str(image), "-k", "1", env=served[0])
    score, hit_id, uri = found.stdout.split()
    assert hit_id == image_id and float(score) > 0.999 and uri == str(image)


def test_a_bad_request_exits_nonzero_with_the_servers_message(served):
    env, work, _ = served
    bad = work / "notes.txt"
    bad.write_text("not an image")
    result = onetoken("encode", str(bad), env=env)
    assert result.returncode != 0 and "not an image" in result.stderr
    assert "Traceback" not in result.stderr


def test_encode_reports_each_file_and_goes_on(served):
    """A folder, a text file and an empty file among images: each is named with its reason, the images
    after them are encoded all the same, and the exit status says some failed."""
    env, work, _ = served
    files = work / "mixed"
    (files / "folder").mkdir(parents=True)
    for name, data in {"a.png": png_bytes(11), "b.png": png_bytes(12), "notes.txt": b"not an image"}.items():
        (files / name).write_bytes(data)
    (files / "empty.png").write_bytes(b"")
    names = ["a.png", "folder", "notes.txt", "empty.png", "b.png"]
    result = onetoken("encode", *names, env=env, cwd=files)
    assert result.returncode == 3, result.stderr
    encoded = [line.split() for line in result.stdout.splitlines()]
    assert [(len(image_id), path) for image_id, _, path in encoded] == [(64, "a.png"), (64, "b.png")]
    errors = result.stderr.splitlines()
    assert len(errors) == 3, result.stderr
    assert errors[0].startswith("error: folder: ") and "onetoken ingest folder" in errors[0]
    assert errors[1].startswith("error: notes.txt: ") and "not an image" in errors[1]
    assert errors[2] == "error: empty.png: empty file (0 bytes)"


def test_reflection_lists_and_describes_the_api(served):
    _, _, port = served
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"onetoken.v1.OneToken", "grpc.health.v1.Health"} <= services
        method = db.FindFileContainingSymbol("onetoken.v1.OneToken")
        assert method.name == "onetoken/v1/onetoken.proto"
    finally:
        channel.close()


def test_large_messages_pass_the_default_limit(served):
    """32 MiB of bytes reach the handler (and are refused as not an image), not gRPC's 4 MiB default."""
    _, _, port = served
    with OneTokenClient(f"127.0.0.1:{port}") as client:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.encode(b"\0" * (32 * 1024 * 1024))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert time.monotonic() - started < 30


CLIENT_IMPORTS = """
import sys
from llm_worker.cli import main
for argv in (["search", "--help"], ["ask", "--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit:
        pass
code = main(["ask", "--image-id", "0" * 64, "--address", "127.0.0.1:{port}", "What?"])
heavy = sorted(m for m in ("torch", "transformers", "ray", "faiss") if m in sys.modules)
print("heavy:", ",".join(heavy), "code:", code)
"""


def test_client_commands_import_no_model_stack(served):
    """`onetoken ask/search/encode` talk to a server: they must not pay for torch (~1.2 s) at start."""
    port = served[2]
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_IMPORTS.format(port=port)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # the Ask reached the server (an unknown id: NOT_FOUND, exit 1) with nothing heavy imported
    assert out.stdout.splitlines()[-1] == "heavy:  code: 1", out.stdout
    assert "NOT_FOUND" in out.stderr


def test_serve_shows_json_request_lines_and_serves_metrics_at_the_default_log_level(
    model_dir: Path, tmp_path: Path
):
    """`--log-format json --metrics-port N` with no --log-level: every line JSON, one request line per
    call (never the question), and the calls counted at http://127.0.0.1:N/metrics."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "ONETOKEN_LOG_LEVEL"}
    env |= {
        "ONETOKEN_MODEL": str(model_dir),
        "ONETOKEN_STORE": str(tmp_path / "records"),
        "ONETOKEN_INDEX_DIR": str(tmp_path / "index"),
        "ONETOKEN_ENCODER_BACKEND": "local",
    }
    flags = ["--port", str(port), "--metrics-port", str(metrics_port), "--log-format", "json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_worker.cli", "serve", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with OneTokenClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout_s=60)
            image_id = client.encode(png_bytes(5)).image_id
            client.ask(QUESTION, image_id=image_id, max_new_tokens=2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            scraped = reply.read().decode()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    counted = {
        (s.labels["method"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
        if s.name == "onetoken_rpcs_total"
    }
    assert counted == {("EncodeImage", "OK"): 1, ("Ask", "OK"): 1}
    assert f"metrics at http://127.0.0.1:{metrics_port}/metrics" in out
    logged = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    requests = [e for e in logged if e["logger"] == "onetoken.requests"]
    assert [(e["method"], e["code"], e["image_id"]) for e in requests] == [
        ("EncodeImage", "OK", image_id[:12]),
        ("Ask", "OK", image_id[:12]),
    ]
    assert requests[1]["tokens"] == 2 and QUESTION not in out
