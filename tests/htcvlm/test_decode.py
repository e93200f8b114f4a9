"""decode(): batching, sampling, streaming and its typed errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from htcvlm.decode import GenerationOptions, decode, decode_stream, encode_questions
from htcvlm.errors import InvalidQuestionError, RecordMismatchError

from .helpers import QUESTIONS, greedy_with_joins, make_model, png_bytes


@pytest.fixture(scope="module")
def model(tokenizer):
    m = make_model(tokenizer, seed=11)
    with torch.no_grad():
        m.llm.lm_head.weight[tokenizer.eos_token_id] = 0.0  # never ends early: full-length comparisons
    m.invalidate_fingerprint()
    return m


@pytest.fixture(scope="module")
def records(model):
    return model.compress([png_bytes(s) for s in range(3)])


def test_batched_decode_equals_one_row_at_a_time(model, records):
    opts = GenerationOptions(max_new_tokens=8)
    together = decode(model, records, QUESTIONS, opts)
    for row in range(3):
        alone = decode(model, [records[row]], [QUESTIONS[row]], opts)[0]
        assert alone.token_ids == together[row].token_ids
    assert all(a.finish_reason == "length" and len(a.token_ids) == 8 for a in together)
    assert together[0].prompt_tokens == len(model.prompt_ids(QUESTIONS[0]))


def test_rows_joining_and_leaving_a_running_batch_keep_their_answers(model, records):
    """Continuous batching: rows that join mid-way (left-padded state) and rows that leave change nothing."""
    opts = GenerationOptions(max_new_tokens=8)
    expected = [a.token_ids for a in decode(model, records, QUESTIONS, opts)]
    prompts = encode_questions(model, QUESTIONS, opts.max_new_tokens)
    got = greedy_with_joins(model, records, prompts, 8, join_after={1: 2, 2: 4})
    assert got == expected


def test_per_row_options(model, records):
    opts = [GenerationOptions(max_new_tokens=n) for n in (2, 5, 3)]
    answers = decode(model, records, QUESTIONS, opts)
    assert [len(a.token_ids) for a in answers] == [2, 5, 3]


def test_seeded_sampling_is_reproducible_and_seed_dependent(model, records):
    sample = GenerationOptions(max_new_tokens=12, temperature=1.5, seed=1)
    a = decode(model, records, QUESTIONS, sample)
    b = decode(model, records, QUESTIONS, sample)
    c = decode(model, records, QUESTIONS, replace(sample, seed=2))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    greedy = decode(model, records, QUESTIONS, GenerationOptions(max_new_tokens=12))
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]


def test_tiny_top_p_is_greedy(model, records):
    nucleus = decode(
        model, records, QUESTIONS, GenerationOptions(max_new_tokens=6, temperature=1.0, top_p=1e-6)
    )
    greedy = decode(model, records, QUESTIONS, GenerationOptions(max_new_tokens=6))
    assert [x.token_ids for x in nucleus] == [x.token_ids for x in greedy]


def test_stream_concatenates_to_the_answer(model, records):
    opts = GenerationOptions(max_new_tokens=8)
    pieces = ["", "", ""]
    for events in decode_stream(model, records, QUESTIONS, opts):
        for ev in events:
            pieces[ev.row] += ev.text
    answers = decode(model, records, QUESTIONS, opts)
    assert [p.strip() for p in pieces] == [a.text for a in answers]


def test_eos_stops_a_row_and_is_not_part_of_the_answer(tokenizer):
    m = make_model(tokenizer, seed=12)
    head = torch.nn.Linear(m.llm.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1.0  # EOS is every step's argmax
    m.llm.lm_head = head
    m.invalidate_fingerprint()
    answers = decode(m, m.compress([png_bytes(0)]), ["hi"], GenerationOptions(max_new_tokens=5))
    assert answers[0].finish_reason == "eos"
    assert answers[0].token_ids == [] and answers[0].text == ""


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(model, records, question):
    with pytest.raises(InvalidQuestionError, match="empty"):
        decode(model, records[:1], [question])


def test_question_over_the_context_limit(model, records):
    long_question = "why " * 400
    with pytest.raises(InvalidQuestionError, match="shorten"):
        decode(model, records[:1], [long_question])
    assert decode(model, records[:1], ["why?"], GenerationOptions(max_new_tokens=2))  # still serves


def test_record_of_another_model(model, records, tokenizer):
    other = make_model(tokenizer, seed=99)
    with pytest.raises(RecordMismatchError, match="encode the image again"):
        decode(other, records[:1], ["what?"])


def test_record_of_another_geometry(model, records, tokenizer):
    other = make_model(tokenizer, seed=11, n_voco=2)
    forged = replace(records[0], fingerprint=other.fingerprint())
    with pytest.raises(RecordMismatchError, match="expects"):
        decode(other, [forged], ["what?"])


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_bad_generation_options(kwargs):
    with pytest.raises(ValueError):
        GenerationOptions(**kwargs)
