"""The request log's pieces: which level shows request lines, the JSON formatter, and notes."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator

import grpc
import pytest

from llm_worker.request_log import (
    REQUEST_LOGGER,
    Call,
    JsonFormatter,
    configure_logging,
    note,
    open_note,
    request_level,
)


@pytest.mark.parametrize(
    ("level", "shown_at"),
    [
        (logging.DEBUG, logging.DEBUG),
        (logging.INFO, logging.INFO),
        (logging.WARNING, logging.INFO),  # the CLI's default level still shows request lines
        (logging.ERROR, logging.ERROR),
        (logging.CRITICAL, logging.CRITICAL),
    ],
)
def test_request_lines_show_unless_the_level_is_above_warning(level, shown_at):
    assert request_level(level) == shown_at


def test_the_json_formatter_writes_one_object_with_the_fields_and_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    record.rpc = {"method": "Ask", "code": "INTERNAL", "ms": 1.5}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and entry["level"] == "ERROR" and entry["method"] == "Ask"
    assert "ValueError: boom" in entry["exception"] and entry["time"].endswith("+00:00")


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger with one handler of its own; levels, handlers and formatters restored after."""
    root, requests = logging.getLogger(), logging.getLogger(REQUEST_LOGGER)
    saved = root.level, root.handlers[:], requests.level
    root.handlers = [logging.StreamHandler()]
    yield root
    root.setLevel(saved[0])
    root.handlers = saved[1]
    requests.setLevel(saved[2])


def test_configure_logging_turns_every_line_json_and_shows_request_lines(root_logging):
    root_logging.setLevel(logging.WARNING)
    configure_logging("json")
    assert isinstance(root_logging.handlers[0].formatter, JsonFormatter)
    assert logging.getLogger(REQUEST_LOGGER).getEffectiveLevel() == logging.INFO


def test_a_note_belongs_to_its_call_and_refuses_what_is_not_an_id():
    def serve_call(image_id: str, tokens: int) -> Call:
        current = open_note()
        note(image_id=image_id)
        note(tokens=tokens)
        note(image_id="not hex\nforged line")  # a client's malformed id never reaches a log line
        return Call("Ask", grpc.StatusCode.OK, 0.0123, "ipv4:127.0.0.1:1", current)

    first = contextvars.Context().run(serve_call, "AB" * 32, 3)
    second = contextvars.Context().run(serve_call, "cd" * 32, 5)
    assert first.fields() == {
        "method": "Ask",
        "code": "OK",
        "ms": 12.3,
        "image_id": "ab" * 6,
        "tokens": 3,
        "peer": "ipv4:127.0.0.1:1",
    }
    assert (second.note.image_id, second.note.tokens) == ("cd" * 32, 5)
    note(image_id="ef" * 32)  # outside any call: nothing to fill, and no error
