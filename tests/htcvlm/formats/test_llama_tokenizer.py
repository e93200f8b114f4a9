"""A sentencepiece tokenizer.model (LLaMA's kind) converts to a fast tokenizer giving sentencepiece's ids."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from htcvlm.checkpoint import load_tokenizer
from htcvlm.errors import CheckpointError
from htcvlm.formats.llama_tokenizer import tokenizer_from_sentencepiece
from tests.htcvlm.formats.published import train_sentencepiece

# LLaVA-1.5's prompt pieces, whitespace at the edges (sentencepiece's dummy prefix is always added and
# extra spaces are kept), newlines and tabs (byte fallback), digits (split), accents, CJK and emoji.
STRINGS = [
    " USER: ",
    "\n",
    "ASSISTANT:",
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "\nHow many people are there? ASSISTANT:",
    "Über naïve café, 東京 and São Paulo 😀 — résumé.",
    "  two leading spaces",
    "trailing space ",
    "tab\there",
    "12345 + 678",
    "▁already escaped",
    "",
    " ",
]


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(train_sentencepiece())
    return path


@pytest.mark.parametrize("text", STRINGS)
def test_ids_equal_sentencepiece(sp_file, text):
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    tokenizer = tokenizer_from_sentencepiece(sp_file)
    assert tokenizer(text, add_special_tokens=False).input_ids == sp.encode(text)
    # with special tokens: BOS first, as LLaVA's LlamaTokenizer (add_bos_token) gave
    assert tokenizer(text).input_ids == [sp.bos_id(), *sp.encode(text)]
    assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_specials_and_pad(sp_file):
    tokenizer = tokenizer_from_sentencepiece(sp_file)
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    assert len(tokenizer) == sp.get_piece_size()  # nothing added: no embedding row nobody trained
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token == "<unk>"  # LLaVA's padding; Vicuna has no pad token


def test_saved_tokenizer_json_loads_the_same(sp_file, tmp_path):
    """Saved as tokenizer.json it loads through OneToken's checkpoint loader with the same ids (it must
    not become transformers' own LlamaTokenizer, whose pre-tokenizer drops sentencepiece's extra '▁')."""
    tokenizer = tokenizer_from_sentencepiece(sp_file)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    for text in STRINGS:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text
    assert loaded.pad_token_id == 0


def test_not_a_sentencepiece_model(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a sentencepiece model"):
        tokenizer_from_sentencepiece(path)
