"""Tiny random checkpoints written in the exact layouts LLaVA-1.5 is published in (nothing is downloaded).

One random transformers `LlavaForConditionalGeneration` is written twice:
- as llava-hf publishes it: safetensors shards + index under the published key names
  (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.vision_model.*`,
  `multi_modal_projector.linear_{1,2}.*`), a legacy-style Llama tokenizer.json with `<image>` and `<pad>`
  added, the vocabulary padded to a multiple of 64;
- as LLaVA's original release: a LLaMA config.json with the mm_* fields, `.bin` shards + index
  (`model.*` with rotary inv_freq buffers, `lm_head.weight`, `model.mm_projector.{0,2}.*`), the
  sentencepiece tokenizer.model, and a separate CLIP folder (a CLIPModel's config and `pytorch_model.bin`
  whose text half LLaVA never uses, and CLIP's preprocessor_config.json).
A tiny sentencepiece BPE, trained here with LLaMA's normalizer settings, plays LLaMA's tokenizer.model.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

from htcvlm.config import CLIP_MEAN, CLIP_STD

IMAGE_SIZE, PATCH = 32, 8
HIDDEN, VISION_HIDDEN = 64, 32
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a red mat next to 2 dogs.",
    "USER: How many people are there?\nASSISTANT: There are 12 people, 3 of them children.",
    "Über naïve café, 東京 and São Paulo 😀 — résumé.",
]


def train_sentencepiece(vocab_size: int = 400) -> bytes:
    """A sentencepiece BPE model with LLaMA's settings (identity normalizer, dummy prefix, spaces kept,
    digits split, byte fallback, <unk> <s> </s> at 0 1 2, no pad)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 40),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def random_llava(vocab_size: int, image_token_id: int, seed: int = 0) -> LlavaForConditionalGeneration:
    """A tiny LLaVA-1.5 geometry (penultimate CLIP layer, patch tokens, GELU MLP projector) with every
    weight random, layer norms included, so a swapped key cannot go unnoticed."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=VISION_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=16,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
        ),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def clip_preprocessor_config() -> dict:
    """openai/clip-vit-large-patch14-336's preprocessor_config.json, at the tiny image size."""
    return {
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "size": IMAGE_SIZE,
    }


def write_shards(folder: Path, state: dict[str, torch.Tensor], kind: str, n: int = 2) -> None:
    """`state` in n shards with the index Hugging Face writes beside them (`kind`: safetensors or bin)."""
    keys = list(state)
    weight_map = {}
    for i in range(n):
        part = {k: state[k].contiguous() for k in keys[i::n]}
        if kind == "safetensors":
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    size = sum(t.numel() * t.element_size() for t in state.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))


def hf_tokenizer_json(sp_model: bytes, image_token_id: int) -> str:
    """The tokenizer.json llava-hf ships: transformers 4's legacy Llama conversion (Prepend + Replace
    normalizer, no pre-tokenizer) with <unk> <s> </s> special, then <image> and <pad> added."""
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(sp_model)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    data = json.loads(SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True).to_str())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")]
    )
    assert tokenizer.get_vocab_size() == image_token_id
    tokenizer.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tokenizer.add_special_tokens([AddedToken("<pad>", normalized=False, special=True)])
    return tokenizer.to_str()


def write_llava_hf(folder: Path, model: LlavaForConditionalGeneration, sp_model: bytes) -> Path:
    """The llava-hf layout, under the key names its published safetensors have."""
    folder.mkdir(parents=True)
    published = {}
    for key, tensor in model.state_dict().items():
        key = key.replace("model.language_model.", "language_model.model.")
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.")
        key = key.replace("model.multi_modal_projector.", "multi_modal_projector.")
        published["language_model.lm_head.weight" if key == "lm_head.weight" else key] = tensor
    write_shards(folder, published, "safetensors")
    model.config.to_json_file(folder / "config.json")
    (folder / "tokenizer.json").write_text(hf_tokenizer_json(sp_model, model.config.image_token_id))
    processor = {**clip_preprocessor_config(), "image_processor_type": "CLIPImageProcessor"}
    processor |= {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "size": {"shortest_edge": IMAGE_SIZE},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


def write_clip(folder: Path, model: LlavaForConditionalGeneration) -> Path:
    """A CLIPModel folder (as openai/clip-vit-large-patch14-336) whose vision half is the LLaVA tower."""
    folder.mkdir(parents=True)
    vision = model.config.vision_config
    config = CLIPConfig(
        vision_config=vision.to_dict(),
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 8,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        projection_dim=16,
    )
    state = CLIPModel(config).state_dict()
    for key, tensor in model.model.vision_tower.state_dict().items():
        assert f"vision_model.{key}" in state, key
        state[f"vision_model.{key}"] = tensor
    # buffers older CLIP checkpoints saved
    state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE_SIZE // PATCH) ** 2 + 1)[None]
    state["text_model.embeddings.position_ids"] = torch.arange(8)[None]
    torch.save(state, folder / "pytorch_model.bin")
    config.to_json_file(folder / "config.json")
    (folder / "preprocessor_config.json").write_text(json.dumps(clip_preprocessor_config()))
    return folder


def write_llava_original(
    folder: Path, model: LlavaForConditionalGeneration, sp_model: bytes, vocab: int
) -> Path:
    """LLaVA's original layout (liuhaotian/llava-v1.5-7b): the LLM and projector only, vocabulary unpadded."""
    folder.mkdir(parents=True)
    text = model.config.text_config
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.language_model."):
            state[key.replace("model.language_model.", "model.")] = tensor
        elif key.startswith("model.multi_modal_projector."):
            layer = "0" if ".linear_1." in key else "2"
            state[f"model.mm_projector.{layer}.{key.rsplit('.', 1)[1]}"] = tensor
        elif key == "lm_head.weight":
            state[key] = tensor
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:vocab].clone()
    head_dim = text.hidden_size // text.num_attention_heads
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for i in range(text.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    write_shards(folder, state, "bin")
    config = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "torch_dtype": "float32",
        "use_cache": True,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(sp_model)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False, "pad_token": None}
        )
    )
    return folder


@dataclass(frozen=True)
class Published:
    """The same tiny LLaVA-1.5 in both published layouts, and the transformers model they came from."""

    model: LlavaForConditionalGeneration
    sp_model: bytes
    hf: Path
    original: Path
    clip: Path


def publish(root: Path) -> Published:
    sp_model = train_sentencepiece()
    vocab = 400
    # llava-hf: <image> and <pad> after the pieces, the embedding padded to a multiple of 64
    model = random_llava(vocab_size=448, image_token_id=vocab)
    return Published(
        model=model,
        sp_model=sp_model,
        hf=write_llava_hf(root / "llava-1.5-hf", model, sp_model),
        original=write_llava_original(root / "llava-v1.5", model, sp_model, vocab),
        clip=write_clip(root / "clip-vit", model),
    )


def write_voco_llama(folder: Path, original: Path, vocab: int, seed: int = 1) -> Path:
    """What VoCo-LLaMA's fine-tuning (train_compress.py, transformers 4.37) saves from a LLaVA-1.5 start:
    LLaVA's original layout with `<voco>` added as a special token at id `vocab` (a random embedding and
    lm_head row; vocab_size + 1), the slow tokenizer's files saying so, Vicuna-1.5's `legacy: false`."""
    from htcvlm.formats.weights import load_weights

    folder.mkdir(parents=True)
    state = load_weights(original)
    gen = torch.Generator().manual_seed(seed)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        row = torch.randn(1, state[key].shape[1], generator=gen) * 0.1
        state[key] = torch.cat([state[key], row])
    write_shards(folder, state, "bin")
    config = json.loads((original / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"vocab_size": vocab + 1}, indent=2))
    (folder / "tokenizer.model").write_bytes((original / "tokenizer.model").read_bytes())
    voco = {"content": "<voco>", "lstrip": False, "normalized": False, "rstrip": False, "special": True}
    specials = {str(i): voco | {"content": t} for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "pad_token": "<unk>",
        "additional_special_tokens": ["<voco>"],
        "added_tokens_decoder": specials | {str(vocab): voco},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({"<voco>": vocab}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["<voco>"]}))
    return folder
