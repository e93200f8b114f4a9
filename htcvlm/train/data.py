"""What training reads: the tokenizer, the training and validation pools (procedural, built by
`htcvlm.pool`, or LLaVA-format), and the curriculum's batches."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from htcvlm.data.dataset import draw_question
from htcvlm.data.llava import LlavaConversations, LlavaVQA, by_image, conversations, read_llava
from htcvlm.data.questions import answer_vocabulary
from htcvlm.model import HTCVLM
from htcvlm.pool import VQATensors, procedural_pool, tensorize
from htcvlm.tokenizer import train_tokenizer
from htcvlm.train.recipe import TrainConfig


def procedural_tokenizer(vocab_size: int = 512, n_questions: int = 4000) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges cover the procedural questions and answers (any text still encodes)."""
    texts = []
    for i in range(n_questions):
        _, question = draw_question("train", i)
        texts += [f"Question: {question.text}\nAnswer:", f" {question.answer}"]
    texts += [f" {a}" for a in answer_vocabulary()]
    return train_tokenizer(texts, vocab_size)


def llava_pools(
    model: HTCVLM, json_path: Path, image_root: Path, val_size: int
) -> tuple[VQATensors, VQATensors]:
    """LLaVA-format data: the last `val_size` turns held out, each alone (as the service asks); the turns
    before them train, one row per image with every conversation about it packed (a conversation the cut
    splits keeps its earlier turns)."""
    data = read_llava(json_path, image_root, on_missing="skip")
    if len(data.turns) <= val_size:
        raise ValueError(
            f"{json_path} has {len(data.turns)} turns with images, need more than val_size={val_size}"
        )
    train = LlavaConversations(by_image(conversations(data.turns[:-val_size])))
    val = LlavaVQA(replace(data, turns=data.turns[-val_size:]))
    return (
        tensorize(model, [train[i] for i in range(len(train))]),
        tensorize(model, [val[i] for i in range(len(val))]),
    )


def training_pools(
    model: HTCVLM, cfg: TrainConfig, llava: tuple[Path, Path] | None = None
) -> tuple[VQATensors, VQATensors]:
    """(training, validation) pools: procedural ones as `cfg` sizes them, or LLaVA-format conversations
    from `llava` = (JSON file, image root) with the last cfg.val_size turns held out."""
    if llava is not None:
        return llava_pools(model, *llava, cfg.val_size)
    train = procedural_pool(model, "train", cfg.pool, cfg.easy, cfg.questions)
    return train, procedural_pool(model, "val", cfg.val_size)


@dataclass
class _Order:
    """One order's generator where its last draw left it (`at` steps drawn) and its last steps' rows."""

    at: int
    gen: torch.Generator
    recent: dict[int, torch.Tensor]


# a run draws step after step (a Ray worker's stream asks for a step's rows in several pieces, and may run
# a step or two ahead): replaying from step 0 happens once per run or resumption, not once per step
_ORDERS: dict[tuple[int, ...], _Order] = {}
_ORDERS_LOCK = threading.Lock()
_RECENT = 8


def step_rows(
    seed: int, step: int, batch_size: int, n: int, n_easy: int = 0, easy_steps: int = 0
) -> torch.Tensor:
    """(batch_size,) rows of a pool of `n` for stage 2's step `step`, drawn with replacement: the
    step-th draw of one generator seeded with seed * 1000, from the pool's last `n_easy` rows (the
    single-object ones) for the first `easy_steps` steps and from all of it after.

    A pure function of its arguments, so a resumed run draws what an unbroken one would, and the Ray
    path's workers draw what the single process draws; and the order the shipped model was trained on
    (its steps drew from that generator one after another).
    """
    if step < 0 or n < 1 or not 0 <= n_easy <= n:
        raise ValueError(f"no rows to draw: step {step}, pool {n}, of them single-object {n_easy}")
    key = (seed, batch_size, n, n_easy, easy_steps)
    with _ORDERS_LOCK:
        order = _ORDERS.pop(key, None)
        if order is None or (step < order.at and step not in order.recent):
            order = _Order(0, torch.Generator().manual_seed(seed * 1000), {})
        while order.at <= step:
            if order.at < easy_steps and n_easy:
                rows = n - n_easy + torch.randint(n_easy, (batch_size,), generator=order.gen)
            else:
                rows = torch.randint(n, (batch_size,), generator=order.gen)
            order.recent[order.at] = rows
            order.recent.pop(order.at - _RECENT, None)
            order.at += 1
        if len(_ORDERS) >= 16:  # a few orders live in one process (training, tests); forget the oldest
            del _ORDERS[next(iter(_ORDERS))]
        _ORDERS[key] = order
        return order.recent[step].clone()


def batch_indices(data: VQATensors, step: int, cfg: TrainConfig) -> torch.Tensor:
    """(batch_size,) pool rows for stage 2's step `step` (`step_rows`): the first cfg.easy_steps steps
    draw only the pool's single-object samples (its last n_easy rows), the rest from the whole pool."""
    return step_rows(cfg.seed, step, cfg.batch_size, len(data), data.n_easy, cfg.easy_steps)
