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
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from htcvlm.data.multi import ImageFacts, MultiQuestion, multi_questions
from htcvlm.decode import left_padded_text, read_placed
from htcvlm.model import HTCVLM, KVState
from htcvlm.placement import place_states
from htcvlm.pool import VQATensors


@dataclass
class MultiRows:
    """Multi-image rows ready for the model: each row's pool images and its prompt and answer ids."""

    questions: list[MultiQuestion]
    texts: list[list[int]]  # prompt, answer, EOS: what follows the images and their markers
    answer_lengths: list[int]  # the answer tokens and EOS, the positions Eq. 9 scores

    def __len__(self) -> int:
        return len(self.questions)


def tokenize_rows(model: HTCVLM, questions: Sequence[MultiQuestion]) -> MultiRows:
    """Questions -> `MultiRows`, each text as the model's prompt template gives it."""
    prompt_ids, answer_ids = functools.cache(model.prompt_ids), functools.cache(model.answer_ids)
    pairs = [(prompt_ids(q.text), answer_ids(q.answer)) for q in questions]
    return MultiRows(list(questions), [p + a for p, a in pairs], [len(a) for _, a in pairs])


def draw_rows(
    model: HTCVLM, facts: Sequence[ImageFacts], n: int, max_images: int, rng: random.Random
) -> MultiRows:
    """n rows over the pool `facts`: k uniform in 1 … max_images, a qtype uniform among those k allows."""
    return tokenize_rows(model, multi_questions(facts, range(1, max_images + 1), n, rng))


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
    voco, shared = slice(layout.voco_position, layout.text_position), slice(0, layout.n_shared)
    keys = torch.stack([layer.keys[:, :, voco] for layer in cache.layers], dim=1)
    values = torch.stack([layer.values[:, :, voco] for layer in cache.layers], dim=1)
    shared_state = tuple((layer.keys[:1, :, shared], layer.values[:1, :, shared]) for layer in cache.layers)
    latents = out.last_hidden_state[:, voco].mean(dim=1)  # as a record's latent: the voco rows' mean
    return shared_state, keys, values, latents


def multi_image_logits(
    model: HTCVLM, pool: VQATensors, rows: MultiRows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' left-padded text ids (B, T) (markers, prompt, answer), their logits (B, T, vocab), row t
    predicting token t + 1, and which ids are scored (B, T): the answers and EOS."""
    device = model.device
    unique = sorted({i for q in rows.questions for i in q.images})
    slot_of = {image: at for at, image in enumerate(unique)}
    batch = pool.batch(torch.tensor(unique))
    shared, keys, values, _ = voco_states(
        model,
        batch["pixels"].to(device),
        None if batch["quantized"] is None else batch["quantized"].to(device),
        None if batch["patches"] is None else batch["patches"].to(device),
    )
    counts = [len(q.images) for q in rows.questions]
    # (B, K) rows of indices into `unique`; a row's slots after its last image repeat image 0, masked
    index = torch.zeros(len(rows), max(counts), dtype=torch.long, device=device)
    for row, q in enumerate(rows.questions):
        index[row, : len(q.images)] = torch.tensor([slot_of[i] for i in q.images])
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
