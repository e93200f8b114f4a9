"""What training reads: the tokenizer, the training and validation pools (procedural, built by
`htcvlm.pool`, or LLaVA-format), and the curriculum's batches."""

from __future__ import annotations

from dataclasses import replace
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


def batch_indices(data: VQATensors, step: int, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(batch_size,) pool rows for stage 2's step `step`: the first cfg.easy_steps steps draw only the
    pool's single-object samples (its last n_easy rows), the rest from the whole pool."""
    if step < cfg.easy_steps and data.n_easy:
        return len(data) - data.n_easy + torch.randint(data.n_easy, (cfg.batch_size,), generator=gen)
    return torch.randint(len(data), (cfg.batch_size,), generator=gen)
