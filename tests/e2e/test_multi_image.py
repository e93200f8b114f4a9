"""Several cached images in one question's context over gRPC: Ask/AskStream with a list of images, and
AskSearch over a Search's hits. Each image costs its voco token(s) of context; the answer equals
decode() from the same records in one context (exactness itself is tests/htcvlm/test_multi_image.py)."""

from __future__ import annotations

import grpc
import pytest

from cache.keys import RecordKey
from cache.records import get_records
from htcvlm.decode import decode, max_images
from htcvlm.generation import GenerationOptions
from tests.conftest import QUESTION
from tests.htcvlm.helpers import png_bytes as png


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_a_question_over_several_images_is_the_decode_of_their_records(server, client):
    ids = [client.encode(png(300 + i)).image_id for i in range(4)]
    order = [ids[2], ids[0], ids[3]]
    reply = client.ask(QUESTION, images=order, max_new_tokens=6)
    assert list(reply.image_ids) == order and reply.image_id == order[0]
    service = server.service
    records = get_records(service.store, [RecordKey(service.fingerprint, i) for i in order])
    (expected,) = decode(service.model, [records], [QUESTION], GenerationOptions(max_new_tokens=6))
    assert list(reply.token_ids) == expected.token_ids and reply.answer == expected.text
    streamed = list(client.ask_stream(QUESTION, images=order, max_new_tokens=6))
    assert [m.token_id for m in streamed if m.finish_reason != "eos"] == list(reply.token_ids)
    assert list(streamed[-1].image_ids) == order


def test_one_image_in_the_list_answers_as_the_single_image_ask(server, client):
    image_id = client.encode(png(310)).image_id
    single = client.ask(QUESTION, image_id=image_id, max_new_tokens=6)
    listed = client.ask(QUESTION, images=[image_id], max_new_tokens=6)
    assert list(listed.token_ids) == list(single.token_ids)


def test_images_by_bytes_and_id_mix_and_too_many_are_refused(server, client):
    known = client.encode(png(320)).image_id
    reply = client.ask(QUESTION, images=[png(321), known], max_new_tokens=2)
    assert reply.image_ids[1] == known and len(reply.image_ids[0]) == 64
    limit = max_images(server.service.model)
    got, details = code_of(lambda: client.ask(QUESTION, images=[known] * (limit + 1), max_new_tokens=4))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and f"at most {limit} images" in details
    got, details = code_of(lambda: client.ask(QUESTION, images=[known] * limit, max_new_tokens=4))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "ask about fewer images" in details
    got, details = code_of(lambda: client.ask(QUESTION, image_id=known, images=[known]))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "one way" in details
    got, _ = code_of(lambda: client.ask(QUESTION, images=[known, "0" * 64]))
    assert got == grpc.StatusCode.NOT_FOUND


def test_ask_search_answers_over_the_hits_it_returns(server, client):
    ids = [client.encode(png(330 + i)).image_id for i in range(3)]
    found = client.ask_search(QUESTION, 3, image_id=ids[1], max_new_tokens=4)
    hit_ids = [h.image_id for h in found.hits]
    assert hit_ids[0] == ids[1] and len(hit_ids) == 3
    assert list(found.answer.image_ids) == hit_ids
    direct = client.ask(QUESTION, images=hit_ids, max_new_tokens=4)
    assert list(found.answer.token_ids) == list(direct.token_ids)
