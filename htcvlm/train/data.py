"""What training reads beyond the shared pools (`htcvlm.pool`): the tokenizer and LLaVA-format pools."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from htcvlm.data.dataset import draw_question
from htcvlm.data.llava import LlavaVQA, read_llava
from htcvlm.data.questions import answer_vocabulary
from htcvlm.model import HTCVLM
from htcvlm.pool import VQATensors, tensorize
from htcvlm.tokenizer import train_tokenizer


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
    """LLaVA-format data: every (question, answer) turn a sample; the last `val_size` held out."""
    data = LlavaVQA(read_llava(json_path, image_root, on_missing="skip"))
    if len(data) <= val_size:
        raise ValueError(f"{json_path} has {len(data)} turns with images, need more than val_size={val_size}")
    samples = [data[i] for i in range(len(data))]
    return tensorize(model, samples[:-val_size]), tensorize(model, samples[-val_size:])
