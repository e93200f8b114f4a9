"""The request log: one line per RPC, written by the logger "onetoken.requests" at INFO.

A line names the method, the status code, the milliseconds the call took, the image id's first 12 hex
digits and the tokens generated when the call learned them, and the peer:

    Ask OK 41.7 ms image=3f2a9c1b0d4e tokens=8 peer=ipv4:127.0.0.1:53144

It never holds the question or the image: at DEBUG a second line gives the request's fields, texts
as they are and bytes by their length only. `--log-format json` (`JsonFormatter`) writes every log line
as one JSON object, a request line's fields (method, code, ms, peer, image_id, tokens) at its top level.

Handlers tell the log what only they learn (the image id of an encoded image, the tokens of an answer)
through `note()`, which fills the `CallNote` of the call being served: each grpc.aio call runs in a
`contextvars.Context` of its own, so a note never reaches another call. `llm_worker.interceptors`
opens the note, and reads it once the call ends.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from string import hexdigits
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.text_format import MessageToString

from llm_worker.config import LogFormat

REQUEST_LOGGER = "onetoken.requests"
request_logger = logging.getLogger(REQUEST_LOGGER)

IMAGE_ID_CHARS = 12  # enough to tell images apart in a log, short enough to read
DEBUG_FIELD_CHARS = 200  # a message field (options, latent) at DEBUG is cut here


@dataclass
class CallNote:
    """What a handler learned about its call; None where it did not learn it."""

    image_id: str | None = None
    tokens: int | None = None  # generated for the caller (EOS excluded): usage.completion_tokens
    first_token_s: float | None = None  # from the call's start to its first token


_current: ContextVar[CallNote | None] = ContextVar("onetoken_call_note", default=None)


def open_note() -> CallNote:
    """A fresh note for the call being served (the interceptor calls this before the handler)."""
    note = CallNote()
    _current.set(note)
    return note


def note(image_id: str | None = None, tokens: int | None = None, first_token_s: float | None = None) -> None:
    """Record facts about the current call for its log line and metrics; the arguments left None keep
    what an earlier note said. Outside an observed call (no interceptor) it does nothing."""
    current = _current.get()
    if current is None:
        return
    if image_id and all(c in hexdigits for c in image_id):  # a client's malformed id is not logged
        current.image_id = image_id.lower()
    if tokens is not None:
        current.tokens = tokens
    if first_token_s is not None:
        current.first_token_s = first_token_s


@dataclass(frozen=True)
class Call:
    """One finished RPC, as the log and the metrics see it."""

    method: str  # "Ask", without its service
    code: grpc.StatusCode
    seconds: float
    peer: str  # "ipv4:127.0.0.1:53144"
    note: CallNote = field(default_factory=CallNote)

    def fields(self) -> dict[str, Any]:
        """The request line's fields: method, code, ms, image_id (a prefix) and tokens when known, peer."""
        found: dict[str, Any] = {
            "method": self.method,
            "code": self.code.name,
            "ms": round(self.seconds * 1e3, 1),
        }
        if self.note.image_id:
            found["image_id"] = self.note.image_id[:IMAGE_ID_CHARS]
        if self.note.tokens is not None:
            found["tokens"] = self.note.tokens
        found["peer"] = self.peer
        return found


def log_call(call: Call) -> None:
    """The call's request line (INFO), its fields attached to the record for `JsonFormatter`."""
    if not request_logger.isEnabledFor(logging.INFO):
        return
    fields = call.fields()
    image = f" image={fields['image_id']}" if "image_id" in fields else ""
    tokens = f" tokens={fields['tokens']}" if "tokens" in fields else ""
    request_logger.info(
        "%s %s %.1f ms%s%s peer=%s",
        call.method,
        call.code.name,
        fields["ms"],
        image,
        tokens,
        call.peer,
        extra={"rpc": fields},
    )


def log_request(method: str, peer: str, request: Message) -> None:
    """At DEBUG only: the request's fields (the question's text; an image as its length in bytes)."""
    if request_logger.isEnabledFor(logging.DEBUG):
        request_logger.debug("%s request from %s: %s", method, peer, describe(request))


def describe(request: Message) -> str:
    """The fields set in `request`, one line: texts and numbers as they are, bytes by their length."""
    parts = []
    for descriptor, value in request.ListFields():
        if isinstance(value, bytes):
            shown = f"<{len(value)} bytes>"
        elif isinstance(value, Message):
            shown = "{" + MessageToString(value, as_one_line=True)[:DEBUG_FIELD_CHARS] + "}"
        else:
            shown = repr(value)
        parts.append(f"{descriptor.name}={shown}")
    return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, a request line's fields, and the
    traceback of a logged exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "rpc", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def request_level(level: int) -> int:
    """The request logger's level in a process logging at `level`: request lines show at WARNING (the
    CLI's default) and INFO, DEBUG adds the requests' content, ERROR and CRITICAL silence them."""
    return min(level, logging.INFO) if level <= logging.WARNING else level


def configure_logging(log_format: LogFormat) -> None:
    """Set up a serving process's log output (serve calls it; the root level is set before): request
    lines by `request_level`, and every line of the root logger's handlers in `log_format`."""
    root = logging.getLogger()
    if not root.handlers:  # nobody configured logging: Python's last resort would drop INFO lines
        logging.basicConfig()
    request_logger.setLevel(request_level(root.getEffectiveLevel()))
    if log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
