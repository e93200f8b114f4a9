"""Training on questions over several images: the pass decoding serves them with, with gradients.

A multi-image row is k pool images and one question about them (`htcvlm.data.multi`). Its loss runs the
path `decode()` answers it by, step for step: each image compressed on its own under M_hy (the voco
state), the states moved to q_1 … q_k (`place_states`), and the text read over them (`read_placed`, the
same function decoding prefills with). Nothing is approximated between training and serving, and
each image is compressed once per step however many rows name it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from htcvlm.data.multi import MULTI_QTYPES, ImageFacts, MultiQType, MultiQuestion, multi_questions
from htcvlm.decode import left_padded_text, read_placed
from htcvlm.model import HTCVLM, KVState, voco_state
from htcvlm.placement import markers, place_states
from htcvlm.pool import VQATensors

SUBSET_TRIES = 20  # draws of a multi-image question over a step's image subset before giving up


@dataclass
class MultiRows:
    """Multi-image rows ready for the model: each row's pool images and its prompt and answer ids."""

    questions: list[MultiQuestion]
    texts: list[list[int]]  # prompt, answer, EOS: what follows the images and their markers
    answer_lengths: list[int]  # the answer tokens and EOS, the positions Eq. 9 scores

    def __len__(self) -> int:
        return len(self.questions)

    def take(self, rows: Sequence[int]) -> MultiRows:
        """These rows, in this order."""
        return MultiRows(
            [self.questions[r] for r in rows],
            [self.texts[r] for r in rows],
            [self.answer_lengths[r] for r in rows],
        )

    @property
    def scored_tokens(self) -> int:
        """The answer tokens and EOS the loss averages over."""
        return sum(self.answer_lengths)


def tokenize_rows(model: HTCVLM, questions: Sequence[MultiQuestion]) -> MultiRows:
    """Questions -> `MultiRows`, each text as the model's prompt template gives it."""
    turn_ids = functools.cache(model.turn_ids)
    pairs = [turn_ids(q.text, q.answer, 0) for q in questions]
    return MultiRows(list(questions), [p + a for p, a in pairs], [len(a) for _, a in pairs])


def draw_rows(
    model: HTCVLM,
    facts: Sequence[ImageFacts],
    n: int,
    max_images: int,
    rng: random.Random,
    step_images: int = 0,
    kinds: Sequence[MultiQType] = MULTI_QTYPES,
) -> MultiRows:
    """n rows over the pool `facts`: k uniform in 1 … max_images, a qtype uniform among the `kinds` that
    k allows (`multi_questions`).

    `step_images` > 0: every row draws its images from one random subset of that many pool images, so
    the step compresses at most that many images however many rows it has (compressing is most of a
    row's cost; reading k placed records is a short text pass)."""
    if not step_images or step_images >= len(facts):
        return tokenize_rows(model, multi_questions(facts, range(1, max_images + 1), n, rng, kinds=kinds))
    subset = rng.sample(range(len(facts)), step_images)
    # a subset may lack what a find question names: such a question is drawn again
    drawn = multi_questions(
        [facts[i] for i in subset], range(1, max_images + 1), n, rng, tries=SUBSET_TRIES, kinds=kinds
    )
    return tokenize_rows(model, [replace(q, images=tuple(subset[i] for i in q.images)) for q in drawn])


def voco_states(
    model: HTCVLM,
    pixels: torch.Tensor,
    quantized: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
) -> tuple[KVState, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What compress_pixels() computes, with gradients: one pass over [S; V_hy; sep; voco] under M_hy
    (compress takes S's state from its cache instead; the two agree, see tests/htcvlm/test_multi_train.py).

    Returns the shared prefix state (1, kv_heads, n_shared, head_dim) per layer, the voco keys and
    values stacked as records hold them, (N, layers, kv_heads, n_voco, head_dim), and the latents (N, d).
    """
    layout = model.layout
    prefix, _ = model.prefix_embeds(pixels, quantized, patches)
    n, length = prefix.shape[:2]
    mask = layout.mask([0] * n, dtype=prefix.dtype, device=prefix.device)  # (N, 1, L, L): no text
    cache = DynamicCache()
    out = model.llm.model(
        inputs_embeds=prefix,
        attention_mask=mask,
        position_ids=torch.arange(length, device=prefix.device)[None].expand(n, -1),
        cache=cache,
        use_cache=True,
    )
    keys, values = voco_state(cache, layout)
    shared = slice(0, layout.n_shared)
    shared_state = tuple((layer.keys[:1, :, shared], layer.values[:1, :, shared]) for layer in cache.layers)
    # as a record's latent: the voco rows' mean
    latents = out.last_hidden_state[:, layout.voco_position : layout.text_position].mean(dim=1)
    return shared_state, keys, values, latents


def _distinct_images(
    model: HTCVLM, pool: VQATensors, rows: MultiRows
) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None], list[list[int]]]:
    """The rows' images, each once, as the model's inputs on its device (pixels, and the frozen MGVQ's
    and tower's outputs where the pool holds them), and each row's images as indices into them."""
    unique = sorted({i for q in rows.questions for i in q.images})
    slot_of = {image: at for at, image in enumerate(unique)}
    batch = pool.batch(torch.tensor(unique))
    device = model.device
    inputs = (
        batch["pixels"].to(device),
        None if batch["quantized"] is None else batch["quantized"].to(device),
        None if batch["patches"] is None else batch["patches"].to(device),
    )
    return inputs, [[slot_of[i] for i in q.images] for q in rows.questions]


def multi_image_logits(
    model: HTCVLM, pool: VQATensors, rows: MultiRows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' left-padded text ids (B, T) (markers, prompt, answer), their logits (B, T, vocab), row t
    predicting token t + 1, and which ids are scored (B, T): the answers and EOS."""
    device = model.device
    inputs, slots = _distinct_images(model, pool, rows)
    shared, keys, values, _ = voco_states(model, *inputs)
    counts = [len(q.images) for q in rows.questions]
    # (B, K) rows of indices into the distinct images; a row's slots after its last image repeat image
    # 0, masked
    index = torch.zeros(len(rows), max(counts), dtype=torch.long, device=device)
    for row, row_slots in enumerate(slots):
        index[row, : len(row_slots)] = torch.tensor(row_slots)
    past, real = place_states(
        keys[index], values[index], torch.tensor(counts, device=device), model.layout, model.llm
    )
    pad = model.tokenizer.pad_token_id
    ids, lengths, positions = left_padded_text(model.layout, counts, rows.texts, pad, device)
    logits, _, _ = read_placed(model, shared, past, real, ids, lengths, positions)
    width = ids.shape[1]
    answers = torch.tensor(rows.answer_lengths, device=device)
    scored = torch.arange(width, device=device)[None] >= (width - answers)[:, None]
    return ids, logits, scored


def uncompressed_length(model: HTCVLM, k: int, n_text: int) -> int:
    """Positions the uncompressed pass over k images and `n_text` text tokens takes (every image token,
    each image's marker, the text)."""
    layout = model.layout
    n_markers = sum(len(m) for m in markers(layout, k))
    return layout.n_shared + k * (layout.text_position - layout.n_shared) + n_markers + n_text


def fits_uncompressed(model: HTCVLM, k: int, n_text: int) -> bool:
    """Whether the LLM's context holds k uncompressed images and `n_text` text tokens."""
    return uncompressed_length(model, k, n_text) <= model.llm.config.max_position_embeddings


def uncompressed_logits(
    model: HTCVLM, prefixes: torch.Tensor, images: Sequence[Sequence[int]], texts: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncompressed upper bound over several images: one causal pass per row over
    [S; V_hy¹; sep; voco¹; m_1; V_hy²; sep; voco²; m_2; …; text] at consecutive positions, as a
    LLaVA-style context holds k images, the text reading every token before it. Inside each image
    block the single-image rule holds (each image token sees S and its own block, never another image),
    so one image is exactly the single-image upper pass (`HTCVLM.forward(text_attends_visual=True)`).

    prefixes: [S; V_hy; sep; voco] embeddings (N, text_position, d) of the images the rows name by
    index; texts: each row's text after its markers. Returns the text logits (B, T, vocab), right-padded,
    row t predicting token t + 1, and each row's text length (B,). Raises ValueError when a row does
    not fit the LLM's context.
    """
    layout, device = model.layout, prefixes.device
    n_shared, block = layout.n_shared, layout.text_position - layout.n_shared
    limit = model.llm.config.max_position_embeddings
    rows, spans, starts = [], [], []
    for row_images, text in zip(images, texts, strict=True):
        marks = markers(layout, len(row_images))
        ids = torch.tensor([t for m in marks for t in m] + list(text), dtype=torch.long, device=device)
        embedded = iter(model.embed_text(ids).split([len(m) for m in marks] + [len(text)]))
        parts, blocks, at = [prefixes[row_images[0], :n_shared]], [], n_shared
        for image in row_images:
            parts += [prefixes[image, n_shared:], next(embedded)]
            blocks.append(at)
            at += block + len(parts[-1])
        parts.append(next(embedded))
        rows.append(torch.cat(parts))
        spans.append(blocks)
        starts.append(at)
        if len(rows[-1]) > limit:  # uncompressed_length(model, len(row_images), len(text))
            raise ValueError(
                f"{len(row_images)} uncompressed images and the text take {len(rows[-1])} positions; "
                f"the LLM holds {limit}"
            )
    width = max(len(r) for r in rows)
    embeds = prefixes.new_zeros(len(rows), width, prefixes.shape[-1])
    allowed = torch.ones(len(rows), width, width, dtype=torch.bool, device=device).tril()
    for r, (row, blocks) in enumerate(zip(rows, spans, strict=True)):
        embeds[r, : len(row)] = row
        for start in blocks:
            inside = slice(start, start + block)
            allowed[r, inside, n_shared:start] = False  # an image block sees S and itself only
            if layout.visual_attention == "isolated":  # V_hy opens the block
                v = slice(start, start + layout.n_visual)
                allowed[r, v, v] = torch.eye(layout.n_visual, dtype=torch.bool, device=device)
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=device)
    mask = mask.masked_fill_(~allowed, torch.finfo(embeds.dtype).min)[:, None]
    positions = torch.arange(width, device=device)[None].expand(len(rows), -1)
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    lengths = torch.tensor([len(t) for t in texts], device=device)
    at = torch.tensor(starts, device=device)[:, None] + torch.arange(int(lengths.max()), device=device)
    text_logits = logits.gather(1, at.clamp(max=width - 1)[..., None].expand(-1, -1, logits.shape[-1]))
    return text_logits, lengths


def multi_image_upper_logits(
    model: HTCVLM, pool: VQATensors, rows: MultiRows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`multi_image_logits` for the uncompressed upper bound (`uncompressed_logits`): right-padded text
    ids (B, T) (prompt, answer: the markers stay with their images), logits (B, T, vocab), scored (B, T)."""
    device = model.device
    inputs, slots = _distinct_images(model, pool, rows)
    prefixes, _ = model.prefix_embeds(*inputs)
    logits, _ = uncompressed_logits(model, prefixes, slots, rows.texts)
    width = logits.shape[1]
    ids = torch.full((len(rows), width), model.tokenizer.pad_token_id, dtype=torch.long, device=device)
    scored = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for r, (text, n) in enumerate(zip(rows.texts, rows.answer_lengths, strict=True)):
        ids[r, : len(text)] = torch.tensor(text, device=device)
        scored[r, len(text) - n : len(text)] = True
    return ids, logits, scored
