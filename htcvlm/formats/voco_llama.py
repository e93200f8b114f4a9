"""VoCo-LLaMA checkpoints read into OneToken's continuous-channel model with two voco tokens.

VoCo-LLaMA (Ye et al., 2024) published no weights; its fine-tuning script (`llava/train/train_compress.py`
in github.com/Yxxxb/VoCo-LLaMA) writes LLaVA's original layout (`LlavaLlamaForCausalLM`: a LLaMA
config.json with `mm_*` fields, `.bin` shards, the slow tokenizer's tokenizer.model) with `<voco>` added as a
special token right after the sentencepiece pieces (id 32000; vocab_size 32001, its embedding that row).
Its sequence, as its evaluation builds it (`"<image>\\n<voco><voco>\\n" + prompt` with the prompt's own
newlines removed, tokenized chunk by chunk by transformers 4.37's LlamaTokenizer, Vicuna-1.5's
`legacy: false`):

    BOS · 576 image tokens · "▁" "\\n" · <voco> <voco> · "\\n" system " USER: " q " ASSISTANT:"

with causal attention everywhere except that every query after the last `<voco>` sees only keys from the
first `<voco>` on. In OneToken's terms: n_voco=2, visual_attention "causal", the separator "▁" "\\n" (" \\n"
for a tokenizer without sentencepiece's dummy prefix), text_attends_prefix False, and the voco parameter
the `<voco>` embedding row twice. The row is taken out of the vocabulary (32000 tokens, LLaVA's): OneToken
feeds voco as an embedding and never generates it (its lm_head row is dropped too).
A later turn of a conversation, as training on multi-turn data packs it, follows the answer before it as
the template's TWO separator style writes it: answer "</s>" "USER: " q2 " ASSISTANT:" (`next_prompt`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from htcvlm.config import LayoutConfig
from htcvlm.errors import CheckpointError
from htcvlm.formats.llama_tokenizer import without_dummy_prefix
from htcvlm.formats.llava import ImportedModel, detect_format, read_llava

NAME = "voco-llama"
VOCO = "<voco>"
N_VOCO = 2  # the fine-tuning script inserts two, and its model code asserts two
# voco_conv_vicuna_v1, the conversation template of VoCo-LLaMA's training and evaluation
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant of the image. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ADDED_FILES = ("added_tokens.json", "tokenizer_config.json")


def voco_llama_layout(dummy_prefix: bool) -> LayoutConfig:
    """The layout above. `dummy_prefix`: whether the tokenizer puts "▁" before every text, as the slow
    LlamaTokenizer with `legacy: true` did after a special token; then "\\n" alone is "▁" "\\n"."""
    return LayoutConfig(
        bos=True,
        system=SYSTEM,
        separator="\n" if dummy_prefix else " \n",
        prompt="\n{system} USER: {question} ASSISTANT:",
        # the template's TWO separator style: a later turn right after the </s> ending the answer before it
        next_prompt="USER: {question} ASSISTANT:",
        text_attends_prefix=False,
        stop_tokens=("</s>",),
    )


def read_voco_llama(folder: str | Path, clip_folder: str | Path) -> ImportedModel:
    """A VoCo-LLaMA checkpoint and the local folder of its CLIP tower -> a continuous-only HTC-VLM with two
    trained voco tokens, ready to serve. Anything else (llava-hf, no `<voco>` token, other added tokens) is
    a `CheckpointError` saying what it is."""
    folder = Path(folder)
    if detect_format(folder) != "llava":
        raise CheckpointError(
            f"{folder} is transformers' LLaVA format; VoCo-LLaMA checkpoints are LLaVA's original format"
        )
    added, legacy = _added_tokens(folder)
    if list(added.values()) != [VOCO]:
        raise CheckpointError(
            f"{folder} is not a VoCo-LLaMA checkpoint: its tokenizer adds {added or 'no tokens'} to the "
            f"sentencepiece model, VoCo-LLaMA's adds {VOCO} alone (a LLaVA checkpoint: `convert llava`)"
        )
    imported = read_llava(folder, clip_folder, added_tokens=[VOCO])
    voco_id, pieces = next(iter(added)), len(imported.tokenizer)
    if voco_id != pieces:
        raise CheckpointError(f"{folder}: {VOCO} has id {voco_id}, not {pieces} (right after the pieces)")
    row = imported.added_rows[VOCO]
    state = {**imported.state, "voco": row[None].expand(N_VOCO, -1).clone()}  # (n_voco, d)
    tokenizer = imported.tokenizer if legacy else without_dummy_prefix(imported.tokenizer)
    config = replace(
        imported.config,
        name=NAME,
        n_voco=N_VOCO,
        visual_attention="causal",
        layout=voco_llama_layout(dummy_prefix=legacy),
    )
    return ImportedModel(config, state, tokenizer, imported.added_rows)


def _added_tokens(folder: Path) -> tuple[dict[int, str], bool]:
    """The tokens the slow tokenizer's files add beyond the sentencepiece model (by id, from
    added_tokens.json or tokenizer_config.json's added_tokens_decoder, ids past the three specials), and
    whether it is a legacy LlamaTokenizer (transformers' default when the config does not say)."""
    files = {name: _json(folder / name) for name in ADDED_FILES}
    added = {int(i): t for t, i in files["added_tokens.json"].items()}
    decoder = files["tokenizer_config.json"].get("added_tokens_decoder", {})
    added |= {int(i): t["content"] for i, t in decoder.items() if int(i) > 2}  # <unk> <s> </s> are pieces
    return dict(sorted(added.items())), bool(files["tokenizer_config.json"].get("legacy", True))


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data
