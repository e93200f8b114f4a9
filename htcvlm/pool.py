"""Pools: VQA samples as the model reads them, pre-rendered once and tokenized with its tokenizer.

Training and evaluation both read pools; neither imports the other for them.

- `VQATensors`: images as uint8, each image's question segments as token ids, per-cell scene labels, and
  the frozen MGVQ's and vision tower's outputs once computed over the pool
- `tensorize`: samples (procedural or LLaVA) -> `VQATensors`
- `procedural_pool`: a split of the procedural set, optionally with single-object samples appended
- `cell_labels`: each grid cell's shape, color, size and texture, the labels stage 0 learns
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from htcvlm.data.dataset import ProceduralVQA, Split, VQASample
from htcvlm.data.questions import QTYPES
from htcvlm.data.scenes import COLORS, GRID, SHAPES, SIZES, TEXTURES, Scene
from htcvlm.images import to_pixels, to_rgb
from htcvlm.model import HTCVLM


@dataclass
class VQATensors:
    """A pre-rendered pool: images as uint8 and token ids of their questions and answers, right-padded.

    Row i holds image i's question segments packed one after another: one for evaluation pools, several
    for training (see `hybrid_mask`); questions/answers/qtypes are the first. A segment is one question
    (prompt, answer, EOS) or a whole conversation, its turns one after another (`conversation_ids`).
    """

    pixels: torch.Tensor  # (N, 3, S, S) uint8
    ids: torch.Tensor  # (N, T) long: the segments, then padding
    segments: torch.Tensor  # (N, K) long: each segment's length (0 where a row has fewer)
    scored: torch.Tensor  # (N, T) bool: answer tokens and EOS of every turn, the positions Eq. 9 scores
    qtypes: list[str]
    answers: list[str]
    questions: list[str]
    quantized: torch.Tensor | None = None  # (N, C, h, w): the frozen MGVQ's output, computed once
    n_easy: int = 0  # the last n_easy samples are single-object scenes (the curriculum's first phase)
    cells: torch.Tensor | None = None  # (N, 9, 4) per grid cell: shape (0 empty), color, size, texture
    patches: torch.Tensor | None = None  # (N, n_patches, d_vision): a frozen tower's output, computed once

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) each row's true length."""
        return self.segments.sum(dim=1)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor | None]:
        segments = self.segments[idx]
        width = int(segments.sum(dim=1).max())
        return {
            "pixels": self.pixels[idx].float() / 255.0,
            "input_ids": self.ids[idx, :width],
            "text_lengths": segments,
            "scored": self.scored[idx, :width],
            "quantized": None if self.quantized is None else self.quantized[idx],
            "patches": None if self.patches is None else self.patches[idx],
        }

    @torch.no_grad()  # not inference_mode: these tensors are saved for backward as P_d's input
    def quantize(self, model: HTCVLM, batch_size: int = 256) -> None:
        """Run the (frozen) tokenizer once over the pool, so training steps skip it."""
        self.quantized = map_batches(
            lambda x: model.mgvq.encode(x.to(model.device)).quantized, self.pixels, batch_size
        )

    @torch.no_grad()
    def encode_patches(self, model: HTCVLM, batch_size: int = 256) -> None:
        """Run the (frozen) vision tower once over the pool, so training steps skip it."""
        self.patches = map_batches(
            lambda x: model.vision_patches(x.to(model.device)), self.pixels, batch_size
        )


def map_batches(
    fn: Callable[[torch.Tensor], torch.Tensor], pixels_u8: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """fn over the pool's pixels in batches, into one preallocated CPU tensor: concatenating the chunks
    would hold the result twice (7 GB for the patches of a 110k-sample pool)."""
    out: torch.Tensor | None = None
    for i in range(0, len(pixels_u8), batch_size):
        part = fn(pixels_u8[i : i + batch_size].float() / 255.0).cpu()
        if out is None:
            out = part.new_empty((len(pixels_u8), *part.shape[1:]))
        out[i : i + len(part)] = part
    assert out is not None, "an empty pool"
    return out


# One segment's text: its turns' token ids one after another, and which of them the loss scores.
Segment = tuple[list[int], list[bool]]


def conversation_ids(
    model: HTCVLM,
    turns: Sequence[tuple[str, str]],
    turn_ids: Callable[[str, str, int], tuple[list[int], list[int]]] | None = None,
) -> Segment:
    """A conversation's (question, answer) turns as one segment, as the chat template lays them out: the
    first turn's prompt, its answer and EOS, then each later turn's prompt (`next_prompt`), answer and EOS.
    Causal attention inside the segment lets every turn read the turns before it. Scored: the answer
    tokens and the EOS ending each, never a prompt. `turn_ids`: a cached `model.turn_ids`."""
    turn_ids = turn_ids or model.turn_ids
    ids: list[int] = []
    scored: list[bool] = []
    for turn, (question, answer) in enumerate(turns):
        prompt, target = turn_ids(question, answer, turn)
        ids += prompt + target
        scored += [False] * len(prompt) + [True] * len(target)
    return ids, scored


def tensorize(model: HTCVLM, samples: Sequence[VQASample]) -> VQATensors:
    size = model.config.image_size
    pixels = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    # a pool asks a few hundred distinct texts many times over: tokenize each once
    turn_ids = functools.cache(model.turn_ids)
    rows: list[list[Segment]] = []  # per sample, its segments: the first question's conversation, then `more`
    for i, s in enumerate(samples):
        if s.image.size == (size, size):
            pixels[i] = torch.from_numpy(np.array(s.image.convert("RGB"))).permute(2, 0, 1)  # HWC -> CHW
        else:  # the same padding and resizing as compress() applies to image files
            pixels[i] = (
                (to_pixels(to_rgb(s.image), size, model.config.preprocess) * 255).round().to(torch.uint8)
            )
        conversations = [[(s.question, s.answer), *s.follow_ups], *s.more]
        rows.append([conversation_ids(model, c, turn_ids) for c in conversations])
    k = max(len(r) for r in rows)
    segments = torch.tensor([[len(ids) for ids, _ in r] + [0] * (k - len(r)) for r in rows])
    width = int(segments.sum(dim=1).max())
    ids = torch.full((len(rows), width), model.tokenizer.pad_token_id, dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        at = 0
        for segment, marks in r:
            end = at + len(segment)
            ids[i, at:end] = torch.tensor(segment)
            scored[i, at:end] = torch.tensor(marks)
            at = end
    return VQATensors(
        pixels=pixels,
        ids=ids,
        segments=segments,
        scored=scored,
        qtypes=[s.qtype for s in samples],
        answers=[s.answer for s in samples],
        questions=[s.question for s in samples],
    )


# Per-cell label columns and their class counts; shape 0 is an empty cell, where the other columns are
# ignored (-1).
CELL_CLASSES = {"shape": 1 + len(SHAPES), "color": len(COLORS), "size": len(SIZES), "texture": len(TEXTURES)}


def cell_labels(scenes: Sequence[Scene | None]) -> torch.Tensor:
    """(N, 9, 4) long: each grid cell's shape (0 = empty), color, size and texture index (-1 if empty)."""
    labels = torch.full((len(scenes), GRID * GRID, 4), -1, dtype=torch.long)
    labels[..., 0] = 0
    colors = list(COLORS)
    for i, scene in enumerate(scenes):
        for o in scene.objects if scene is not None else ():
            labels[i, o.cell] = torch.tensor(
                [
                    1 + SHAPES.index(o.shape),
                    colors.index(o.color),
                    SIZES.index(o.size),
                    TEXTURES.index(o.texture),
                ]
            )
    return labels


# Single-object scenes admit every question type but relations.
EASY_WEIGHTS = {q: 1.0 for q in QTYPES if q != "relation"}


def procedural_pool(model: HTCVLM, split: Split, size: int, easy: int = 0, questions: int = 1) -> VQATensors:
    """`size` samples of the split, plus `easy` single-object ones (a curriculum: with one object in view
    every answer is a property of the image, which the vision tower learns long before it learns to
    bind a named object to its properties). `questions`: up to this many questions per image, packed
    into one training row (the first is the one a one-question pool asks)."""
    image_size = model.config.image_size
    samples = ProceduralVQA(split, size, image_size=image_size, questions=questions).render_all()
    if easy:
        single = ProceduralVQA(
            split, easy, image_size, weights=EASY_WEIGHTS, seed=1, max_objects=1, questions=questions
        )
        samples += single.render_all()
    pool = tensorize(model, samples)
    pool.n_easy = easy
    pool.cells = cell_labels([s.scene for s in samples])
    return pool
