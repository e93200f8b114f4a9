from __future__ import annotations

import pytest

from htcvlm.tokenizer import train_tokenizer

from .helpers import QUESTIONS


@pytest.fixture(scope="session")
def tokenizer():
    corpus = [q.lower() for q in QUESTIONS] * 4
    return train_tokenizer(corpus, vocab_size=300)
