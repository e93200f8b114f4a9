"""decode(): answer questions from cached records, the voco state injected as the whole past.

Under M_hy text never attends V_hy, so the voco tokens' key/value state is all that text ever reads of an
image: a `DynamicCache` of the model's shared prefix state (the layout's text before the image, which text
reads unless the layout says otherwise) followed by the record's voco state gives the same logits as the
full masked pass. Text positions continue right after the voco tokens, so rotary phases are those of the
full pass.

A row may ask about several images: its records' voco states sit one after another, each moved exactly
to its place (`htcvlm.placement`), and its text starts after the last. Batches mix images, numbers of
images and question lengths: prompts are left-padded so every row's next token is the last column;
padded keys are masked and each row carries its own position ids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from htcvlm.errors import InvalidQuestionError, RecordMismatchError, TooManyImagesError
from htcvlm.generation import FinishReason, GenerationOptions, RowState, StepEvent, sample_tokens
from htcvlm.layout import SequenceLayout
from htcvlm.mask import to_additive
from htcvlm.model import HTCVLM, KVState
from htcvlm.placement import (
    Records,
    place_records,
    record_groups,
    row_text,
    text_position,
    voco_key_positions,
)
from htcvlm.record import Record

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason


def check_records(model: HTCVLM, records: Sequence[Record]) -> None:
    """Raise `RecordMismatchError` unless every record was made by this very model."""
    cfg, llm, layout = model.config, model.llm.config, model.layout
    want_shape = (llm.num_hidden_layers, llm.num_key_value_heads, cfg.n_voco, model.llm_head_dim)
    fingerprint = model.fingerprint()
    for rec in records:
        if rec.fingerprint != fingerprint:
            raise RecordMismatchError(
                f"record {rec.image_id[:12]}… was made by model {rec.fingerprint[:12]}…, this is "
                f"{fingerprint[:12]}…; encode the image again with this model"
            )
        if rec.voco_position != layout.voco_position or tuple(rec.keys.shape) != want_shape:
            raise RecordMismatchError(
                f"record {rec.image_id[:12]}… has voco position {rec.voco_position} and state "
                f"{tuple(rec.keys.shape)}, this model expects {layout.voco_position} and {want_shape}"
            )


def context_room(model: HTCVLM, n_records: int = 1) -> int:
    """Tokens the model's context holds after `n_records` images: the prompt and the answer share them."""
    return model.llm.config.max_position_embeddings - text_position(model.layout, n_records)


def max_images(model: HTCVLM) -> int:
    """The most images one question can ask about: k records' voco tokens take k * n_voco positions (and
    their markers, where the layout has them), and at least one prompt token and one answer token must
    follow (`max_position_embeddings` bounds it)."""
    low, high = 1, (context_room(model) - 2) // model.layout.n_voco + 1  # high: were there no markers
    while low < high:  # the room left falls as images are added: the last count that leaves 2
        mid = (low + high + 1) // 2
        low, high = (mid, high) if context_room(model, mid) >= 2 else (low, mid - 1)
    return low


def encode_questions(
    model: HTCVLM, questions: Sequence[str], max_new_tokens: int, n_records: int | Sequence[int] = 1
) -> list[list[int]]:
    """Questions -> prompt token ids, or `InvalidQuestionError` for empty or over-long ones.

    `n_records`: how many images each question is about (one number for all, or one per question); the
    prompt starts after their voco tokens, so more images leave less room (`TooManyImagesError` when
    they leave none). A question too long for the context by its characters alone is refused before it
    is tokenized: a token covers at most `model.max_token_chars` characters, so tokenizing a 40 MB
    question (seconds of CPU, gigabytes of memory) can never be needed to know that it does not fit.
    """
    counts = [n_records] * len(questions) if isinstance(n_records, int) else list(n_records)
    if len(counts) != len(questions):
        raise ValueError(f"got {len(questions)} questions and {len(counts)} image counts")
    if min(counts, default=1) < 1:
        raise ValueError(f"every question needs at least one image, got counts {counts}")
    prompts = []
    for i, (question, count) in enumerate(zip(questions, counts, strict=True)):
        name = "the question" if len(questions) == 1 else f"question {i}"
        room = context_room(model, count)
        after = "the image" if count == 1 else f"{count} images"
        fix = "shorten the question, ask about fewer images" if count > 1 else "shorten the question"
        if max_new_tokens >= room:  # always so beyond max_images(model): room < 2 there
            if count > 1:
                fewer = "ask about fewer images" + (" or lower max_new_tokens" if room >= 2 else "")
                raise TooManyImagesError(
                    f"{name} asks about {count} images with max_new_tokens={max_new_tokens}: the model's "
                    f"context holds {max(room, 0)} tokens after {after} (at most {max_images(model)} "
                    f"images fit, with a one-token prompt and answer); {fewer}"
                )
            raise InvalidQuestionError(
                f"max_new_tokens={max_new_tokens} leaves no room for a question: the model's context holds "
                f"{room} tokens after the image; ask for fewer new tokens"
            )
        most_chars = (room - max_new_tokens) * model.max_token_chars
        if not question or not question.strip():
            raise InvalidQuestionError(f"{name} is empty; ask something about the image")
        if len(question) > most_chars:
            raise InvalidQuestionError(
                f"{name} is {len(question)} characters; with max_new_tokens={max_new_tokens} the model's "
                f"context leaves room for {room - max_new_tokens} tokens after {after} (at most "
                f"{most_chars} characters); {fix} or lower max_new_tokens"
            )
        ids = model.prompt_ids(question)
        if len(ids) + max_new_tokens > room:
            raise InvalidQuestionError(
                f"{name} is {len(ids)} tokens; with max_new_tokens={max_new_tokens} the model's context "
                f"leaves room for {room - max_new_tokens} after {after}; {fix} or lower max_new_tokens"
            )
        prompts.append(ids)
    return prompts


def left_padded_text(
    layout: SequenceLayout, counts: Sequence[int], texts: Sequence[Sequence[int]], pad: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's text after its `counts[b]` images (markers, then `texts[b]`: a prompt, or a prompt and
    its answer), left-padded: ids (B, T), true lengths (B,) and positions (B, T). Padding takes the
    row's first text position; it is never read."""
    rows = [row_text(layout, n, text) for n, text in zip(counts, texts, strict=True)]
    lengths = torch.tensor([len(ids) for ids, _ in rows], device=device)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for row, (text, where) in enumerate(rows):
        ids[row, width - len(text) :] = torch.tensor(text, dtype=torch.long)
        positions[row] = where[0]
        positions[row, width - len(text) :] = torch.tensor(where, dtype=torch.long)
    return ids, lengths, positions


def read_placed(
    model: HTCVLM,
    shared: KVState,
    past: Sequence[tuple[torch.Tensor, torch.Tensor]],
    voco_real: torch.Tensor,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Left-padded text (B, T) read over placed voco states: the one text pass of decoding and of
    multi-image training (htcvlm/train/multi.py), so the two cannot drift apart.

    shared: the shared prefix state (1, kv_heads, n_shared, head_dim) per layer, read unless the layout
    says not; past, voco_real: `place_states`' output; ids, lengths, positions: `left_padded_text`'s.
    A text token reads the voco keys placed before it (a marker only its own image's and earlier ones),
    the shared prefix and the text before it. Returns the logits (B, T, vocab), the cache after the
    text and which of its keys are real.
    """
    layout, dtype = model.layout, model.dtype
    batch, width = ids.shape
    # (B, n_past + T): which keys are real. The shared prefix always is; left padding never is.
    text_real = torch.arange(width, device=ids.device)[None] >= (width - lengths)[:, None]
    past_real = torch.cat([voco_real.new_ones(batch, layout.n_shared_read), voco_real], dim=1)
    if layout.n_shared_read:
        # (1, kv_heads, n_shared, head_dim) -> (B, ...) before each row's voco state: every row reads
        # the one shared prefix state at its own positions 0 .. n_shared - 1
        past = [
            (
                torch.cat([sk.expand(batch, -1, -1, -1), k], dim=2),
                torch.cat([sv.expand(batch, -1, -1, -1), v], dim=2),
            )
            for (sk, sv), (k, v) in zip(shared, past, strict=True)
        ]
    cache = DynamicCache(list(past))
    slots = voco_real.shape[1] // layout.n_voco
    key_at = torch.tensor(voco_key_positions(layout, slots), device=ids.device)  # (K * n_voco,)
    before = key_at[None, None] < positions[:, :, None]  # (B, T, K * n_voco): voco keys before each token
    reads_voco = voco_real[:, None] & before
    reads_shared = reads_voco.new_ones(batch, width, layout.n_shared_read)
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
    allowed = torch.cat([reads_shared, reads_voco, causal[None] & text_real[:, None]], dim=2)
    out = model.llm(
        input_ids=ids,
        attention_mask=to_additive(allowed, dtype)[:, None],  # (B, 1, T, n_past + T)
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    return out.logits, cache, torch.cat([past_real, text_real], dim=1)


class DecodeBatch:
    """The decoding state of a batch of (records, prompt) rows: injected cache, key mask and positions.

    A row's records are one `Record` (one image) or a sequence of them (k images, k may differ by row).
    Each row's keys are [shared prefix text reads; its records' voco tokens, moved to q_1 … q_k; masked
    slots up to the batch's most records; left padding; prompt; answer].
    """

    def __init__(self, model: HTCVLM, records: Sequence[Records], prompts: Sequence[Sequence[int]]) -> None:
        if len(records) != len(prompts) or not records:
            raise ValueError(
                f"need one prompt per record, got {len(records)} records, {len(prompts)} prompts"
            )
        groups = record_groups(records)
        check_records(model, [rec for group in groups for rec in group])
        self.model = model
        device, dtype, layout = model.device, model.dtype, model.layout
        counts = [len(g) for g in groups]
        # the prompt and, in a question about several images, each image's marker before it
        ids, self.prompt_lengths, positions = left_padded_text(
            layout, counts, prompts, model.tokenizer.pad_token_id, device
        )
        # per layer (B, kv_heads, K * n_voco, head_dim), and (B, K * n_voco): which voco slots are real
        past, voco_real = place_records(groups, layout, model.llm, dtype, device)
        logits, self.cache, self.key_valid = read_placed(
            model, model.shared_prefix(), past, voco_real, ids, self.prompt_lengths, positions
        )
        self.prompt_logits = logits  # (B, T, vocab), left-padded
        self.next_positions = positions[:, -1] + 1  # (B,)

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


class RowFailedError(RuntimeError):
    """A row that cannot go on (its logits are not finite, or its step raised); the others go on."""


class RunningBatch:
    """The rows decoding together. Rows join (`admit`) and leave (finished, or `drop`) between steps; a
    `step` samples every row's token in one tensor pass, emits one event per row and runs one forward
    for the rows that go on. decode(), the worker's scheduler and the tests all decode through it.

    Rows are named by ids that `admit` hands out (in admission order, from 0); events carry them.
    """

    def __init__(self, model: HTCVLM) -> None:
        self.model = model
        self._batch: DecodeBatch | None = None
        self._logits = torch.empty(0)  # (B, vocab): the next-token logits of the rows, in row order
        self._ids: list[int] = []
        self._rows: list[RowState] = []
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def admit(
        self,
        records: Sequence[Records],
        prompts: Sequence[Sequence[int]],
        options: Sequence[GenerationOptions],
    ) -> list[int]:
        """Prefill new rows together and join them; returns their ids. On failure nothing changes.
        Each row's records are a `Record` or a sequence of them (see `DecodeBatch`)."""
        if not len(records) == len(prompts) == len(options):
            raise ValueError(f"got {len(records)} records, {len(prompts)} prompts, {len(options)} options")
        rows = [RowState(o, len(p), self.model.stop_ids) for o, p in zip(options, prompts, strict=True)]
        joined = DecodeBatch(self.model, records, prompts)
        logits = joined.last_logits()
        if self._batch is None:
            self._batch = joined
        else:
            logits = torch.cat([self._logits, logits])
            self._batch.extend(joined)
        ids = list(range(self._next_id, self._next_id + len(rows)))
        self._next_id += len(rows)
        self._logits, self._ids, self._rows = logits, self._ids + ids, self._rows + rows
        return ids

    def step(self) -> tuple[list[StepEvent], dict[int, Exception]]:
        """One token for every row: its event, and the rows that failed (by id, with why). Finished and
        failed rows leave; the rest go through one forward together."""
        tokenizer = self.model.tokenizer
        tokens, unusable = sample_tokens(self._logits, self._rows)
        failed: dict[int, Exception] = {
            self._ids[i]: RowFailedError(f"row {self._ids[i]} has no finite logits to sample from")
            for i in unusable
        }
        events, keep = [], []
        for i, (row_id, state) in enumerate(zip(self._ids, self._rows, strict=True)):
            if row_id in failed:
                continue
            try:
                event = state.advance(row_id, tokens[i], tokenizer)
            except Exception as exc:  # this row's failure is its own
                failed[row_id] = exc
                continue
            events.append(event)
            if event.finished is None:
                keep.append(i)
        self._keep(keep)
        if self._batch is not None:
            step_tokens = torch.tensor([tokens[i] for i in keep], device=self.model.device)
            self._logits = self._batch.step(step_tokens)
        return events, failed

    def drop(self, ids: Sequence[int]) -> None:
        """Remove rows (cancelled ones) before the next step."""
        gone = set(ids)
        self._keep([i for i, row_id in enumerate(self._ids) if row_id not in gone])

    def clear(self) -> None:
        self._batch, self._logits, self._ids, self._rows = None, torch.empty(0), [], []

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self._ids):
            return
        if not keep:
            self.clear()
            return
        assert self._batch is not None
        self._batch.select(keep)
        self._logits = self._logits[keep]
        self._ids = [self._ids[i] for i in keep]
        self._rows = [self._rows[i] for i in keep]


@torch.inference_mode()
def decode_stream(
    model: HTCVLM,
    records: Sequence[Records],
    questions: Sequence[str],
    options: GenerationOptions | Sequence[GenerationOptions] | None = None,
) -> Iterator[list[StepEvent]]:
    """Yield, per decoding step, one `StepEvent` for each row still generating (`row` is its index).
    `records`: per question a `Record`, or a sequence of records for a question about several images.
    `options`: one for every row, one per row, or None for the defaults.

    Raises RowFailedError (or what a row's step raised) if any row cannot go on."""
    options = options or GenerationOptions()
    per_row = [options] * len(questions) if isinstance(options, GenerationOptions) else list(options)
    if len(per_row) != len(questions) or len(records) != len(questions):
        raise ValueError(f"got {len(records)} records, {len(questions)} questions, {len(per_row)} options")
    longest = max(o.max_new_tokens for o in per_row)
    running = RunningBatch(model)
    groups = record_groups(records)
    prompts = encode_questions(model, questions, longest, [len(g) for g in groups])
    running.admit(groups, prompts, per_row)
    while len(running):
        events, failed = running.step()
        if failed:
            raise next(iter(failed.values()))
        yield events


def decode(
    model: HTCVLM,
    records: Sequence[Records],
    questions: Sequence[str],
    options: GenerationOptions | Sequence[GenerationOptions] | None = None,
) -> list[Answer]:
    """Answer each question about its record's image, or its records' images (a sequence of records per
    question), batched over images, numbers of images and question lengths."""
    answers = [Answer(text="", token_ids=[], prompt_tokens=0, finish_reason="length") for _ in questions]
    for events in decode_stream(model, records, questions, options):
        for ev in events:
            ans = answers[ev.row]
            ans.prompt_tokens = ev.prompt_tokens
            ans.text += ev.text
            if ev.finished != "eos":  # the stop token that ends an answer is not part of it
                ans.token_ids.append(ev.token_id)
            if ev.finished:
                ans.finish_reason = ev.finished
    for ans in answers:
        ans.text = ans.text.strip()
    return answers
