"""The request log of a real server: one line per call with its method, code and milliseconds, the image
id and tokens where known; the question only at DEBUG; every line JSON under the JSON formatter."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from htcvlm.generation import RowState
from llm_worker.client import OneTokenClient
from llm_worker.request_log import REQUEST_LOGGER, JsonFormatter
from tests.e2e.conftest import ServerThread, worker_config
from tests.htcvlm.helpers import png_bytes as png
from tests.polling import poll_until

SECRET = "what shape is the secret zebra?"  # must never reach a log line above DEBUG
LINE = re.compile(
    r"(?P<method>\w+) (?P<code>[A-Z_]+) \d+\.\d ms( image=(?P<image>[0-9a-f]{12}))?( tokens=(?P<tokens>\d+))?"
    r" peer=ipv4:127\.0\.0\.1:\d+"
)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    work = tmp_path_factory.mktemp("request-log")
    running = ServerThread(worker_config(model_dir, str(work / "records"), work / "index", "request-log"))
    yield running
    running.stop()


def request_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == REQUEST_LOGGER and r.levelno == level]


def calls(address: str, caplog: pytest.LogCaptureFixture) -> str:
    """A known sequence of six calls: EncodeImage, Ask, AskStream by bytes, Search, and two refused.
    Returns the image id once all six are logged (an aborted call's status can reach the client a moment
    before its line is written)."""
    with OneTokenClient(address, timeout_s=60) as client:
        image_id = client.encode(png(1)).image_id
        client.ask(SECRET, image_id=image_id, max_new_tokens=4)
        list(client.ask_stream(SECRET, image=png(1), max_new_tokens=3))
        client.search(1, image_id=image_id)
        for refused in (lambda: client.ask("  ", image_id=image_id), lambda: client.get_image("0" * 64)):
            with pytest.raises(grpc.RpcError):
                refused()
    poll_until(lambda: len(request_lines(caplog)) == 6)
    return image_id


def test_one_line_per_call_and_never_the_question(server, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    image_id = calls(server.address, caplog)
    lines = [LINE.fullmatch(r.getMessage()) for r in request_lines(caplog)]
    assert all(lines), [r.getMessage() for r in request_lines(caplog)]
    got = [(m["method"], m["code"], m["image"], m["tokens"]) for m in lines]
    prefix = image_id[:12]
    assert got == [
        ("EncodeImage", "OK", prefix, None),
        ("Ask", "OK", prefix, "4"),
        ("AskStream", "OK", prefix, "3"),
        ("Search", "OK", prefix, None),
        ("Ask", "INVALID_ARGUMENT", prefix, None),
        ("GetImage", "NOT_FOUND", "0" * 12, None),
    ]
    assert not [r.getMessage() for r in caplog.records if "zebra" in r.getMessage()]


def test_debug_adds_the_requests_content_with_images_by_their_length(server, caplog):
    caplog.set_level(logging.DEBUG, logger=REQUEST_LOGGER)
    calls(server.address, caplog)
    content = [r.getMessage() for r in request_lines(caplog, logging.DEBUG)]
    assert len(content) == len(request_lines(caplog)) == 6
    stream = next(line for line in content if line.startswith("AskStream request"))
    assert f"question='{SECRET}'" in stream and f"image_bytes=<{len(png(1))} bytes>" in stream
    assert not [line for line in content if "\\x89PNG" in line]  # no image bytes, not even at DEBUG


def test_json_lines_parse_and_carry_the_fields(server, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    image_id = calls(server.address, caplog)
    entries = [json.loads(JsonFormatter().format(r)) for r in request_lines(caplog)]
    assert [(e["method"], e["code"]) for e in entries] == [
        ("EncodeImage", "OK"),
        ("Ask", "OK"),
        ("AskStream", "OK"),
        ("Search", "OK"),
        ("Ask", "INVALID_ARGUMENT"),
        ("GetImage", "NOT_FOUND"),
    ]
    ask = entries[1]
    assert ask["logger"] == REQUEST_LOGGER and ask["level"] == "INFO"
    assert (
        ask["image_id"] == image_id[:12] and ask["tokens"] == 4 and ask["peer"].startswith("ipv4:127.0.0.1:")
    )
    assert all(isinstance(e["ms"], float) and e["ms"] >= 0 for e in entries)
    assert "tokens" not in entries[0] and "image_id" in entries[0]


def test_a_missed_deadline_and_a_cancelled_stream_are_logged_with_their_codes(server, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    original = RowState.advance

    def slow(self, row, token, tokenizer):  # 200 tokens take >= 4 s: past the deadline, time to cancel
        time.sleep(0.02)
        return original(self, row, token, tokenizer)

    with OneTokenClient(server.address, timeout_s=60) as client:
        image_id = client.encode(png(2)).image_id
        monkeypatch.setattr(RowState, "advance", slow)
        request = client.ask_request(SECRET, image_id=image_id, max_new_tokens=200)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Ask(request, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = client.stub.AskStream(request, timeout=60)
        next(stream), next(stream)
        stream.cancel()
        poll_until(lambda: len(request_lines(caplog)) == 3)
    scheduler = server.service.scheduler
    poll_until(lambda: scheduler.active == 0)  # both generations stopped
    entries = [r.rpc for r in request_lines(caplog)]
    assert [(e["method"], e["code"]) for e in entries] == [
        ("EncodeImage", "OK"),
        ("Ask", "DEADLINE_EXCEEDED"),
        ("AskStream", "CANCELLED"),
    ]
    assert 2 <= entries[2]["tokens"] < 200 and entries[1]["ms"] >= 300 * 0.9
