"""LLaVA-1.5 checkpoints read into OneToken's continuous-channel model: `HTCConfig` + state dict + tokenizer.

Two published formats hold the same weights (LLaVA-1.5-7B: Vicuna-7B-v1.5, CLIP ViT-L/14-336 and the
two-layer GELU projector between them):
- LLaVA's original (`liuhaotian/llava-v1.5-7b`): a LLaMA config.json with `mm_*` fields, `.bin` shards with
  an index (`model.*`, `lm_head.weight`, `model.mm_projector.{0,2}.*`), a sentencepiece tokenizer.model; the
  vision tower is a separate CLIP folder, which `mm_vision_tower` names and the caller gives locally.
- transformers' (`llava-hf/llava-1.5-7b-hf`): a LlavaConfig, safetensors shards with `vision_tower.*`,
  `multi_modal_projector.linear_{1,2}.*` and `language_model.*`, a tokenizer.json with `<image>` and
  `<pad>` added, the embedding padded to 32064 rows.
Both give one result: the vocabulary is the sentencepiece model's (the added and padding rows are left out,
see llama_tokenizer), images are preprocessed as LLaVA-1.5 was trained (padded to a square with CLIP's mean
colour, then CLIPImageProcessor), and `voco`, which LLaVA has not got, starts as the mean input embedding:
untrained, as in any HTC-VLM built from these parts before its training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import LlamaConfig, LlavaConfig, PreTrainedTokenizerFast

from htcvlm.config import HTCConfig, ImageProcessing, LLMConfig, ProjectorKind, VisionConfig
from htcvlm.errors import CheckpointError
from htcvlm.formats.clip import (
    PREPROCESSOR_FILE,
    TOWER_PARTS,
    clip_preprocessing,
    read_clip_folder,
    vision_config,
)
from htcvlm.formats.hf_config import parse_config, read_config_json
from htcvlm.formats.llama_tokenizer import (
    added_tokens,
    base_vocab_size,
    tokenizer_from_json,
    tokenizer_from_sentencepiece,
)
from htcvlm.formats.weights import load_weights, rename_keys
from htcvlm.model import HTCVLM

LlavaFormat = Literal["llava", "llava-hf"]
NAME = "llava-1.5"
EMBED, HEAD = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
# mm_projector_type -> our projector and its published keys (under model.mm_projector.) -> ours
PROJECTORS: dict[str, tuple[ProjectorKind, list[tuple[str, str]]]] = {
    "mlp2x_gelu": (
        "mlp2x_gelu",
        [(r"model\.mm_projector\.([02])\.(weight|bias)", r"proj_v.\1.\2")],
    ),
    "linear": ("linear", [(r"model\.mm_projector\.(weight|bias)", r"proj_v.\1")]),
}
# image_aspect_ratio -> whether images are padded to a square first ("square" and unset: CLIP's crop only)
ASPECT_RATIOS = {"pad": True, "square": False, None: False}


@dataclass(frozen=True)
class ImportedModel:
    """A published checkpoint in OneToken's terms: `HTCVLM(config, tokenizer)` takes `state` strictly.
    `added_rows`: the input embedding row of each token the caller named as added on top of the
    sentencepiece pieces (left out of the vocabulary, as LLaVA's own added tokens are)."""

    config: HTCConfig
    state: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerFast
    added_rows: dict[str, torch.Tensor] = field(default_factory=dict)


def detect_format(folder: Path) -> LlavaFormat:
    """Which LLaVA format a folder holds, from its config.json; anything else is a `CheckpointError`."""
    return _format_of(read_config_json(folder), folder)


def _format_of(raw: dict[str, Any], folder: Path) -> LlavaFormat:
    kind = raw.get("model_type")
    if kind in ("llava", "llava_llama") and "mm_vision_tower" in raw:
        return "llava"
    if kind == "llava" and "text_config" in raw and "vision_config" in raw:
        return "llava-hf"
    raise CheckpointError(
        f"{folder}/config.json is neither LLaVA's original format (model_type llava or llava_llama with "
        f"mm_vision_tower) nor transformers' (model_type llava with text_config and vision_config); "
        f"model_type is {kind!r}"
    )


def read_llava(
    folder: str | Path, clip_folder: str | Path | None = None, added_tokens: Sequence[str] = ()
) -> ImportedModel:
    """Read a LLaVA-1.5 checkpoint in either format. The original format needs `clip_folder`, the local
    copy of the CLIP model its `mm_vision_tower` names; transformers' format holds its tower itself.
    `added_tokens` (original format only): tokens a fine-tuning added after the sentencepiece pieces, in id
    order (VoCo-LLaMA's `<voco>`); their embedding rows come back in `added_rows`."""
    folder = Path(folder)
    raw = read_config_json(folder)
    if _format_of(raw, folder) == "llava-hf":
        if clip_folder is not None:
            raise CheckpointError(f"{folder} holds its own vision tower (llava-hf): give no CLIP folder")
        if added_tokens:
            raise CheckpointError(f"{folder} is llava-hf, whose added tokens are <image> and <pad> only")
        return _read_hf(folder, raw)
    if clip_folder is None:
        raise CheckpointError(
            f"{folder} is LLaVA's original format, whose vision tower {raw['mm_vision_tower']!r} is a "
            "separate CLIP model: give the local folder of that model"
        )
    return _read_original(folder, raw, Path(clip_folder), tuple(added_tokens))


def _read_original(
    folder: Path, raw: dict[str, Any], clip_folder: Path, added: tuple[str, ...]
) -> ImportedModel:
    source = str(folder)
    _require(raw, "mm_vision_select_feature", "patch", source)  # patch tokens only, CLS dropped
    _require(raw, "mm_use_im_start_end", False, source)  # no image start/end tokens in the vocabulary
    projector_type = raw.get("mm_projector_type", "linear")
    if projector_type not in PROJECTORS:
        raise CheckpointError(
            f"{source}: mm_projector_type {projector_type!r}; supported {sorted(PROJECTORS)}"
        )
    aspect = raw.get("image_aspect_ratio")
    if aspect not in ASPECT_RATIOS:
        raise CheckpointError(f"{source}: image_aspect_ratio {aspect!r}; supported {list(ASPECT_RATIOS)}")
    select_layer = raw.get("mm_vision_select_layer", -1)
    clip, vision_state = read_clip_folder(clip_folder)
    if raw.get("mm_hidden_size", clip.hidden_size) != clip.hidden_size:
        raise CheckpointError(
            f"{source}: mm_hidden_size {raw['mm_hidden_size']} but the CLIP tower in {clip_folder} has "
            f"hidden size {clip.hidden_size}"
        )
    vision, image_size = vision_config(clip, select_layer, str(clip_folder))
    projector, projector_keys = PROJECTORS[projector_type]
    state = rename_keys(
        load_weights(folder),
        renames=[
            *projector_keys,
            (r"model\.((?:embed_tokens|layers|norm)\..+)", r"llm.model.\1"),
            (r"lm_head\.weight", HEAD),
        ],
        drops=[
            r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",  # recomputed from rope_theta
            # the frozen tower that DeepSpeed saves into self-trained checkpoints (released ones have
            # none): LLaVA's own loader ignores it too and loads the tower from mm_vision_tower
            r"model\.vision_tower\..+",
        ],
        source=source,
    )
    text = parse_config(LlamaConfig, raw, source)
    tokenizer_file = folder / "tokenizer.model"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{folder} is missing tokenizer.model")
    tokenizer = tokenizer_from_sentencepiece(tokenizer_file)
    if len(tokenizer) + len(added) != text.vocab_size:
        with_added = f" and {len(added)} added tokens {list(added)}" if added else ""
        raise CheckpointError(
            f"{source}: vocab_size is {text.vocab_size} but tokenizer.model has {len(tokenizer)} pieces"
            f"{with_added} (other tokens added on top of the sentencepiece model are not supported)"
        )
    mean, std = clip_preprocessing(clip_folder, image_size)
    return _assemble(
        source,
        vision=replace(vision, image_mean=mean, image_std=std),
        image_size=image_size,
        text=text,
        projector=projector,
        pad=ASPECT_RATIOS[aspect],
        state={**vision_state, **state},
        tokenizer=tokenizer,
        added=added,
    )


def _read_hf(folder: Path, raw: dict[str, Any]) -> ImportedModel:
    source = str(folder)
    config = parse_config(LlavaConfig, raw, source)
    text, clip = config.text_config, config.vision_config
    if text.model_type != "llama" or clip.model_type != "clip_vision_model":
        raise CheckpointError(
            f"{source}: a {text.model_type} LLM with a {clip.model_type} tower; supported: llama with CLIP"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise CheckpointError(f"{source}: several vision feature layers {config.vision_feature_layer}")
    _require(raw, "vision_feature_select_strategy", "default", source)  # patch tokens only, CLS dropped
    _require(raw, "projector_hidden_act", "gelu", source)
    _require(raw, "multimodal_projector_bias", True, source)
    vision, image_size = vision_config(clip, config.vision_feature_layer, source)
    tower = r"(?:model\.)?vision_tower\.(?:vision_model\.)?"
    projector = r"(?:model\.)?multi_modal_projector\."
    # Published files have the first spelling of each; transformers 5 saves and loads the second.
    state = rename_keys(
        load_weights(folder),
        renames=[
            (tower + TOWER_PARTS, r"vision.\1"),
            (projector + r"linear_1\.(weight|bias)", r"proj_v.0.\1"),
            (projector + r"linear_2\.(weight|bias)", r"proj_v.2.\1"),
            (r"(?:language_model\.model|model\.language_model)\.(.+)", r"llm.model.\1"),
            (r"(?:language_model\.)?lm_head\.weight", HEAD),
        ],
        drops=[tower + r"embeddings\.position_ids", r".+\.rotary_emb\.inv_freq"],
        source=source,
    )
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{folder} is missing tokenizer.json")
    base = base_vocab_size(tokenizer_file)
    added = {i: t for i, t in added_tokens(tokenizer_file).items() if i >= base}
    # what llava-hf adds on top of the sentencepiece pieces: the image placeholder and a pad token
    unknown = {i: t for i, t in added.items() if i != config.image_token_id and t != "<pad>"}
    if unknown:
        raise CheckpointError(f"{tokenizer_file}: tokens added beyond <image> and <pad>: {unknown}")
    tokenizer = tokenizer_from_json(tokenizer_file, keep=base)
    mean, std = clip_preprocessing(folder, image_size)
    return _assemble(
        source,
        vision=replace(vision, image_mean=mean, image_std=std),
        image_size=image_size,
        text=text,
        projector="mlp2x_gelu",
        pad=_pads_to_square(folder),
        state=state,
        tokenizer=tokenizer,
    )


def _pads_to_square(folder: Path) -> bool:
    """LLaVA-1.5 was trained on images padded to a square. The CLIPImageProcessor config llava-hf ships
    cannot say so; only a processor that says `"do_pad": false` itself is taken at its word."""
    path = folder / PREPROCESSOR_FILE
    return not path.is_file() or json.loads(path.read_text()).get("do_pad", True) is not False


def _assemble(
    source: str,
    *,
    vision: VisionConfig,
    image_size: int,
    text: LlamaConfig,
    projector: ProjectorKind,
    pad: bool,
    state: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerFast,
    added: tuple[str, ...] = (),
) -> ImportedModel:
    vocab, rows_needed = len(tokenizer), len(tokenizer) + len(added)
    for key in (EMBED, HEAD):
        if key not in state:
            raise CheckpointError(f"{source} has no {key} (published name of the LLM's {key.split('.')[-2]})")
        rows = state[key].shape[0]
        if rows < rows_needed:
            raise CheckpointError(f"{source}: {key} has {rows} rows for a {rows_needed}-token vocabulary")
    added_rows = {token: state[EMBED][vocab + i].clone() for i, token in enumerate(added)}
    for key in (EMBED, HEAD):
        state[key] = state[key][:vocab].clone()  # rows past the tokenizer's pieces: added or padding
    embed = state[EMBED]
    state["voco"] = embed.float().mean(dim=0, keepdim=True).to(embed.dtype)  # (n_voco = 1, d)
    mean = vision.image_mean
    config = HTCConfig(
        name=NAME,
        image_size=image_size,
        vision=vision,
        llm=_llm_config(text, vocab, source),
        projector=projector,
        channels="continuous",
        preprocess=ImageProcessing(
            pad_to_square=pad,
            pad_colour=tuple(int(x * 255) for x in mean),  # LLaVA's expand2square colour
            resize="shortest_edge",
        ),
    )
    _check_fits(config, tokenizer, state, source)
    return ImportedModel(config, state, tokenizer, added_rows)


def _llm_config(text: LlamaConfig, vocab_size: int, source: str) -> LLMConfig:
    """Our LLMConfig from a LLaMA config; what components.build_llm does not build is an error."""
    rope = text.rope_parameters or {}
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    unsupported = {
        "hidden_act": (text.hidden_act, "silu"),
        "attention_bias": (text.attention_bias, False),
        "mlp_bias": (text.mlp_bias, False),
        "tie_word_embeddings": (text.tie_word_embeddings, False),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "head_dim": (head_dim, text.hidden_size // text.num_attention_heads),
    }
    wrong = {k: got for k, (got, want) in unsupported.items() if got != want}
    if wrong:
        raise CheckpointError(f"{source}: unsupported LLaMA settings {wrong}")
    return LLMConfig(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=text.rms_norm_eps,
    )


def _check_fits(
    config: HTCConfig, tokenizer: PreTrainedTokenizerFast, state: dict[str, torch.Tensor], source: str
) -> None:
    """Every weight HTCVLM has, of its shape, and no other: checked on the meta device (nothing allocated)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in HTCVLM(config, tokenizer).state_dict().items()}
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing {missing[:12]}")
    if extra := sorted(state.keys() - expected.keys()):
        problems.append(f"not in the model {extra[:12]}")
    shapes = {k: (tuple(state[k].shape), s) for k, s in expected.items() if k in state}
    if wrong := {k: v for k, v in shapes.items() if v[0] != v[1]}:
        problems.append(f"shapes (got, expected) {dict(list(wrong.items())[:12])}")
    if problems:
        raise CheckpointError(f"{source} does not fit its own config: {'; '.join(problems)}")


def _require(raw: dict[str, Any], key: str, value: object, source: str) -> None:
    if key in raw and raw[key] != value:
        raise CheckpointError(f"{source}: {key} is {raw[key]!r}; only {value!r} is supported")
