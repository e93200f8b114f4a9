"""The whole service through real gRPC: answers equal htcvlm's decode(), search, and every status code.

Runs once over the embedded LMDB store and once over the real Redis (the `server` fixture's params).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache.keys import RecordKey
from cache.records import get_record
from cache.serde import serialize
from htcvlm.decode import decode
from htcvlm.generation import GenerationOptions, RowState
from llm_worker.client import OneTokenClient
from tests.conftest import QUESTION
from tests.htcvlm.helpers import png_bytes as png
from tests.polling import poll_until


def stored_record(server, image_id: str):
    service = server.service
    return get_record(service.store, RecordKey(service.fingerprint, image_id))


def assert_serving(client: OneTokenClient) -> None:
    """The server still answers: health says SERVING and a real Ask goes through."""
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="onetoken.v1.OneToken")).status == 1
    assert client.ask("Color?", image=png(0), max_new_tokens=2).usage.completion_tokens == 2


def test_encode_then_cached(client):
    first = client.encode(png(100), source_uri="test://100")
    again = client.encode(png(100))
    assert len(first.image_id) == 64 and not first.cached
    assert again.image_id == first.image_id and again.cached


def test_ask_equals_decode_from_the_stored_record(server, client):
    image_id = client.encode(png(1)).image_id
    reply = client.ask(QUESTION, image_id=image_id, max_new_tokens=8)
    expected = decode(
        server.service.model, [stored_record(server, image_id)], [QUESTION], GenerationOptions(8)
    )[0]
    assert list(reply.token_ids) == expected.token_ids and reply.answer == expected.text
    assert reply.finish_reason == "length" and reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.timings.total_ms >= reply.timings.decode_ms > 0


def test_ask_by_bytes_and_streaming_agree(client):
    image = png(2)
    unary = client.ask(QUESTION, image=image, max_new_tokens=8)
    messages = list(client.ask_stream(QUESTION, image=image, max_new_tokens=8))
    assert "".join(m.text for m in messages).strip() == unary.answer
    assert [m.token_id for m in messages] == list(unary.token_ids)
    last = messages[-1]
    assert last.finish_reason == "length" and last.usage.completion_tokens == 8 and last.timings.total_ms > 0
    assert all(not m.finish_reason for m in messages[:-1])


def test_concurrent_asks_are_batched_and_each_is_right(server, client):
    ids = [client.encode(png(10 + i)).image_id for i in range(6)]
    replies: dict[int, object] = {}

    def ask(i: int) -> None:
        with OneTokenClient(server.address) as c:
            replies[i] = c.ask(QUESTION, image_id=ids[i], max_new_tokens=24)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    model = server.service.model
    expected = decode(model, [stored_record(server, i) for i in ids], [QUESTION] * 6, GenerationOptions(24))
    assert [list(replies[i].token_ids) for i in range(6)] == [e.token_ids for e in expected]
    assert server.service.scheduler.max_rows_seen > 1  # some Asks shared decode steps


def test_search_by_image_finds_it_first(server, client):
    ids = [client.encode(png(30 + i), source_uri=f"test://{30 + i}").image_id for i in range(5)]
    hits = client.search(3, image=png(32)).hits
    assert hits[0].image_id == ids[2] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].source_uri == "test://32" and len(hits) == 3
    by_id = client.search(3, image_id=ids[2]).hits
    assert [h.image_id for h in by_id] == [h.image_id for h in hits]
    latent = stored_record(server, ids[2]).latent.tolist()
    assert [h.image_id for h in client.search(3, latent=latent).hits] == [h.image_id for h in hits]


def test_get_and_delete_image(server, client):
    image_id = client.encode(png(40), source_uri="test://40").image_id
    info = client.get_image(image_id)
    assert info.source_uri == "test://40" and info.indexed and info.kv_bytes > 0
    assert info.model_fingerprint == server.service.fingerprint
    assert client.delete_image(image_id).deleted
    assert not client.delete_image(image_id).deleted
    with pytest.raises(grpc.RpcError) as err:
        client.ask(QUESTION, image_id=image_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.mark.parametrize(
    "name, call, code, hint",
    [
        ("not an image", lambda c: c.encode(b"hello, not a png"), "INVALID_ARGUMENT", "not an image"),
        ("truncated", lambda c: c.encode(png(5)[:100]), "INVALID_ARGUMENT", "truncated"),
        ("empty image", lambda c: c.encode(b""), "INVALID_ARGUMENT", "0 bytes"),
        ("empty question", lambda c: c.ask("  ", image=png(0)), "INVALID_ARGUMENT", "empty"),
        ("long question", lambda c: c.ask("why " * 400, image=png(0)), "INVALID_ARGUMENT", "shorten"),
        (
            "bad temperature",
            lambda c: c.ask("Color?", image=png(0), temperature=-1),
            "INVALID_ARGUMENT",
            "temp",
        ),
        ("no image", lambda c: c.ask("Color?"), "INVALID_ARGUMENT", "image_id or image_bytes"),
        ("bad id", lambda c: c.ask("Color?", image_id="abc"), "INVALID_ARGUMENT", "SHA-256"),
        ("bad k", lambda c: c.search(0, image=png(0)), "INVALID_ARGUMENT", "k must be"),
        ("bad latent", lambda c: c.search(3, latent=[1.0, 2.0]), "INVALID_ARGUMENT", "finite values"),
        ("unknown id", lambda c: c.ask("Color?", image_id="0" * 64), "NOT_FOUND", "EncodeImage"),
        ("unknown search", lambda c: c.search(3, image_id="1" * 64), "NOT_FOUND", "encode it first"),
    ],
)
def test_status_codes_and_the_server_survives(client, name, call, code, hint):
    got, details = code_of(lambda: call(client))
    assert got == getattr(grpc.StatusCode, code), (name, details)
    assert hint in details, details
    assert_serving(client)


def test_record_of_another_model_is_failed_precondition(server, client):
    """A blob of another model under this model's key (a mixed-up deployment) is never decoded."""
    from dataclasses import replace

    image_id = client.encode(png(50)).image_id
    record = stored_record(server, image_id)
    foreign = replace(record, fingerprint="f" * 64)
    server.service.store.put(RecordKey(server.service.fingerprint, image_id), serialize(foreign))
    got, details = code_of(lambda: client.ask(QUESTION, image_id=image_id))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "re-encode" in details
    assert_serving(client)


def test_deadline_stops_the_generation(server, client, monkeypatch):
    image_id = client.encode(png(60)).image_id
    original = RowState.advance

    def slow(self, row, token, tokenizer):  # 200 tokens take >= 4 s on any machine: past the deadline
        time.sleep(0.02)
        return original(self, row, token, tokenizer)

    monkeypatch.setattr(RowState, "advance", slow)
    scheduler = server.service.scheduler
    before = scheduler.steps
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Ask(client.ask_request(QUESTION, image_id=image_id, max_new_tokens=200), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    poll_until(lambda: scheduler.active == 0)  # the row leaves at the next step
    assert scheduler.steps - before < 100
    monkeypatch.undo()
    assert_serving(client)


def test_records_stored_by_another_process_become_searchable(server, client):
    """An ingest run writes records beside a running worker; the worker's index follows the change feed."""
    from encoder_service.encoder import Encoder

    config = server.service.config
    other = Encoder(config.encoder, config.store)  # another writer of the same store
    try:
        (outcome,) = other.encode([png(70)], ["other://70"])
    finally:
        other.close()
    assert outcome.image_id not in server.service.index
    assert server.call(server.service.follow_index()).added == 1
    hits = client.search(1, image_id=outcome.image_id).hits
    assert hits[0].image_id == outcome.image_id and hits[0].source_uri == "other://70"


def test_a_damaged_record_does_not_stop_the_index_following_the_others(server, client):
    """The refresh read records with get_records, which raised on the first damaged one: as long as one
    existed, it indexed nothing, every round."""
    from encoder_service.encoder import Encoder

    other = Encoder(server.service.config.encoder, server.service.config.store)
    try:
        outcomes = other.encode([png(80 + i) for i in range(3)])
    finally:
        other.close()
    service = server.service
    key = RecordKey(service.fingerprint, outcomes[1].image_id)
    service.store.put(key, b"\xff" * 8 + service.store.get(key)[8:])
    assert server.call(service.follow_index()).added == 2
    assert outcomes[0].image_id in service.index and outcomes[2].image_id in service.index
    assert outcomes[1].image_id not in service.index


def test_search_never_returns_an_image_whose_record_is_gone(server, client):
    """A record deleted or evicted behind this worker's index (another worker, Redis LRU) is left out."""
    ids = [client.encode(png(90 + i)).image_id for i in range(3)]
    service = server.service
    service.store.delete(RecordKey(service.fingerprint, ids[1]))  # the index still holds it
    assert ids[1] in service.index
    hits = [h.image_id for h in client.search(len(service.index), image_id=ids[0]).hits]
    assert ids[1] not in hits and ids[0] in hits and ids[2] in hits


def test_a_cancelled_stream_stops_its_generation(server, client):
    image_id = client.encode(png(61)).image_id
    scheduler = server.service.scheduler
    before = scheduler.steps
    stream = client.ask_stream(QUESTION, image_id=image_id, max_new_tokens=150)
    for _ in range(3):
        next(stream)
    stream.cancel()
    poll_until(lambda: scheduler.active == 0)  # the row leaves at the next step
    assert scheduler.steps - before < 140  # far fewer than the 150 steps it asked for
    assert_serving(client)
