"""LLaMA / Vicuna tokenizers as OneToken keeps them: one `tokenizer.json` (a fast tokenizer).

The original LLaVA-1.5 ships a sentencepiece `tokenizer.model` only; it is converted here with
transformers' own converter from the sentencepiece model's protobuf (no sentencepiece library needed),
following the model's own normalizer settings, so every string encodes to the ids
`SentencePieceProcessor.encode` (the slow LlamaTokenizer LLaVA used) gives. llava-hf ships a
`tokenizer.json` with two tokens LLaVA added on top (`<image>`, `<pad>`); OneToken puts image embeddings in
directly and needs neither, so they are left out and both formats give the same vocabulary.

Vicuna has no pad token. LLaVA trained with `<unk>` as padding (its config's pad_token_id is 0), and
OneToken masks every pad position, so `<unk>` pads here too: no vocabulary row nobody trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf.message import DecodeError
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

from htcvlm.errors import CheckpointError

SPM_BPE = 2  # sentencepiece's TrainerSpec.ModelType.BPE, LLaMA's


def tokenizer_from_sentencepiece(path: Path) -> PreTrainedTokenizerFast:
    """A LLaMA-style sentencepiece BPE `tokenizer.model` -> the equivalent fast tokenizer."""
    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise CheckpointError(f"{path} is not a sentencepiece model: {exc}") from exc
    spec = proto.trainer_spec
    if spec.model_type != SPM_BPE:
        raise CheckpointError(f"{path} is a sentencepiece model of type {spec.model_type}, not BPE (LLaMA's)")
    if not proto.pieces:
        raise CheckpointError(f"{path} has no pieces")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    pieces = [piece.piece for piece in proto.pieces]
    specials = {}
    for role, index in (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id)):
        if not 0 <= index < len(pieces):
            raise CheckpointError(f"{path} has no {role} piece (id {index})")
        specials[role] = pieces[index]
    return _fast(backend, **specials)


def tokenizer_from_json(path: Path, keep: int) -> PreTrainedTokenizerFast:
    """A `tokenizer.json` with its added tokens from id `keep` on left out (the caller checked them)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < keep]
    backend = Tokenizer.from_str(json.dumps(data))
    if (size := backend.get_vocab_size(with_added_tokens=True)) != keep:
        raise CheckpointError(f"{path} keeps {size} tokens below id {keep}, expected {keep}")
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    return _fast(backend, unk=by_id[0], bos=by_id[1], eos=by_id[2])


def added_tokens(path: Path) -> dict[int, str]:
    """The added tokens a `tokenizer.json` lists, by id."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {t["id"]: t["content"] for t in data.get("added_tokens", [])}


def base_vocab_size(path: Path) -> int:
    """How many tokens a `tokenizer.json`'s model has before any added token."""
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=False)


def _fast(backend: Tokenizer, unk: str, bos: str, eos: str) -> PreTrainedTokenizerFast:
    bos_id = backend.token_to_id(bos)
    # LLaMA's encoding with special tokens: BOS first, never EOS (the model writes that itself)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=unk
    )


def without_dummy_prefix(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same tokenizer, but encoding each text as sentencepiece does with `add_dummy_prefix` off: no
    "▁" put in front. transformers' LlamaTokenizer with `legacy: false` (Vicuna-1.5's setting) encodes the
    text after a special token so: VoCo-LLaMA's prompt after its `<voco>` tokens starts "\\n", not "▁\\n"."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    data["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "never",
        "split": False,
    }
    backend = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=tokenizer.unk_token,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
    )
