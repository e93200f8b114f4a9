"""The two pretrained-able components: the CLIP vision tower and the causal LM.

Each is built from our config, or loaded from a local Hugging Face folder named in it (never a hub
download); a loaded component must have the geometry the config states, so `HTCConfig` stays the one
description of the model (records, cache sizes and checkpoints all read it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from htcvlm.config import HTCConfig
from htcvlm.errors import CheckpointError


def require_hf_dir(path: str | Path) -> Path:
    """A local Hugging Face model folder must hold config.json and weights in safetensors."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory; give the local folder of a downloaded model")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is missing config.json")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} is missing its weights: no *.safetensors file (e.g. model.safetensors)"
        )
    return folder


def _check_geometry(folder: str, loaded: object, expected: dict[str, int]) -> None:
    wrong = {k: (getattr(loaded, k), v) for k, v in expected.items() if getattr(loaded, k) != v}
    if wrong:
        detail = ", ".join(f"{k} is {got}, config says {want}" for k, (got, want) in wrong.items())
        raise CheckpointError(f"{folder} does not match the model config: {detail}")


class ConvStem(nn.Module):
    """Stand-in for CLIP's patch embedding: log2(patch) stride-2 convs, (B, 3, S, S) -> (B, d, S/p, S/p)."""

    def __init__(self, patch_size: int, d: int) -> None:
        super().__init__()
        stages = patch_size.bit_length() - 1
        if 2**stages != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        widths = [3] + [max(d // 2 ** (stages - 1 - i), 16) for i in range(stages)]
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1), nn.GELU()]
        self.net = nn.Sequential(*layers[:-1])  # no activation on the token embeddings themselves

    @property
    def weight(self) -> torch.Tensor:
        return self.net[0].weight  # CLIP reads its input dtype from patch_embedding.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def build_vision(config: HTCConfig) -> CLIPVisionModel:
    vc = config.vision
    if vc.path:
        vision = CLIPVisionModel.from_pretrained(str(require_hf_dir(vc.path)), local_files_only=True)
        _check_geometry(
            vc.path,
            vision.config,
            {
                "hidden_size": vc.hidden_size,
                "num_hidden_layers": vc.num_layers,
                "patch_size": vc.patch_size,
                "image_size": config.image_size,
            },
        )
        return vision
    clip = CLIPVisionConfig(
        hidden_size=vc.hidden_size,
        intermediate_size=vc.intermediate_size,
        num_hidden_layers=vc.num_layers,
        num_attention_heads=vc.num_heads,
        image_size=config.image_size,
        patch_size=vc.patch_size,
    )
    vision = CLIPVisionModel(clip)
    if vc.stem == "conv":
        vision.embeddings.patch_embedding = ConvStem(vc.patch_size, vc.hidden_size)
    return vision


def build_llm(config: HTCConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    lc = config.llm
    if lc.path:
        llm = AutoModelForCausalLM.from_pretrained(str(require_hf_dir(lc.path)), local_files_only=True)
        _check_geometry(
            lc.path,
            llm.config,
            {
                "hidden_size": lc.hidden_size,
                "num_hidden_layers": lc.num_layers,
                "num_attention_heads": lc.num_heads,
                "num_key_value_heads": lc.num_kv_heads,
                "vocab_size": lc.vocab_size,
            },
        )
        return llm
    if len(tokenizer) != lc.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the LLM's vocab_size is {lc.vocab_size}; "
            "build new models with new_model(), which sizes the vocabulary from the tokenizer"
        )
    llama = LlamaConfig(
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_layers,
        num_attention_heads=lc.num_heads,
        num_key_value_heads=lc.num_kv_heads,
        max_position_embeddings=lc.max_position_embeddings,
        rms_norm_eps=lc.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": lc.rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(llama)


def constructed_buffer(module: nn.Module, name: str) -> torch.Tensor | None:
    """The value a transformers module's constructor gives its non-persistent buffer `name`, on the CPU
    (None for a buffer this does not know): what a model built on the meta device lacks after loading.

    CLIP's patch position ids, and the rotary inverse frequencies of LLaMA-family models (transformers
    recomputes these the same way in `PreTrainedModel._init_weights`).
    """
    if isinstance(module, CLIPVisionEmbeddings) and name == "position_ids":
        return torch.arange(module.num_positions).expand((1, -1))
    rope_type = getattr(module, "rope_type", None)
    if name in ("inv_freq", "original_inv_freq") and hasattr(module, "original_inv_freq") and rope_type:
        if rope_type == "default":
            inv_freq, _ = module.compute_default_rope_parameters(module.config)  # type: ignore[operator]
        else:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](module.config)
        return inv_freq
    return None
