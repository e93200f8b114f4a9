"""decode(): answer questions from cached records, the voco state injected as the whole past.

Under M_hy text never attends V_hy, so the voco tokens' key/value state is all that text ever reads of an
image: a `DynamicCache` built from records gives the same logits as the full masked pass. Text positions
continue right after the voco position, so rotary phases are those of the full pass.

Batches mix images and question lengths: prompts are left-padded so every row's next token is the last
column; padded keys are masked and each row carries its own position ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from htcvlm.errors import InvalidQuestionError, RecordMismatchError
from htcvlm.mask import to_additive
from htcvlm.model import HTCVLM
from htcvlm.record import Record

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "length"]


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 is greedy decoding
    top_p: float = 1.0  # nucleus sampling mass; 1 keeps the whole distribution
    seed: int | None = None  # sampling seed; None draws from torch's global generator

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise ValueError(f"max_new_tokens must be in [1, 4096], got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason


@dataclass
class StepEvent:
    """One decoding step for one row: the token and the text it completes (may be '' mid-character)."""

    row: int
    token_id: int
    text: str
    finished: FinishReason | None = None
    prompt_tokens: int = 0  # the row's question length in tokens (for usage accounting)


def check_records(model: HTCVLM, records: Sequence[Record]) -> None:
    """Raise `RecordMismatchError` unless every record was made by this very model."""
    cfg, llm = model.config, model.llm.config
    want_shape = (llm.num_hidden_layers, llm.num_key_value_heads, cfg.n_voco, model.llm_head_dim)
    fingerprint = model.fingerprint()
    for rec in records:
        if rec.fingerprint != fingerprint:
            raise RecordMismatchError(
                f"record {rec.image_id[:12]}… was made by model {rec.fingerprint[:12]}…, this is "
                f"{fingerprint[:12]}…; encode the image again with this model"
            )
        if rec.voco_position != cfg.voco_position or tuple(rec.keys.shape) != want_shape:
            raise RecordMismatchError(
                f"record {rec.image_id[:12]}… has voco position {rec.voco_position} and state "
                f"{tuple(rec.keys.shape)}, this model expects {cfg.voco_position} and {want_shape}"
            )


def context_room(model: HTCVLM) -> int:
    """Tokens the model's context holds after the image: the prompt and the answer share them."""
    return model.llm.config.max_position_embeddings - model.config.voco_position - model.config.n_voco


def encode_questions(model: HTCVLM, questions: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Questions -> prompt token ids, or `InvalidQuestionError` for empty or over-long ones.

    A question too long for the context by its characters alone is refused before it is tokenized: a
    token covers at most `model.max_token_chars` characters, so tokenizing a 40 MB question (seconds of
    CPU, gigabytes of memory) can never be needed to know that it does not fit.
    """
    room = context_room(model)
    if max_new_tokens >= room:
        raise InvalidQuestionError(
            f"max_new_tokens={max_new_tokens} leaves no room for a question: the model's context holds "
            f"{room} tokens after the image; ask for fewer new tokens"
        )
    most_chars = (room - max_new_tokens) * model.max_token_chars
    prompts = []
    for i, question in enumerate(questions):
        name = "the question" if len(questions) == 1 else f"question {i}"
        if not question or not question.strip():
            raise InvalidQuestionError(f"{name} is empty; ask something about the image")
        if len(question) > most_chars:
            raise InvalidQuestionError(
                f"{name} is {len(question)} characters; with max_new_tokens={max_new_tokens} the model's "
                f"context leaves room for {room - max_new_tokens} tokens (at most {most_chars} characters); "
                "shorten the question or lower max_new_tokens"
            )
        ids = model.prompt_ids(question)
        if len(ids) + max_new_tokens > room:
            raise InvalidQuestionError(
                f"{name} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} the model's context "
                f"leaves room for {room - max_new_tokens}; shorten the question or lower max_new_tokens"
            )
        prompts.append(ids)
    return prompts


class DecodeBatch:
    """The decoding state of a batch of (record, prompt) rows: injected cache, key mask and positions."""

    def __init__(self, model: HTCVLM, records: Sequence[Record], prompts: Sequence[Sequence[int]]) -> None:
        if len(records) != len(prompts) or not records:
            raise ValueError(
                f"need one prompt per record, got {len(records)} records, {len(prompts)} prompts"
            )
        check_records(model, records)
        self.model = model
        device, dtype = model.device, model.dtype
        n_voco, batch = model.config.n_voco, len(records)
        self.prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(self.prompt_lengths.max())
        pad = model.tokenizer.pad_token_id
        ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
        # (B, n_voco + T): which keys are real. The voco state always is; left padding never is.
        text_real = torch.arange(width, device=device)[None] >= (width - self.prompt_lengths)[:, None]
        self.key_valid = torch.cat([text_real.new_ones(batch, n_voco), text_real], dim=1)
        # stacked (B, layers, kv_heads, n_voco, head_dim) -> per layer (B, kv_heads, n_voco, head_dim)
        keys = torch.stack([r.keys for r in records]).to(device=device, dtype=dtype)
        values = torch.stack([r.values for r in records]).to(device=device, dtype=dtype)
        self.cache = DynamicCache([(keys[:, i], values[:, i]) for i in range(keys.shape[1])])
        first = model.config.voco_position + n_voco  # the first text position of the full pass
        positions = first + (text_real.long().cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = torch.cat(
            [text_real.new_ones(batch, width, n_voco), causal[None] & text_real[:, None]], dim=2
        )
        out = model.llm(
            input_ids=ids,
            attention_mask=to_additive(allowed, dtype)[:, None],  # (B, 1, T, n_voco + T)
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        self.prompt_logits = out.logits  # (B, T, vocab), left-padded
        self.next_positions = first + self.prompt_lengths  # (B,)

    def last_logits(self) -> torch.Tensor:
        return self.prompt_logits[:, -1]

    def row_prompt_logits(self, row: int) -> torch.Tensor:
        """(n_b, vocab): the logits over row b's prompt tokens, without padding."""
        return self.prompt_logits[row, self.prompt_logits.shape[1] - int(self.prompt_lengths[row]) :]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the next logits (B, vocab)."""
        self.key_valid = torch.cat([self.key_valid, self.key_valid.new_ones(len(tokens), 1)], dim=1)
        out = self.model.llm(
            input_ids=tokens[:, None],
            attention_mask=to_additive(self.key_valid, self.model.dtype)[:, None, None],  # (B, 1, 1, K)
            position_ids=self.next_positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.next_positions = self.next_positions + 1
        return out.logits[:, -1]

    def __len__(self) -> int:
        return int(self.next_positions.shape[0])

    def select(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order): finished or cancelled rows leave the batch."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.key_valid.device)
        # keep only key columns some remaining row still reads: the rest is dead padding
        live = self.key_valid[index].any(dim=0)
        first = int(live.nonzero()[0]) if len(index) else self.key_valid.shape[1]
        layers = [
            (layer.keys[index, :, first:], layer.values[index, :, first:]) for layer in self.cache.layers
        ]
        self.cache = DynamicCache(layers)
        self.key_valid = self.key_valid[index, first:]
        self.next_positions = self.next_positions[index]
        self.prompt_lengths = self.prompt_lengths[index]

    def extend(self, other: DecodeBatch) -> None:
        """Append `other`'s rows (continuous batching: new requests join a running batch).

        The shorter of the two key sequences is left-padded with masked zeros; positions are explicit
        and keys are cached after the rotary embedding, so padding changes no row's result.
        """
        width = max(self.key_valid.shape[1], other.key_valid.shape[1])

        def pad(x: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - x.shape[dim]
            if not missing:
                return x
            shape = list(x.shape)
            shape[dim] = missing
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        layers = [
            (
                torch.cat([pad(a.keys, 2), pad(b.keys, 2)]),  # (B, kv_heads, K, head_dim)
                torch.cat([pad(a.values, 2), pad(b.values, 2)]),
            )
            for a, b in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        self.cache = DynamicCache(layers)
        self.key_valid = torch.cat([pad(self.key_valid, 1), pad(other.key_valid, 1)])
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        self.prompt_lengths = torch.cat([self.prompt_lengths, other.prompt_lengths])


def sample_next(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
    """One token from a (vocab,) logit row: argmax when greedy, else temperature + top-p sampling."""
    if options.temperature == 0.0:
        return int(logits.argmax())
    # Shifted so the top logit is 0 before dividing: every accepted temperature, however small, gives
    # finite probabilities (a vanishing one collapses onto the top token: greedy, ties drawn at random).
    # fp64 keeps a tiny temperature from being a subnormal that a flush-to-zero CPU turns into 0.
    scaled = (logits.double() - logits.max().double()) / options.temperature
    probs = torch.softmax(scaled, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= options.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _RowText:
    """Incremental detokenization: byte-level tokens can split a character, so text is held back
    until it decodes cleanly."""

    ids: list[int] = field(default_factory=list)
    emitted: int = 0

    def push(self, tokenizer: PreTrainedTokenizerBase, token_id: int | None, final: bool) -> str:
        """The new text after `token_id` (None: no token, as for EOS); `final` flushes what was held."""
        if token_id is not None:
            self.ids.append(token_id)
        text = tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


class RowState:
    """One row's generation: its options and sampler, how far it has got, and its streamed text."""

    def __init__(self, options: GenerationOptions, prompt_tokens: int, device: torch.device) -> None:
        self.options = options
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self.generator = (
            torch.Generator(device=device).manual_seed(options.seed) if options.seed is not None else None
        )
        self._text = _RowText()

    def advance(self, row: int, logits: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> StepEvent:
        """Sample this row's next token from its (vocab,) logits; the event says if the row finished."""
        token = sample_next(logits, self.options, self.generator)
        self.generated += 1
        finished: FinishReason | None = None
        if token == tokenizer.eos_token_id:
            finished = "eos"
        elif self.generated >= self.options.max_new_tokens:
            finished = "length"
        is_eos = token == tokenizer.eos_token_id
        text = self._text.push(tokenizer, None if is_eos else token, final=finished is not None)
        return StepEvent(row, token, text, finished, self.prompt_tokens)


@torch.inference_mode()
def decode_stream(
    model: HTCVLM,
    records: Sequence[Record],
    questions: Sequence[str],
    options: GenerationOptions | Sequence[GenerationOptions] = GenerationOptions(),
) -> Iterator[list[StepEvent]]:
    """Yield, per decoding step, one `StepEvent` for each row still generating."""
    per_row = [options] * len(questions) if isinstance(options, GenerationOptions) else list(options)
    if len(per_row) != len(questions) or len(records) != len(questions):
        raise ValueError(f"got {len(records)} records, {len(questions)} questions, {len(per_row)} options")
    longest = max(o.max_new_tokens for o in per_row)
    prompts = encode_questions(model, questions, longest)
    batch = DecodeBatch(model, records, prompts)
    pad = model.tokenizer.pad_token_id
    rows = [RowState(o, len(p), model.device) for o, p in zip(per_row, prompts, strict=True)]
    active = [True] * len(rows)
    logits = batch.last_logits()
    while any(active):
        events, tokens = [], []
        for row, state in enumerate(rows):
            if not active[row]:
                tokens.append(pad)  # finished rows ride along; their outputs are ignored
                continue
            event = state.advance(row, logits[row], model.tokenizer)
            events.append(event)
            active[row] = event.finished is None
            tokens.append(event.token_id)
        yield events
        if any(active):
            logits = batch.step(torch.tensor(tokens, device=model.device))


def decode(
    model: HTCVLM,
    records: Sequence[Record],
    questions: Sequence[str],
    options: GenerationOptions | Sequence[GenerationOptions] = GenerationOptions(),
) -> list[Answer]:
    """Answer each question about its record's image (batched over images and question lengths)."""
    answers = [Answer(text="", token_ids=[], prompt_tokens=0, finish_reason="length") for _ in questions]
    for events in decode_stream(model, records, questions, options):
        for ev in events:
            ans = answers[ev.row]
            ans.prompt_tokens = ev.prompt_tokens
            if ev.token_id != model.tokenizer.eos_token_id:
                ans.token_ids.append(ev.token_id)
            if ev.finished:
                ans.finish_reason = ev.finished
    for ans in answers:
        ans.text = model.tokenizer.decode(ans.token_ids, skip_special_tokens=True).strip()
    return answers
