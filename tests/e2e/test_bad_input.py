"""Hostile and careless input through the real gRPC server: each request gets a clear, typed status (or a
correct answer) and the server keeps serving after every one of them.

Runs once over the embedded LMDB store and once over the real Redis (the `server` fixture's params). The
defects these tests pin down were found by trying the service as an attacker and as a new user would.
"""

from __future__ import annotations

import os
import threading
import time
import zlib

import grpc
import pytest

from cache.keys import RecordKey
from cache.serde import MAX_SOURCE_URI_BYTES
from htcvlm.defaults import DEFAULT_MAX_PIXELS
from htcvlm.generation import RowState
from llm_worker.client import OneTokenClient
from tests.conftest import QUESTION
from tests.htcvlm.helpers import png_bytes as png
from tests.htcvlm.test_images import handmade_png

from .test_service import assert_serving, code_of


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- answering ----


def test_a_vanishing_temperature_answers_greedily(client):
    """temperature=1e-40 passed the range check, made softmax NaN and killed the decoding thread: every
    later Ask hung until its deadline. Now the distribution collapses onto the top token."""
    image_id = client.encode(png(200)).image_id
    greedy = client.ask(QUESTION, image_id=image_id, max_new_tokens=6)
    tiny = client.ask(QUESTION, image_id=image_id, max_new_tokens=6, temperature=1e-40, seed=1)
    assert list(tiny.token_ids) == list(greedy.token_ids)
    assert_serving(client)


def test_a_row_failing_mid_answer_is_internal_and_the_rest_go_on(server, client, monkeypatch):
    """No exception raised while serving one row can end the decoding loop."""
    original = RowState.advance

    def advance(self, row, token, tokenizer):
        if self.options.max_new_tokens == 7 and self.generated == 3:
            raise RuntimeError("injected failure in one row's step")
        return original(self, row, token, tokenizer)

    monkeypatch.setattr(RowState, "advance", advance)
    image_id = client.encode(png(201)).image_id
    others: list[int] = []

    def other_ask() -> None:
        with OneTokenClient(server.address) as c:
            others.append(c.ask(QUESTION, image_id=image_id, max_new_tokens=20).usage.completion_tokens)

    beside = threading.Thread(target=other_ask)
    beside.start()
    got, details = code_of(lambda: client.ask(QUESTION, image_id=image_id, max_new_tokens=7))
    beside.join(30)
    assert got == grpc.StatusCode.INTERNAL and "injected failure" in details
    assert others == [20]
    assert server.service.scheduler.alive
    assert_serving(client)


def test_a_40_mb_question_is_refused_at_once_and_others_stay_fast(server, client):
    """It used to be tokenized on the event loop first: ~40 s of stalled server and ~3 GB of memory."""
    image_id = client.encode(png(202)).image_id
    huge = "why is the sky blue " * 2_000_000  # 40 MB
    before = rss_bytes()
    refusals: list[tuple[grpc.StatusCode, str, float]] = []

    def ask_huge() -> None:
        with OneTokenClient(server.address, timeout_s=120) as c:
            started = time.perf_counter()
            code, details = code_of(lambda: c.ask(huge, image_id=image_id))
            refusals.append((code, details, time.perf_counter() - started))

    threads = [threading.Thread(target=ask_huge) for _ in range(3)]
    for t in threads:
        t.start()
    normal_s = []
    for _ in range(3):  # normal Asks while the oversized ones travel and are refused
        started = time.perf_counter()
        client.ask(QUESTION, image_id=image_id, max_new_tokens=4)
        normal_s.append(time.perf_counter() - started)
    for t in threads:
        t.join(120)
    assert [r[0] for r in refusals] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert all("characters" in r[1] and "shorten the question" in r[1] for r in refusals)
    assert max(r[2] for r in refusals) < 10, refusals  # was ~40 s each, and serialized
    assert max(normal_s) < 5, normal_s
    assert rss_bytes() - before < 1 << 30, "tokenizing 40 MB took ~3 GB"
    assert_serving(client)


@pytest.mark.parametrize(
    "options, hint",
    [
        ({"temperature": float("nan")}, "temperature must be in [0, 100]"),
        ({"temperature": 101.0}, "temperature must be in [0, 100]"),
        ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"max_new_tokens": 4096}, "max_new_tokens=4096 leaves no room for a question"),
        ({"max_new_tokens": 5000}, "max_new_tokens must be in [1, 4096]"),
    ],
)
def test_options_out_of_range_blame_their_field(client, options, hint):
    got, details = code_of(lambda: client.ask("Color?", image=png(0), **options))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and hint in details, details
    assert_serving(client)


def test_the_largest_seed_samples(client):
    reply = client.ask("Color?", image=png(0), max_new_tokens=3, temperature=1.0, seed=2**64 - 1)
    assert reply.usage.completion_tokens == 3


# ---- records and search ----


def test_a_source_uri_over_the_limit_is_refused_and_the_longest_reads_back(client):
    """A 1 MiB source_uri was stored, then every read of the record said DATA_LOSS."""
    got, details = code_of(lambda: client.encode(png(203), source_uri="u" * (1 << 20)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and f"over the limit of {MAX_SOURCE_URI_BYTES}" in details
    longest = "file:///" + "p" * (MAX_SOURCE_URI_BYTES - 8)
    image_id = client.encode(png(203), source_uri=longest).image_id
    assert client.get_image(image_id).source_uri == longest
    assert client.search(1, image_id=image_id).hits[0].source_uri == longest
    assert client.ask("Color?", image_id=image_id, max_new_tokens=2).usage.completion_tokens == 2


def test_a_damaged_record_drops_out_of_search_and_stays_data_loss_for_its_id(server, client):
    ids = [client.encode(png(210 + i), source_uri=f"test://{210 + i}").image_id for i in range(3)]
    service = server.service
    damaged = ids[1]
    blob = service.store.get(RecordKey(service.fingerprint, damaged))
    service.store.put(RecordKey(service.fingerprint, damaged), b"\xff" * 8 + blob[8:])  # header length
    dropped = service.damaged_hits
    k = len(service.index)
    for search in (
        lambda: client.search(k, image_id=ids[0]),
        lambda: client.search(k, image=png(212)),
        lambda: client.search(k, latent=[1.0] * service.index.config.dim),
    ):
        hits = search().hits
        assert damaged not in [h.image_id for h in hits] and len(hits) == k - 1
        assert {ids[0], ids[2]} <= {h.image_id for h in hits}
    assert service.damaged_hits == dropped + 3
    for call in (
        lambda: client.ask("Color?", image_id=damaged),
        lambda: client.get_image(damaged),
        lambda: client.search(3, image_id=damaged),
    ):
        got, details = code_of(call)
        assert got == grpc.StatusCode.DATA_LOSS and damaged in details and "encode the image again" in details
    assert client.encode(png(211)).image_id == damaged  # the bytes again replace the damaged record
    assert client.get_image(damaged).source_uri == ""
    assert_serving(client)


@pytest.mark.parametrize("values", [[3e38], [float("inf")], [float("nan")], [0.0]])
def test_latents_without_a_finite_norm_are_refused(server, client, values):
    latent = values * server.service.index.config.dim
    got, details = code_of(lambda: client.search(3, latent=latent))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "finite, non-zero norm" in details, details
    assert_serving(client)


def test_ids_in_upper_case_hex_name_the_same_image(client):
    image_id = client.encode(png(220)).image_id
    upper = image_id.upper()
    assert client.get_image(upper).image_id == image_id
    assert client.ask("Color?", image_id=upper, max_new_tokens=2).image_id == image_id
    assert client.search(1, image_id=upper).hits[0].image_id == image_id
    assert client.delete_image(upper).deleted


def test_deleting_an_unknown_image_is_ok_and_says_so(client):
    """Deletion is idempotent: OK with deleted=false (documented in the proto), not NOT_FOUND."""
    assert client.delete_image("a" * 64).deleted is False


@pytest.mark.parametrize(
    "name, call, code, hint",
    [
        ("empty question", lambda c: c.ask(" ", image=png(0)), "INVALID_ARGUMENT", "the question is empty"),
        ("GetImage without id", lambda c: c.get_image(""), "INVALID_ARGUMENT", "set image_id:"),
        ("DeleteImage without id", lambda c: c.delete_image(""), "INVALID_ARGUMENT", "set image_id:"),
        ("GetImage bad id", lambda c: c.get_image("xyz"), "INVALID_ARGUMENT", "SHA-256"),
        ("unknown GetImage", lambda c: c.get_image("b" * 64), "NOT_FOUND", "EncodeImage"),
        ("zero-size file", lambda c: c.encode(b""), "INVALID_ARGUMENT", "empty image: 0 bytes"),
        ("search without query", lambda c: c.search(3), "INVALID_ARGUMENT", "set one query"),
        ("k too large", lambda c: c.search(10**6, image=png(0)), "INVALID_ARGUMENT", "k must be"),
    ],
)
def test_wording_names_the_right_field(client, name, call, code, hint):
    got, details = code_of(lambda: call(client))
    assert got == getattr(grpc.StatusCode, code) and hint in details, (name, details)
    assert_serving(client)


def test_an_unknown_id_in_search_is_not_quoted(client):
    got, details = code_of(lambda: client.search(3, image_id="1" * 64))
    assert got == grpc.StatusCode.NOT_FOUND and details.startswith("image 1111"), details


# ---- images ----


def test_a_pixel_flood_is_refused_without_costing_encoder_time(client):
    """Ten 180-byte PNGs claiming 8000 x 8000 used to cost ~9 s of encoder time, zero-filled."""
    flood = handmade_png(8000, 8000, rows=4)
    started = time.perf_counter()
    for _ in range(10):
        got, details = code_of(lambda: client.encode(flood))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "truncated image" in details, details
    assert time.perf_counter() - started < 5
    assert client.encode(png(230)).image_id  # a normal image right behind them


@pytest.mark.parametrize(
    "data, hint",
    [
        (handmade_png(20_000, 20_000, rows=1), f"over the limit of {DEFAULT_MAX_PIXELS:,} pixels"),
        (handmade_png(8001, 8000, rows=1), f"over the limit of {DEFAULT_MAX_PIXELS:,}"),
        (handmade_png(64, 64, rows=63), "truncated image"),
        (png(231)[:-20], "truncated image"),
        (b"\x89PNG\r\n\x1a\n" + zlib.compress(b"junk"), "not an image"),
    ],
)
def test_broken_and_oversized_images_are_invalid_argument(client, data, hint):
    got, details = code_of(lambda: client.encode(data))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and hint in details, details
    assert "178956970" not in details  # Pillow's own limit is never the one quoted
    assert_serving(client)
