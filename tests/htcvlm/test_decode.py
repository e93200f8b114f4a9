"""decode(): batching, sampling, streaming and its typed errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from htcvlm.decode import context_room, decode, decode_stream, encode_questions
from htcvlm.errors import InvalidQuestionError, RecordMismatchError
from htcvlm.generation import GenerationOptions, RowState, TextStream, sample_tokens
from htcvlm.tokenizer import train_tokenizer

from .helpers import QUESTIONS, greedy_with_joins, make_model, png_bytes


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


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
    for a in answers:  # the streamed text is the tokenizer's own decoding of the tokens
        assert a.text == model.tokenizer.decode(a.token_ids, skip_special_tokens=True).strip()


def test_incremental_text_equals_decoding_everything_at_once():
    """TextStream decodes a small window per token, holding back split characters; any token sequence,
    cut anywhere, concatenates to the full decode (byte-level tokens split multi-byte characters)."""
    tokenizer = train_tokenizer(["größer café naïve 東京 🙂 ok"] * 8 + [q.lower() for q in QUESTIONS], 320)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in specials]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = [
            vocab[int(i)]
            for i in torch.randint(
                len(vocab), (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen
            )
        ]
        stream = TextStream()
        text = "".join(stream.push(tokenizer, t, final=n == len(ids) - 1) for n, t in enumerate(ids))
        assert text == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_eos_stops_a_row_and_is_not_part_of_the_answer(tokenizer):
    m = make_model(tokenizer, seed=12)
    head = torch.nn.Linear(m.llm.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1.0  # EOS is every step's argmax
    m.llm.lm_head = head
    answers = decode(m, m.compress([png_bytes(0)]), ["hi"], GenerationOptions(max_new_tokens=5))
    assert answers[0].finish_reason == "eos"
    assert answers[0].token_ids == [] and answers[0].text == ""


@pytest.mark.parametrize("question", ["", "   ", "\n\t"])
def test_empty_question(model, records, question):
    with pytest.raises(InvalidQuestionError, match=r"^the question is empty"):
        decode(model, records[:1], [question])
    with pytest.raises(InvalidQuestionError, match=r"^question 1 is empty"):
        decode(model, records[:2], ["what?", question])


def test_question_over_the_context_limit(model, records):
    long_question = "why " * 400
    with pytest.raises(InvalidQuestionError, match="shorten"):
        decode(model, records[:1], [long_question])
    assert decode(model, records[:1], ["why?"], GenerationOptions(max_new_tokens=2))  # still serves


def test_a_question_too_long_by_its_characters_is_never_tokenized(model, monkeypatch):
    """A 40 MB question would take seconds and gigabytes to tokenize; its length alone refuses it."""
    room = context_room(model) - 8
    fits = "a" * room  # at least room / max_token_chars tokens: the character bound lets it through
    assert len(encode_questions(model, [fits[: room // 4]], 8)[0]) <= room

    def no_tokenizing(question):
        raise AssertionError("tokenized a question that its length alone refuses")

    monkeypatch.setattr(model, "prompt_ids", no_tokenizing)
    huge = "x" * (room * model.max_token_chars + 1)
    with pytest.raises(InvalidQuestionError, match=f"is {len(huge)} characters.*shorten the question"):
        encode_questions(model, [huge], 8)


def test_max_new_tokens_over_the_context_blames_max_new_tokens(model):
    room = context_room(model)
    with pytest.raises(
        InvalidQuestionError, match=f"max_new_tokens=4096 leaves no room.*holds {room} tokens"
    ):
        encode_questions(model, ["Color?"], 4096)
    with pytest.raises(InvalidQuestionError, match="shorten the question or lower max_new_tokens"):
        encode_questions(model, ["why " * 20], room - 5)


def test_a_vanishing_temperature_samples_the_top_token():
    """softmax(logits / 1e-40) overflowed to NaN and killed the decoding thread; now it is greedy."""
    logits = torch.tensor([1.0, 3.0, 2.5, -1e4, float("-inf")])

    def draws(logits, n=20, **options) -> set[int]:
        rows = [RowState(GenerationOptions(seed=s, **options), 1) for s in range(n)]
        tokens, unusable = sample_tokens(logits.expand(n, -1), rows)
        assert unusable == []
        return set(tokens)

    for temperature in (1e-40, 1e-30, 1e-8):
        for top_p in (1.0, 0.5):
            assert draws(logits, temperature=temperature, top_p=top_p) == {1}, (temperature, top_p)
    tie = torch.tensor([2.0, 2.0, -3.0])  # a tie stays a fair draw between the tied tokens
    assert draws(tie, n=40, temperature=1e-40) == {0, 1}
    assert len(draws(logits, n=60, temperature=100.0)) >= 3  # the largest temperature samples broadly


def test_sampling_follows_the_distribution_and_top_p():
    """One tensor pass samples every row: frequencies follow softmax(logits / T); top-p cuts the tail."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    rows = [RowState(GenerationOptions(temperature=1.0, seed=s), 1) for s in range(n)]
    tokens, _ = sample_tokens(logits.expand(n, -1), rows)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.03)
    rows = [RowState(GenerationOptions(temperature=1.0, top_p=0.7, seed=s), 1) for s in range(n)]
    tokens, _ = sample_tokens(logits.expand(n, -1), rows)
    assert set(tokens) == {0, 1}  # 0.5 + 0.3 reaches 0.7: the rest is cut
    greedy_and_sampled = [RowState(GenerationOptions(), 1), RowState(GenerationOptions(temperature=1.0), 1)]
    tokens, _ = sample_tokens(torch.stack([logits, logits]), greedy_and_sampled)
    assert tokens[0] == 0


def test_rows_without_finite_logits_are_reported_not_sampled():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [float("-inf"), float("-inf")], [1.0, 0.0]])
    rows = [RowState(GenerationOptions(temperature=t), 1) for t in (0.0, 1.0, 0.0, 1.0)]
    tokens, unusable = sample_tokens(logits, rows)
    assert unusable == [1, 2] and tokens[0] == 1


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
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 4097},
        {"temperature": -1.0},
        {"temperature": 100.5},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": float("nan")},
    ],
)
def test_bad_generation_options(kwargs):
    with pytest.raises(ValueError):
        GenerationOptions(**kwargs)
